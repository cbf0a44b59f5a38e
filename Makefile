# flashmoe: the two commands a newcomer needs (see README.md). Both install into a virtual environment,
# .venv, made with $(PYTHON) (any Python >= 3.10; never the system's own site-packages).
#   make demo   install flashmoe with everything the README's commands need, convert the demo model, ask it something
#   make test   the same plus the test extras (torch, transformers, ...), then the test suite (what CI runs)
# On an NVIDIA GPU under Linux:  make demo EXTRAS=cuda   (MLX's CUDA build instead of its CPU build)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Linux needs MLX's CPU build (or `cuda` on an NVIDIA machine); macOS wheels carry Metal.
EXTRAS ?= $(if $(filter Linux,$(shell uname -s)),cpu,)
comma := ,
space := $() $()
extras = $(subst $(space),$(comma),$(strip $(EXTRAS) $(1)))
OUT ?= out
DEMO_BUNDLE := $(OUT)/demo-bundle
DEMO_PROMPT ?= Tell me about the "for" statement.

.PHONY: venv install install-test demo test clean

venv: $(PY)
$(PY):
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 10) else "flashmoe needs Python >= 3.10, $(PYTHON) is %d.%d: run make with PYTHON=python3.12 (or another >= 3.10)" % v[:2])'
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "$(PYTHON) cannot make a virtual environment: on Debian/Ubuntu, apt install python3-venv"; exit 1; }

install: $(PY)
	$(PY) -m pip install -q -e ".[$(call extras,serve client)]"

install-test: $(PY)
	$(PY) -m pip install -q -e ".[$(call extras,serve client test)]"

demo: install
	@rm -rf $(DEMO_BUNDLE)
	$(PY) -m flashmoe.convert.cli demo/model -o $(DEMO_BUNDLE) -q
	@echo
	@echo '>>> $(DEMO_PROMPT)'
	@$(PY) -m flashmoe.runtime.cli $(DEMO_BUNDLE) --prompt '$(DEMO_PROMPT)' --max-tokens 80 --stats
	@echo
	@echo 'That was a 4-layer, 16-expert Qwen3.5-MoE (17 MB, trained on Python'"'"'s help topics), run the way'
	@echo 'flashmoe runs the 397B: dense weights resident, the routed experts read from disk per token.'
	@echo 'Next, in this shell:  source $(VENV)/bin/activate   (then see the README'"'"'s quick start)'
	@echo '  flashmoe-run $(DEMO_BUNDLE)                             chat with it (/help inside)'
	@echo '  flashmoe-serve $(DEMO_BUNDLE)                           an OpenAI/Anthropic API on 127.0.0.1:8080'
	@echo '  flashmoe-eval $(DEMO_BUNDLE) --text demo/heldout.txt    its perplexity on topics it never saw'

# .venv/bin first on PATH, as `source .venv/bin/activate` does: tests start flashmoe-run, mlx.launch, ...
test: install-test
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q tests

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info
