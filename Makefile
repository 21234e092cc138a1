# The two commands of the README, spelled out. They install the pinned, hashed versions of
# the lock files; requirements*.txt say what the project needs (refresh: make lock).
PYTHON ?= python3

.PHONY: run test lock

run:
	$(PYTHON) -m pip install -q --require-hashes -r requirements.lock
	$(PYTHON) server.py

test:
	$(PYTHON) -m pip install -q --require-hashes -r requirements-dev.lock
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
	$(PYTHON) -m pytest

# Re-pin every dependency (and its hashes) to the newest versions requirements*.txt allow.
# pip-compile leaves out what only an older Python needs (redis wants async-timeout before 3.11.3):
# add it back by hand with its marker and hashes; tests/test_deploy.py says if a lock file lacks one.
lock:
	$(PYTHON) -m pip install -q pip-tools
	$(PYTHON) -m piptools compile -q --upgrade --generate-hashes --strip-extras --no-emit-index-url \
		--no-emit-find-links --output-file requirements.lock requirements.txt
	$(PYTHON) -m piptools compile -q --upgrade --generate-hashes --strip-extras --no-emit-index-url \
		--no-emit-find-links --output-file requirements-dev.lock requirements-dev.txt
