# Two set-up commands on a fresh machine: `make train STAGE=1` and `make test`.
# Every target installs .venv first (CPU build of torch where there is no GPU).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)

STAGE ?= 1
MODEL ?= tiny
NPROC ?= 1
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
ARGS ?=
TRAIN_ARGS := configs/train/$(MODEL)-stage$(STAGE).args
# Tiny stage 1 resumes itself (Megatron's --load = --save): the first `make train STAGE=1`
# starts from scratch, a later one resumes an interrupted run or, after a finished one, has
# nothing left to do. ARGS come after, so they can name another --load.
RESUME := $(if $(filter tiny1,$(MODEL)$(STAGE)),--load runs/tiny-stage1/checkpoints)
# torchrun sets OMP_NUM_THREADS=1 when it is unset, which leaves the offloaded optimizer step
# (CPU Adam over a rank's share of 70B parameters) on one core; each local rank gets its share
# of the cores instead (a value in the environment wins).
OMP_THREADS := $(shell n=$$(nproc 2>/dev/null || echo 1); t=$$((n / $(NPROC))); echo $$((t > 0 ? t : 1)))
SAMPLE_DATA := runs/data/sample_stage1/sample_stage1-train-text.idx runs/data/sample_stage2/sample_stage2-train-text.idx

# A MODEL / STAGE without an argument file fails here, before installing or pretokenizing.
ifneq ($(filter train,$(MAKECMDGOALS)),)
ifeq ($(wildcard $(TRAIN_ARGS)),)
$(error MODEL=$(MODEL) STAGE=$(STAGE): there is no $(TRAIN_ARGS); the argument files in configs/train are $(notdir $(wildcard configs/train/*.args)) (MODEL-stageSTAGE.args))
endif
endif

# Several nodes: each launch needs its own NODE_RANK and the head node's address. The defaults
# would have a non-head node wait silently for a master on its own 127.0.0.1 until torchrun's
# rendezvous times out (600 s), and a node left at NODE_RANK 0 compete with the head node.
ifneq ($(filter train,$(MAKECMDGOALS)),)
ifneq ($(NNODES),1)
ifneq ($(filter file,$(origin NODE_RANK) $(origin MASTER_ADDR)),)
$(error NNODES=$(NNODES): give each node's launch NODE_RANK (0 on the head node, another of 1 up to NNODES - 1 on each other node) and MASTER_ADDR (the head node's address, the same on every node), e.g. make train NNODES=$(NNODES) NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC=8)
endif
ifneq ($(shell [ "$(NODE_RANK)" -ge 0 ] 2>/dev/null && [ "$(NODE_RANK)" -lt "$(NNODES)" ] && echo ok),ok)
$(error NODE_RANK=$(NODE_RANK): expected 0 to $(shell echo $$(($(NNODES) - 1))) with NNODES=$(NNODES))
endif
endif
endif

# The tiny stages run in order: stage 2 fine-tunes stage 1's final checkpoint, `make sample`
# reads stage 2's (unless ARGS names another --load).
ifeq ($(filter train,$(MAKECMDGOALS))$(MODEL)$(STAGE)$(findstring --load,$(ARGS)),traintiny2)
ifeq ($(wildcard runs/tiny-stage1/checkpoints/latest_checkpointed_iteration.txt),)
$(error STAGE=2 fine-tunes stage 1's final checkpoint and runs/tiny-stage1/checkpoints holds none: run `make train STAGE=1` first)
endif
endif
ifeq ($(filter sample,$(MAKECMDGOALS))$(findstring --load,$(ARGS)),sample)
ifeq ($(wildcard runs/tiny-stage2/checkpoints/latest_checkpointed_iteration.txt),)
$(error make sample reads stage 2's checkpoint and runs/tiny-stage2/checkpoints holds none: run `make train STAGE=1` and `make train STAGE=2` first (or give ARGS="--load DIR"))
endif
endif

.NOTPARALLEL:
.PHONY: install test test-gpu data train sample bench gpu-check plots lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# No GPU here: take the local CPU build first so the torch range below installs nothing more.
	@if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['dev']))" > $(VENV)/requirements.txt
	$(PY) -m pip install -q -r $(VENV)/requirements.txt
	touch $(STAMP)

# Kernel tests run the Triton kernels in the interpreter on CPU; the rest uses the references.
# The transformers-parity test runs in both: there it trains through every kernel.
test: install
	TRITON_INTERPRET=1 $(PY) -m pytest tests/kernels tests/hf/test_training_parity.py -m "not gpu" -q
	$(PY) -m pytest tests --ignore=tests/kernels -m "not gpu" -q

# On a GPU machine (also the lent one, whose image already has the packages): PYTHON=python3.
test-gpu:
	$(if $(wildcard $(PY)),$(PY),python3) -m pytest tests -m gpu -q

data: install $(SAMPLE_DATA)

# One run writes both mixes; the targets run one at a time (.NOTPARALLEL), so `make -j`
# does not start the pretokenizer twice on the same files.
# Rebuilt when the mix or the bundled sample files change (a stale pretokenized copy would
# otherwise train on the old data without a word).
SAMPLE_INPUTS := configs/data/sample.yaml data/assets/sample_sp.model $(wildcard data/samples/*/*)
$(SAMPLE_DATA): $(SAMPLE_INPUTS) | $(STAMP)
	$(PY) -m data.pretokenize configs/data/sample.yaml

train: install $(if $(filter tiny,$(MODEL)),data)
ifeq ($(NPROC)$(NNODES),11)
	$(PY) -m train @$(TRAIN_ARGS) $(RESUME) $(ARGS)
else
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(OMP_THREADS)} $(VENV)/bin/torchrun --nnodes $(NNODES) --node_rank $(NODE_RANK) --nproc_per_node $(NPROC) \
		--master_addr $(MASTER_ADDR) --master_port $(MASTER_PORT) -m train @$(TRAIN_ARGS) $(RESUME) $(ARGS)
endif

sample: install
	$(PY) -m model.generate --load runs/tiny-stage2/checkpoints --prompts configs/prompts/sample_prompts.jsonl \
		--out runs/tiny-stage2/sampling_report.json $(ARGS)

bench: install
	$(PY) -m bench.bench_pretokenize
	$(PY) -m pytest bench -q --benchmark-only $(ARGS)

# The lent GPU machine: its own python3 (torch, triton, pytest, ...), never `make install`.
gpu-check:
	python3 -m bench.gpu_check

plots: install
	$(PY) -m bench.plots bench/results

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf runs .pytest_cache .benchmarks
