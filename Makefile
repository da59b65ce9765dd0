# Targets: each `# make <target>:` line below is what `make help` prints; indented lines add detail.
# make help: list the targets.
# make install: set up .venv from requirements.lock (torch first; `make install TORCH=` keeps a cluster's own torch).
# make demo: set up .venv and run the whole lifecycle on the embedded default (recipes/tiny.yaml, CPU).
# make test: set up .venv, then `make lint`, the test suite and the smoke recipe (every stage for a few steps).
# make lint: ruff check of src and tests (the rules: [tool.ruff] in pyproject.toml).
# make test-unit: only the unit tests: functions, math and config checks, no stage runs (pytest -m unit).
# make test-stage: only the tests that run one stage (pytest -m stage).
# make test-recipe: only the end-to-end recipe tests (pytest -m recipe).
# make smoke: the smoke recipe alone: every stage for a few steps (outputs/smoke).
# make faults: the fault-injection tests (kills, signals, SLURM requeue, torn checkpoints, NaN/Inf, corrupt data).
#   Also failed checkpoint writes, recipe resume, run-directory ownership, resume with a changed config.
# make distributed: every training stage under DDP and FSDP on two CPU processes, LoRA and full fine-tuning.
# make vader-report: align the demo's pre-trained model with VADER over 3 seeds, reward/fidelity before and after.
# make compare: VADER, DDPO, Diffusion-DPO, GRPO and NFT from the demo's pre-trained model, 3 seeds, with the judge
#   guard and the resolution experiment (16/32/64 px); report.md + plots. COMPARE_ARGS="--methods VADER GRPO" etc.
# make sweep: VADER K x learning rate from the demo's pre-trained model (Hydra multirun), one table of the jobs.
# make recaption-report: pre-train on the demo's curated clips with raw captions vs recaptions; held-out fidelity.
# make bench: the pre-training step against a plain diffusers loop on the same models and batches (a table).
#   BENCH_ARGS=--gpu for the real-size cases on a CUDA device.
# make gpu-check: everything GPU-only in one command (outputs/gpu-check/gpu-check.md; --dry-run on a CPU).
#   Every stage on CUDA, FSDP2 kill and resume, the real recipes' step time and memory at real shapes, the bench
#   cases; GPU_CHECK_ARGS=--dry-run runs the same code on a CPU at tiny shapes.
# make lock: regenerate requirements.lock (every dependency pinned) from pyproject.toml's ranges.
# make test-latest: the suite in a throwaway .venv-latest with the newest releases the ranges allow (finds drift).
# make clean: remove outputs/, multirun/ and pytest's cache.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch: the CPU wheel here; `make install TORCH=` (empty) keeps a cluster's own torch build.
TORCH ?= torch==2.13.0
PIP_VERSION ?= 26.3
PIP_TOOLS_VERSION ?= 7.7.0
LOCK ?= requirements.lock
TEST_WORKERS ?= 2  # pytest-xdist workers for make test (the suite is mostly single-threaded work)
# LOCK_ARGS for make lock: --upgrade-package transformers moves only that one; empty keeps every pin that still fits.
LOCK_ARGS ?= --upgrade
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
DEMO_DIR ?= outputs/demo
VADER_ARGS ?= reward=vivid  # Hydra overrides for make vader-report
COMPARE_ARGS ?=             # e.g. --queries 960 -- reward=colour
BENCH_ARGS ?=               # e.g. --case tiny_video --steps 50
GPU_CHECK_ARGS ?=           # e.g. --dry-run, --sections real bench, --budget 600
RECAPTION_ARGS ?= --seeds 0 1  # e.g. --seeds 0 -- trainer.max_steps=500
SWEEP_ARGS ?= reward=vivid stage.steps=30 stage.evaluation.num_steps=10 stage.sampling.grad_steps=1,2 stage.optimizer.lr=3e-4,1e-3
SWEEP_DIR ?= multirun/vader-sweep
PRETRAINED := $(DEMO_DIR)/pretrain/export

.PHONY: help install lock test-latest demo test lint test-unit test-stage test-recipe smoke faults distributed vader-report \
	compare sweep recaption-report bench gpu-check clean

install: $(VENV)/.installed

