VENV   ?= .venv
PY     := $(VENV)/bin/python
# Idle OpenMP threads sleep instead of spinning: on shared cores spinning threads slow
# every small torch operation by an order of magnitude.
export OMP_WAIT_POLICY ?= PASSIVE
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/secateurs demo $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m mypy src

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
