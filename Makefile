# ttdl: two commands on a fresh machine -- `make all` and `make test`.
# The first use creates .venv/ and installs the pinned requirements from envs/.

PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
CONFIG ?= config/config.yaml
SNAKEMAKE = $(VENV)/bin/snakemake --cores $(CORES) --configfile=$(CONFIG)
STAMP = $(VENV)/.installed

.PHONY: all test venv dry-run lint bench report clean clean-cache help

all: $(STAMP)  ## run the whole experiment matrix (results/summary.md)
	$(SNAKEMAKE) all

test: $(STAMP)  ## run the test suite
	$(VENV)/bin/python -m pytest

venv: $(STAMP)  ## create the virtual environment only

$(STAMP): envs/requirements.txt envs/requirements-nodeps.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r envs/requirements.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps -r envs/requirements-nodeps.txt
	touch $(STAMP)

report: $(STAMP)  ## figures, qualitative panels and the HTML report (results/report.html)
	$(SNAKEMAKE) report_inputs
	$(SNAKEMAKE) report_inputs --report results/report.html

dry-run: $(STAMP)  ## show the jobs `make all` would run
	$(SNAKEMAKE) -n all

lint: $(STAMP)  ## snakemake's own linter
	$(VENV)/bin/snakemake --lint

clean-cache:  ## remove mask-text caches only (prefills and finetuning caches)
	if [ -d results ]; then find results \( -name prefill_cache.pt -o -name cache -type d \) -prune -exec rm -rf {} +; fi

clean:  ## remove results, logs and benchmarks (keeps data and the venv)
	rm -rf results logs benchmarks

help:
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*##/:\t/'

bench: $(STAMP)  ## text step / CE step time and describer calls per pair (prints ratios)
	$(SNAKEMAKE) results/good_ckp/prefill_cache.pt results/vle/1/encoder.pt
	$(VENV)/bin/python scripts/bench.py --config $(CONFIG)
