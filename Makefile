# Everything installs into .venv; each target does its own set-up.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.mmdiag-installed
# PyPI's torch for Linux is the CUDA build (GBs of nvidia-* packages): the +cpu build comes from
# PyTorch's own index (a local wheel or mirror that pip already knows about serves as well).
# One retry: where that index is unreachable, pip's default 5 retries per package cost minutes.
TORCH       ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, and only if missing: the CPU build (see TORCH above).
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/pip install --disable-pip-version-check -q --retries 1 --extra-index-url $(TORCH_INDEX) '$(TORCH)'
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
