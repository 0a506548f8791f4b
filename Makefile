# Every target sets up .venv on first use: torch (CPU build) first, then the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench reader clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,pdf,serve]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/deepsynth demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/render.py
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/serve.py

# Re-creates the shipped reader checkpoint from code: 60 minutes of wall-clock time on 2 CPU
# cores (time-budgeted, so a faster machine trains more steps; run it on an otherwise idle machine).
reader: $(STAMP)
	$(BIN)/python -m deepsynth.training.reader_pretrain --out src/deepsynth/models/checkpoints/tiny-reader --minutes 60

clean:
	rm -rf $(VENV) runs
