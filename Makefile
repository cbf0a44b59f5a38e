# flashmoe: the two commands a newcomer needs (see README.md).
#   make demo   install flashmoe, convert the shipped demo model (demo/model), ask it something
#   make test   install the test extras and run the test suite (what CI runs)
# On an NVIDIA GPU under Linux:  make demo EXTRAS=cuda   (MLX's CUDA build instead of its CPU build)
PYTHON ?= python3
UNAME := $(shell uname -s)
comma := ,
# Linux needs MLX's CPU build (or `cuda` on an NVIDIA machine); macOS wheels carry Metal.
EXTRAS ?= $(if $(filter Linux,$(UNAME)),cpu,)
TEST_EXTRAS ?= serve,test
OUT ?= out
DEMO_BUNDLE := $(OUT)/demo-bundle
DEMO_PROMPT ?= Tell me about the "for" statement.

.PHONY: install install-test demo test clean

install:
	$(PYTHON) -m pip install -q -e "$(if $(EXTRAS),.[$(EXTRAS)],.)"

install-test:
	$(PYTHON) -m pip install -q -e ".[$(if $(EXTRAS),$(EXTRAS)$(comma))$(TEST_EXTRAS)]"

demo: install
	@rm -rf $(DEMO_BUNDLE)
	$(PYTHON) -m flashmoe.convert.cli demo/model -o $(DEMO_BUNDLE) -q
	@echo
	@echo '>>> $(DEMO_PROMPT)'
	@$(PYTHON) -m flashmoe.runtime.cli $(DEMO_BUNDLE) --prompt '$(DEMO_PROMPT)' --max-tokens 80 --stats
	@echo
	@echo 'That was a 4-layer, 16-expert Qwen3.5-MoE (17 MB, trained on Python'"'"'s help topics), run the way'
	@echo 'flashmoe runs the 397B: dense weights resident, the routed experts read from disk per token.'
	@echo 'Next:'
	@echo '  flashmoe-run $(DEMO_BUNDLE)                             chat with it (/help inside)'
	@echo '  flashmoe-eval $(DEMO_BUNDLE) --text demo/heldout.txt    its perplexity on topics it never saw'
	@echo '  flashmoe-bench doctor                                   what this machine can run, and how fast'
	@echo '  flashmoe-convert Qwen/Qwen3.5-35B-A3B -o ~/models/qwen3.5-35b-q4 && flashmoe-run ~/models/qwen3.5-35b-q4'

test: install-test
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info
