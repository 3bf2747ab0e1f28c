# Set-up is self-contained: `make test` / `make demo` create .venv, install the local CPU torch first
# (never let pip resolve another torch), then fxprune with its dev extra.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: test demo install clean ops

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# torchvision's PyPI wheel is a CUDA build: installed outside site-packages (tests and benchmarks add the folder
	# and stub its meta registrations), so that transformers, which imports torchvision when it finds it, never sees it
	$(BIN)/pip install -q --no-deps --target $(VENV)/torchvision torchvision==0.28.0
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/python benchmarks/squeeze_release.py --model fc --dataset digits --seed 0 --plot squeeze_release.png

ops: $(STAMP)
	$(BIN)/python scripts/list_aten_ops.py --write tests/data/aten_ops.txt

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
