# flashmoe: the two commands a newcomer needs (see README.md).
#   make demo   install, build a tiny Qwen3.5-MoE checkpoint locally, convert it, run it once
#   make test   install and run the test suite (what CI runs)
PYTHON ?= python3
UNAME := $(shell uname -s)
comma := ,
# Linux needs MLX's CPU build (or `cuda` on an NVIDIA machine); macOS wheels carry Metal.
EXTRAS ?= $(if $(filter Linux,$(UNAME)),cpu$(comma)serve$(comma)test,serve$(comma)test)
OUT ?= out

.PHONY: install demo test bench clean

install:
	$(PYTHON) -m pip install -q -e ".[$(EXTRAS)]"

demo: install
	$(PYTHON) tests/make_tiny.py $(OUT)/tiny-hf
	rm -rf $(OUT)/tiny-bundle
	flashmoe-convert $(OUT)/tiny-hf -o $(OUT)/tiny-bundle
	flashmoe-inspect $(OUT)/tiny-bundle --verify
	flashmoe-run $(OUT)/tiny-bundle --prompt "Hello" --max-tokens 16 --stats

test: install
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info
