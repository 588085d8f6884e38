# ttdl: two commands on a fresh machine -- `make all` and `make test`.
# The first use creates .venv/ and installs the pinned requirements from envs/.

PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
CONFIG ?= config/config.yaml
GPUS ?=
SNAKEMAKE = $(VENV)/bin/snakemake --cores $(CORES) --configfile=$(CONFIG) $(if $(GPUS),--resources=gpu=$(GPUS))
STAMP = $(VENV)/.installed

# One workflow run per checkout, and no manual step after a kill. $(call locked,CMDS) runs
# the shell commands CMDS holding a lock on $(LOCK) (flock(1), non-blocking): a second
# `make all` in this checkout is refused at once, with the message below. The recipe's shell
# and Snakemake hold the lock (Snakemake's jobs do not), so it lasts as long as the run and
# `kill -9` of the run frees it. Holding it, no other run started by make is alive, so a lock
# Snakemake left in .snakemake/locks is stale (a killed run's): `--unlock` clears it first.
# profiles/default adds --rerun-incomplete: the rerun redoes what the killed run left unfinished.
LOCK = .snakemake/make.lock
BUSY = make: another run of the workflow is still running in this checkout (it holds $(LOCK): \
make all, report, bench or download-voc); wait for it to end, or stop it, then run again
locked = command -v flock >/dev/null || { echo "make: needs flock(1) (util-linux)" >&2; exit 1; }; \
	mkdir -p .snakemake && { flock --nonblock 9 || { echo "$(BUSY)" >&2; exit 1; }; \
	if [ -n "$$(ls -A .snakemake/locks 2>/dev/null)" ]; then \
	echo "make: clearing Snakemake locks left by a killed run"; $(SNAKEMAKE) --unlock; fi && $(1); } 9>>$(LOCK)

.PHONY: all test test-fast venv dry-run lint bench report clean clean-cache help download-voc docker-up docker-down docker-pull docker-exec

all: $(STAMP)  ## run the whole experiment matrix (results/summary.md); rerun after any kill
	$(call locked,$(SNAKEMAKE) all)

# Test files run side by side in CORES processes (pytest-xdist); a file's tests stay in one
# process, so module fixtures are built once.
PYTEST = $(VENV)/bin/python -m pytest -n $(CORES) --dist loadfile

test: $(STAMP)  ## run the test suite (all of it, the slow end-to-end workflow runs included)
	$(PYTEST)

test-fast: $(STAMP)  ## the test suite without the `slow` end-to-end workflow runs (for iterating)
	$(PYTEST) -m "not slow"

venv: $(STAMP)  ## create the virtual environment only

# The project itself is installed editable (pyproject.toml): scripts, the Snakefile and the
# tests import `ttdl` like any package; no file edits sys.path.
$(STAMP): envs/requirements.txt envs/requirements-nodeps.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r envs/requirements.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps -r envs/requirements-nodeps.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation --editable .
	touch $(STAMP)

report: $(STAMP)  ## figures, qualitative panels and the HTML report (results/report.html)
	$(call locked,$(SNAKEMAKE) report_inputs && $(SNAKEMAKE) report_inputs --report results/report.html)

download-voc: $(STAMP)  ## opt-in (needs a network): download VOC 2012 to resources/VOCdevkit/VOC2012
	$(call locked,$(VENV)/bin/snakemake --cores 1 download_voc)

dry-run: $(STAMP)  ## show the jobs `make all` would run
	$(SNAKEMAKE) -n all

lint: $(STAMP)  ## snakemake --lint, snakefmt --check and ruff check (config in pyproject.toml)
	$(VENV)/bin/snakemake --lint
	$(VENV)/bin/snakefmt --check workflow
	$(VENV)/bin/ruff check

clean-cache:  ## remove mask-text caches only (prefills and finetuning caches)
	if [ -d results ]; then find results \( -name prefill_cache.pt -o -name cache -type d \) -prune -exec rm -rf {} +; fi

clean:  ## remove results, logs and benchmarks (keeps data and the venv)
	rm -rf results logs benchmarks

# ---- docker: the app + its Ollama server (docker/compose.yaml) ----
# GPUs for the pair: every GPU nvidia-smi lists; DOCKER_GPUS=0,1 picks, DOCKER_GPUS= runs on CPU.
DOCKER_GPUS ?= $(shell nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, -)
COMPOSE = TTDL_USER=$$(id -un) TTDL_UID=$$(id -u) TTDL_GID=$$(id -g) TTDL_PROJECT=ttdl-$$(id -u) \
	TTDL_GPUS=$(DOCKER_GPUS) docker compose -f docker/compose.yaml $(if $(strip $(DOCKER_GPUS)),,-f docker/compose.cpu.yaml)

docker-up:  ## build the image as you and start it with its Ollama service (DOCKER_GPUS=0,1)
	$(COMPOSE) up -d --build

docker-down:  ## stop and remove the pair (the Ollama model volume is kept)
	$(COMPOSE) down

docker-pull:  ## fetch the describer model into the Ollama volume (OLLAMA_PULL_MODEL=...)
	$(COMPOSE) run --rm ollama-pull

docker-exec:  ## run CMD in the app container, e.g. make docker-exec CMD='make all CONFIG=config/docker.yaml'
	$(COMPOSE) exec ttdl $(or $(CMD),bash)

help:
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*##/:\t/'

bench: $(STAMP)  ## text step / CE step time and describer calls per pair (prints ratios)
	$(call locked,$(SNAKEMAKE) results/good_ckp/prefill_cache.pt results/vle/1/encoder.pt)
	$(VENV)/bin/python scripts/bench.py --config $(CONFIG)
