# `make demo` runs the main job on the embedded model organism; `make test` runs the tests.
# Both create .venv on first use: the CPU build of torch, then msd with its test extras.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,utility,baselines]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/msd demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
