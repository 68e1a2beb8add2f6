# Everything installs into .venv; each target does its own set-up.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.mmdiag-installed
# PyPI's torch for Linux is the CUDA build (GBs of nvidia-* packages): the +cpu build comes from
# what pip already reaches (a local wheel through find-links, a mirror in pip.conf), else from
# PyTorch's own index, tried only once its host answers: an unreachable index would cost ten
# "Retrying ... Name or service not known" lines and minutes. PyPI has no +cpu build, so the
# first try never pulls the CUDA one.
TORCH       ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PIP         = $(BIN)/pip install --disable-pip-version-check -q
# Exit 0 when URL answers within 5 s (through the same proxy settings pip uses).
REACHABLE   = $(BIN)/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5).read(1)'
TORCH_HELP  = neither pip's own sources nor $(TORCH_INDEX) have $(TORCH): put its wheel where pip looks \
              (PIP_FIND_LINKS=DIR) or name a reachable mirror (make TORCH_INDEX=URL)

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, and only if missing: the CPU build (see TORCH above).
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(PIP) --retries 1 '$(TORCH)' 2>/dev/null || \
		{ $(REACHABLE) '$(TORCH_INDEX)/' 2>/dev/null && $(PIP) --retries 1 --extra-index-url $(TORCH_INDEX) '$(TORCH)'; } || \
		{ echo "make: $(TORCH_HELP)" >&2; exit 1; }
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## the main job: synthesize the default workload, replay it at --tp 4 over every strategy
	$(BIN)/mmdiag demo

test: $(STAMP)  ## the test suite (real gloo ranks, real py-spy, real SGLang wheels)
	$(BIN)/python -m pytest -q -rs

bench: $(STAMP)  ## strategies side by side on the bundled profiles at tp 2 and 4, plus harness overhead
	$(BIN)/python benchmarks/bench_replay.py

clean:
	rm -rf $(VENV) .pytest_cache .cache build *.egg-info
