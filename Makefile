# Both targets are idempotent: the venv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test check install clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# The gates first, each failing on any finding: lint, strict types, the import layers (docs/ARCHITECTURE.md).
check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# A real browser for the test of `unbroken report`'s page (tests/cli/test_report.py): Debian's chromium,
# installed only as root where apt-get exists; never a failure (the test skips, saying why). Cheap on
# re-runs: nothing when chromium is on PATH, and one failed try is remembered (rm $(NO_BROWSER) to retry).
NO_BROWSER := $(VENV)/.no-chromium
browser:
	@if command -v chromium >/dev/null 2>&1 || [ -f $(NO_BROWSER) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (Debian package) for the report's browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || { mkdir -p $(VENV) && touch $(NO_BROWSER); \
	         echo "note: chromium could not be installed; the report's browser test will be skipped"; }; \
	else echo "note: no chromium (as root, apt-get install chromium); the report's browser test will be skipped"; fi

test: check browser
	$(PY) -m pytest -q -n 2

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
