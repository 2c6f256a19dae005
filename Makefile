# Two entry points for a fresh Linux machine with Python 3.11 (no conda needed):
#   make demo   set up .venv and run the whole Snakemake DAG on the CPU demo config
#   make test   set up .venv and run the test suite
#   make demo-baselines   the SS-Net, DTC, URPC, SASSNet, CPS, UniMatch, ABD and AD-MT baselines on the
#                         demo's data
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
CORES ?= 2
# CPU torch first: a plain `torch` requirement would pull a multi-GB CUDA build. On a machine whose
# pip does not already serve the CPU wheel, add the CPU index, e.g.
#   make demo TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: demo demo-baselines test lint clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(TORCH) $(TORCH_PIP_ARGS)
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" snakemake --profile profiles/cpu --workflow-profile none --cores $(CORES) \
		--configfile config/demo.yaml
	@echo "report: reports/demo/index.html   tables: results/demo/summary/"

demo-baselines: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" snakemake --profile profiles/cpu --workflow-profile none --cores $(CORES) \
		--configfile config/demo.yaml config/demo_baselines.yaml
	@echo "report: reports/demo_baselines/index.html   tables: results/demo_baselines/summary/"

# The tests run under the reproducible CPU switches (agcl/runtime/numerics.py), as the demo does.
REPRODUCIBLE_CPU_ENV = ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2

test: $(VENV)/.installed
	$(REPRODUCIBLE_CPU_ENV) PATH="$(CURDIR)/$(VENV)/bin:$$PATH" python -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" snakemake --lint --workflow-profile none --configfile config/demo.yaml

clean-demo:
	rm -rf resources/demo results/demo reports/demo logs/demo
	rm -rf results/demo_baselines reports/demo_baselines logs/demo_baselines
