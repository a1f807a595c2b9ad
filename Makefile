# tinyps: every target creates .venv when it is missing and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-slow bench lint proto docs notebooks notebooks-html clean

# Stamps record which install a venv already has, so targets re-install only
# when pyproject.toml changes.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.runtime

demo: $(VENV)/.runtime
	$(BIN)/tinyps launch --servers 2 --workers 2 --mode sync --dataset digits

$(VENV)/.notebooks: pyproject.toml $(VENV)/.dev
	$(BIN)/python -m pip install -q -e '.[dev,notebooks]'
	touch $@

# The notebooks run top to bottom as part of the tests: a failing cell fails the build.
test: $(VENV)/.dev
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q --nbmake --nbmake-timeout=300 notebooks

test-slow: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m slow

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/bench_kernels.py
	$(BIN)/python benchmarks/bench_transport.py
	$(BIN)/python benchmarks/bench_precision.py
	$(BIN)/python benchmarks/bench_privacy.py
	$(BIN)/python benchmarks/bench_models.py
	$(BIN)/python benchmarks/bench_cluster.py
	$(BIN)/python benchmarks/bench_scaling.py

lint: $(VENV)/.dev
	$(BIN)/ruff check .

proto: $(VENV)/.dev
	$(BIN)/python -m grpc_tools.protoc -Ips=proto --python_out=. --grpc_python_out=. \
		--pyi_out=. proto/ps.proto

# docs/cli.md from the argument parser (tests/test_clidoc.py fails when it is stale).
docs: $(VENV)/.runtime
	$(BIN)/python -m tinyps.clidoc > docs/cli.md

notebooks: $(VENV)/.notebooks
	$(BIN)/jupyter lab notebooks

# Executed copies, with every output and plot, in build/notebooks/.
notebooks-html: $(VENV)/.notebooks
	mkdir -p build/notebooks
	$(BIN)/jupyter nbconvert --to html --execute --output-dir build/notebooks notebooks/*.ipynb

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
