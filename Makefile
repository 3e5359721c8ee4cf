# The two commands of the README: `make serve` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: serve test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/trio-relay serve --config config/trio-relay.toml $(ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# One benchmark scenario (see bench/README.md for the others): make bench PRESET=heavy-batch
PRESET ?= heavy
bench: $(STAMP)
	$(VENV)/bin/python bench/fanout.py --preset $(PRESET)

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
