# make sft      set up .venv (if needed) and run SFT on the built-in task
# make test     set up .venv (if needed) and run the test suite (make test-fast: under a minute; make lint)
# make pairs reward dpo ppo   the next stages, each reading the previous one's runs/ folder
# make compare  every stage, the sweeps and the RLHF-vs-DPO report (make compare-quick: a small one)
# make hh       SFT, reward model and DPO on real HH-RLHF dialogues with a small Llama-style model (CPU, minutes)
# make imdb-sample  the DPO paper's IMDb task in small on real reviews: every stage and the comparison
# make gatt     Ghost Attention: a chat model, GAtt data from it, the fine-tune, adherence by turn (runs/gatt)
# make bench    our stages against TRL's trainers (installs the 'bench' extra), runs/bench/bench.md
# ARGS="..."    passed on to a stage's command: make sft ARGS="--overwrite --set train.max_steps=50"
VENV ?= .venv
PYTHON := $(VENV)/bin/python
RLHFDPO := $(VENV)/bin/rlhfdpo
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup sft pairs reward dpo ppo compare compare-quick hh imdb-sample gatt value-head bench test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install_torch.sh
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	bash scripts/install_torch.sh $(PYTHON)
	$(PYTHON) -m pip install -q -e '.[dev]'
	touch $@

sft: setup
	$(RLHFDPO) sft configs/sft.yaml $(ARGS)
	@echo "next: . $(VENV)/bin/activate, then rlhfdpo data pairs configs/pairs.yaml (or make pairs reward dpo ppo, make compare)"

pairs: setup
	$(RLHFDPO) data pairs configs/pairs.yaml $(ARGS)

reward: setup
	$(RLHFDPO) reward configs/reward.yaml $(ARGS)

dpo: setup
	$(RLHFDPO) dpo configs/dpo.yaml $(ARGS)

ppo: setup
	$(RLHFDPO) ppo configs/ppo.yaml $(ARGS)

compare: setup
	$(RLHFDPO) experiment configs/experiment.yaml

compare-quick: setup
	$(RLHFDPO) experiment configs/experiment-quick.yaml

hh: setup
	$(RLHFDPO) experiment configs/hh/experiment.yaml

imdb-sample: setup
	$(RLHFDPO) experiment configs/imdb-sample/experiment.yaml

gatt: setup
	$(RLHFDPO) experiment configs/gatt/experiment.yaml

value-head: setup
	$(RLHFDPO) experiment configs/value-head/experiment.yaml

bench: setup
	$(PYTHON) -m pip install -q -e '.[bench]'
	$(PYTHON) -m benchmarks.run

test: setup
	$(PYTHON) -m pytest

test-fast: setup
	$(PYTHON) -m pytest -m "not slow"

lint: setup
	$(PYTHON) -m ruff check pipeline tests benchmarks scripts
	$(PYTHON) -m ruff format --check pipeline tests benchmarks scripts

clean:
	rm -rf runs .pytest_cache
