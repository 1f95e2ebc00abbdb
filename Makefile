# Quick start (README): `make book` runs the whole book on the embedded default (`quarto render`, the
# book's own command, once Quarto is installed); `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= default
# The CPU wheel of torch that the set-up pins; GPU users install their own torch into the venv first.
TORCH_SPEC ?= torch==2.13.0
# A Quarto assembled by `make quarto` lives in .cache/quarto; one already on PATH is used as it is.
QUARTO_INSTALLER ?= ../shared/tools/quarto/install.sh
export PATH := $(CURDIR)/.cache/quarto/bin:$(PATH)

.PHONY: env chromium quarto quarto-if-available book test test-slow bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[book,test]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

env: $(VENV)/.installed

# The book of PROFILE in _book/$(PROFILE)/: `quarto render --profile $(PROFILE)` (its pre-render executes the
# chapters that changed, with this venv's Python); without Quarto, the Jupyter Book fallback.
book: env quarto-if-available
	@if command -v quarto >/dev/null; then QUARTO_PYTHON=$(abspath $(PY)) quarto render --profile $(PROFILE); \
	else echo "quarto is not installed (https://quarto.org/docs/get-started/): rendering the Jupyter Book fallback into _book/$(PROFILE)/"; \
	  $(PY) -m c2srepro.book run --profile $(PROFILE) --renderer jupyter-book; fi

# The browser test drives the system Chromium (Playwright's own browser download needs the internet).
chromium:
	@command -v chromium >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || \
	  (echo "the browser test needs Chromium: sudo apt-get install -y chromium" >&2; exit 1)

# Quarto from the offline installer where it is present; `make book` goes on without it.
quarto-if-available:
	@command -v quarto >/dev/null || test ! -f $(QUARTO_INSTALLER) || \
	  bash $(QUARTO_INSTALLER) $(CURDIR)/.cache/quarto | tail -n 1 >/dev/null

# The book renders with Quarto (the tests render a toy book with it and with the Jupyter Book fallback).
quarto:
	@command -v quarto >/dev/null || \
	  (test -f $(QUARTO_INSTALLER) && bash $(QUARTO_INSTALLER) $(CURDIR)/.cache/quarto | tail -n 1) || \
	  (echo "the book renders with Quarto: install it (https://quarto.org/docs/get-started/)" >&2; exit 1)

test: env chromium quarto
	$(PY) -m pytest -q

test-slow: env
	$(PY) -m pytest -q -m slow

bench: env
	for f in bench/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf results _book book _variables.yml
