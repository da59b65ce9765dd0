# make demo: set up .venv and run the embedded default (pre-training on synthetic video, CPU).
# make test: set up .venv, run the test suite and the smoke recipe (every stage for a few steps).
# make tiny: the whole lifecycle on the embedded default (recipes/tiny.yaml).
# make vader-report: align the demo's export with VADER over 3 seeds, print reward/fidelity before and after.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
DEMO_DIR ?= outputs/demo
VADER_ARGS ?= reward=vivid  # Hydra overrides for make vader-report

.PHONY: install demo test smoke tiny vader-report clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH)"
	touch $@

demo: install
	$(PY) -m lifecycle stage=pretrain hydra.run.dir=$(DEMO_DIR) trainer.resume=last
	@echo "run directory: $(DEMO_DIR) (checkpoints/, export/, metrics.csv, samples/final/)"

vader-report: install
	@test -f $(DEMO_DIR)/export/model_index.json || $(MAKE) demo
	$(PY) -m lifecycle.bench.vader_report --pretrained $(DEMO_DIR)/export -- $(VADER_ARGS)

test: install
	$(PY) -m pytest -q
	$(MAKE) smoke

smoke: install
	rm -rf outputs/smoke
	$(PY) -m lifecycle recipe=smoke hydra.run.dir=outputs/smoke trainer.enable_progress_bar=false

tiny: install
	$(PY) -m lifecycle recipe=tiny hydra.run.dir=outputs/tiny

clean:
	rm -rf outputs multirun .pytest_cache
