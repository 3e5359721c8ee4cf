# The two commands of the README: `make serve` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench clean system-deps package-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/trio-relay serve --config config/trio-relay.toml $(ARGS)

# Debian's Chromium, Prometheus and systemd-analyze for the tests that drive them (installed when
# missing and we are root; otherwise it says what to run and those tests skip).
system-deps:
	@bash .ci/system-deps

test: $(STAMP) system-deps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# What CI checks besides the tests: ruff (lint and format) and mypy --strict.
lint: $(STAMP)
	$(VENV)/bin/ruff check trio_relay tests bench
	$(VENV)/bin/ruff format --check trio_relay tests bench
	$(VENV)/bin/mypy

# The built wheel in a fresh venv without extras, started as the systemd unit would; the unit
# checked with systemd-analyze (CI runs this after the tests).
package-check:
	bash .ci/package-check

# One benchmark scenario (see bench/README.md for the others): make bench PRESET=heavy-batch
PRESET ?= heavy
bench: $(STAMP)
	$(VENV)/bin/python bench/fanout.py --preset $(PRESET)

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
