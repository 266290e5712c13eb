# Two entry points: `make demo` (set up + main job) and `make test` (set up + the default test
# tier, what CI runs); `make test-all` adds the slow tier.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all lint demo docs clean

$(STAMP): pyproject.toml
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); [ "$$free" -ge 7 ] || \
	  echo "warning: $$free GB free here; the venv needs ~6 GB (torch's CUDA build): free disk space if pip fails with 'No space left on device'" >&2
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks docs
	$(BIN)/ruff format --check src tests benchmarks docs

demo: $(STAMP)
	@bash scripts/fetch-fashion-mnist.sh || true
	$(BIN)/adafilter demo

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) build site *.egg-info src/*.egg-info
