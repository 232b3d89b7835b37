# rpxy for Twisted — developer commands. Each bootstraps its own virtualenv in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# sslyze (run by tests/integration/test_tls_sslyze.py) pins cryptography<47, older than the
# proxy needs, so it gets its own virtualenv inside .venv.
SSLYZE := $(VENV)/sslyze/bin/sslyze

.PHONY: test demo bench fuzz soak venv clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

$(SSLYZE): | $(STAMP)
	$(PYTHON) -m venv $(VENV)/sslyze
	$(VENV)/sslyze/bin/pip install -q 'sslyze>=6,<7'

venv: $(STAMP)

## Run the whole test suite (unit + integration through the real rpxy process).
test: $(STAMP) $(SSLYZE)
	@command -v curl >/dev/null || { echo "curl is required: apt-get install -y curl"; exit 1; }
	@# Debian's pebble (ACME test CA, with pebble-challtestsrv) for tests/integration/test_acme.py
	@command -v pebble >/dev/null && command -v pebble-challtestsrv >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends pebble \
	    || echo "pebble is missing (apt-get install pebble): the ACME integration tests will be skipped"; }
	$(PY) -m pytest -q

## Start a demo origin and the proxy in front of it; prints the URLs to try.
demo: $(STAMP)
	$(PY) demo/run.py

bench: $(STAMP)
	$(PY) bench/run.py

## Long runs of hostile traffic: 10 minutes of mixed h1/h2 load with reloads and upstream
## restarts (SOAK_SECONDS), then slowloris for 60 s and slowhttptest -H/-B/-X.
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(PY) -m tests.support.soak --seconds $(SOAK_SECONDS)
	SLOW_CLIENT_SECONDS=60 $(PY) -m pytest -q tests/integration/test_slow_clients.py

## Fuzz every harness in fuzz/ for FUZZ_SECONDS each (default 60); crashes land in fuzz/crashes/.
FUZZ_SECONDS ?= 60
FUZZ_HARNESSES := h1_request upstream_response h2_request paths config
fuzz: $(STAMP)
	@mkdir -p fuzz/crashes
	@for h in $(FUZZ_HARNESSES); do \
	  mkdir -p .fuzz-corpus/$$h; \
	  echo "== $$h ($(FUZZ_SECONDS) s)"; \
	  $(PY) -m fuzz.$$h -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=fuzz/crashes/$$h- \
	    .fuzz-corpus/$$h fuzz/corpus/$$h 2>&1 | grep -E "INITED|Done|Uncaught|Error" || exit 1; \
	done

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .fuzz-corpus
