# The two commands of the README, spelled out.
PYTHON ?= python3

.PHONY: run test

run:
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) server.py

test:
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
	$(PYTHON) -m pytest
