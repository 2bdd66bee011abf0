# `make demo` and `make test` create or update the virtual environment in .venv themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# On the project's machines these two wheels lie on local disk; elsewhere pip fetches them.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-all clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/robustmargin reproduce --preset quick --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

clean:
	rm -rf runs $(VENV)