help:
	@sed -n 's/^# \(make [a-z-]*:\)/\1/p' $(firstword $(MAKEFILE_LIST))

# Exact versions from the lock: torch first (constrained by the lock's pins of its own dependencies), then
# every other package at its locked version, then the project itself without resolving anything.
# LOCKED=0 installs the newest releases pyproject.toml's ranges allow instead (make test-latest).
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "pip==$(PIP_VERSION)"
ifeq ($(LOCKED),0)
	$(PY) -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]" $(TORCH)
else
	$(if $(TORCH),$(PY) -m pip install -q -c $(LOCK) "$(TORCH)")
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
endif
	$(PY) -m pip check
	$(PY) -m pip freeze --all --exclude pip --exclude-editable > $(VENV)/installed.txt
	touch $@

lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q "pip==$(PIP_VERSION)" "pip-tools==$(PIP_TOOLS_VERSION)"
	echo "$(TORCH)" > .venv-lock/torch.txt
	CUSTOM_COMPILE_COMMAND="make lock" .venv-lock/bin/pip-compile -q $(LOCK_ARGS) --extra dev --strip-extras \
		--unsafe-package torch -c .venv-lock/torch.txt --no-emit-index-url --no-emit-find-links -o $(LOCK) pyproject.toml

test-latest:
	rm -rf .venv-latest
	$(MAKE) install VENV=.venv-latest LOCKED=0
	@echo "newest releases against $(LOCK) (< locked, > newest):"
	@grep -h '^[a-zA-Z0-9]' $(LOCK) | tr 'A-Z_' 'a-z-' | sort > .venv-latest/locked.txt
	@tr 'A-Z_' 'a-z-' < .venv-latest/installed.txt | sort | diff .venv-latest/locked.txt - | grep '^[<>]' || echo "  no difference"
	.venv-latest/bin/python -m pytest -q

demo: install
	$(PY) -m lifecycle recipe=tiny hydra.run.dir=$(DEMO_DIR)
	@echo "run directory: $(DEMO_DIR) (one folder per stage; eval/report/report.md compares them)"

vader-report: install
	@test -f $(PRETRAINED)/model_index.json || $(MAKE) demo
	$(PY) -m lifecycle.bench.vader_report --pretrained $(PRETRAINED) -- $(VADER_ARGS)

compare: install
	@test -f $(PRETRAINED)/model_index.json || $(MAKE) demo
	$(PY) -m lifecycle.bench.compare --pretrained $(PRETRAINED) --out outputs/compare --resolutions 16 32 64 --resolution-queries 480 $(COMPARE_ARGS)

sweep: install
	@test -f $(PRETRAINED)/model_index.json || $(MAKE) demo
	rm -rf $(SWEEP_DIR)
	$(PY) -m lifecycle -m stage=vader model.pretrained=$(PRETRAINED) $(SWEEP_ARGS) hydra.sweep.dir=$(SWEEP_DIR) \
		trainer.enable_progress_bar=false
	$(PY) -m lifecycle.sweep $(SWEEP_DIR) --sort after/test/reward --desc --keys '*/reward' fit_seconds

recaption-report: install
	@test -f $(DEMO_DIR)/curate/shards/curate.json || $(MAKE) demo
	$(PY) -m lifecycle.bench.recaption --curated $(DEMO_DIR)/curate/shards --out outputs/recaption $(RECAPTION_ARGS)

bench: install
	$(PY) -m lifecycle.bench.train_step $(BENCH_ARGS)

gpu-check: install
	$(PY) -m lifecycle.bench.gpu_check $(GPU_CHECK_ARGS)

test: install
	$(MAKE) lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal
	$(MAKE) smoke

lint: install
	$(VENV)/bin/ruff check src tests

test-unit test-stage test-recipe: test-%: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "$* and not matrix"

faults: install
	$(PY) -m pytest -q -m faults

distributed: install
	$(PY) -m pytest -q -m "" tests/test_distributed.py \
		tests/test_grpo.py::test_grpo_on_two_processes_counts_every_ranks_queries

smoke: install
	rm -rf outputs/smoke
	$(PY) -m lifecycle recipe=smoke hydra.run.dir=outputs/smoke trainer.enable_progress_bar=false

clean:
	rm -rf outputs multirun .pytest_cache
