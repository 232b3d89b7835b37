# rpxy for Twisted — developer commands. Each bootstraps its own virtualenv in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench venv clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

## Run the whole test suite (unit + integration through the real rpxy process).
test: $(STAMP)
	@command -v curl >/dev/null || { echo "curl is required: apt-get install -y curl"; exit 1; }
	$(PY) -m pytest -q

## Start a demo origin and the proxy in front of it; prints the URLs to try.
demo: $(STAMP)
	$(PY) demo/run.py

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
