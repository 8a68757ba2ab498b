# One command to run the daemon, one to run the tests; each does its own set-up.
PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not ((3,11) <= sys.version_info[:2] < (3,14)))' 2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench venv clean

$(STAMP): pyproject.toml requirements.lock
	@test -n "$(PYTHON)" || { echo "need Python >=3.11,<3.14 on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

# The try-it-out daemon serves the diagnostic kinds the README's examples use.
run: $(STAMP)
	NURSERYD_DIAGNOSTICS=$${NURSERYD_DIAGNOSTICS:-1} $(VENV)/bin/nurseryd serve

# The dashboard's browser tests drive Debian's chromium (playwright never downloads one).
test: $(STAMP)
	command -v chromium >/dev/null || { SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get -o DPkg::Lock::Timeout=600 update -q && DEBIAN_FRONTEND=noninteractive \
		$$SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends chromium; }
	$(VENV)/bin/ruff check daemon tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check daemon tests bench
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) var
