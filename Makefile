# Every target runs from the repository root. `make setup` is safe to repeat.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test bench bench-quick demo serve worker migrate clean

setup: $(STAMP)

# pip takes torch 2.14.1 and torchvision 0.29.1 from the wheels on this machine when they are
# there; elsewhere it downloads them.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m bench.run --seeds 0 1 2

bench-quick: setup
	$(PY) -m bench.run --quick --output bench/output/quick --report bench/output/quick/benchmarks.md

demo: setup
	$(PY) scripts/demo.py

# The embedded default (SQLite and a broker-less Celery transport under var/).
migrate: setup
	$(VENV)/bin/alembic upgrade head

serve: migrate
	$(VENV)/bin/uvicorn app.main:app --host 127.0.0.1 --port 8000

worker: migrate
	$(VENV)/bin/celery -A worker.celery_app worker --loglevel INFO --concurrency 1

clean:
	rm -rf var/ .pytest_cache
