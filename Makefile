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
	$(BIN)/pip install -q -e '.[dev,pdf,serve,ocr]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/deepsynth demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/render.py
	$(BIN)/python benchmarks/compression.py
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/hostile.py

# Re-creates the shipped reader checkpoint from code, in four time-budgeted phases (89 minutes of
# wall-clock time on 2 CPU cores; a faster machine trains more steps; run it on an otherwise idle
# machine): the transcription curriculum; 8 more minutes of its last stage with the learning rate
# decaying to 1e-5 (this is what teaches the page's last line); then key questions on the
# fixed-order form layout (80% of examples at a flat learning rate, then 90% with a cosine decay
# to 1e-5; the rest keep transcribing). Each phase runs on the one Trainer; its run folder
# (<out>.run, or --run-dir) holds checkpoints and metrics.jsonl, and a killed phase continues with
# the same command plus --resume latest.
READER := src/deepsynth/models/checkpoints/tiny-reader
PRETRAIN := $(BIN)/python -m deepsynth.training.reader_pretrain
FORM_PHASE := --start-stage 5 --layout form --warmup-steps 1
reader: $(STAMP)
	$(PRETRAIN) --out runs/reader/phase1 --minutes 60
	$(PRETRAIN) --out runs/reader/phase1b --init-from runs/reader/phase1 --start-stage 5 --warmup-steps 1 --lr 4e-4 --lr-min 1e-5 --planned-steps 1200 --minutes 8 --eval-every-minutes 100
	$(PRETRAIN) --out runs/reader/phase2 --init-from runs/reader/phase1b $(FORM_PHASE) --question-share 0.8 --lr 4e-4 --lr-min 4e-4 --minutes 12 --eval-every-minutes 3
	$(PRETRAIN) --out $(READER) --run-dir runs/reader/phase3.run --init-from runs/reader/phase2 $(FORM_PHASE) --question-share 0.9 --lr 4e-4 --lr-min 1e-5 --planned-steps 1300 --minutes 9 --eval-every-minutes 3

clean:
	rm -rf $(VENV) runs
