# Fresh machine: `make demo` runs the whole pipeline on tiny models; `make test` runs the tests.
# Both create .venv from requirements.lock first (about 3 minutes the first time).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export DO_NOT_TRACK ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast test-all demo lint lock clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	@command -v java >/dev/null 2>&1 || { echo "Installing Java (pycocoevalcap needs it)"; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

test: setup
	$(PY) -m pytest -q -m "not slow and not gpu"

# The edit-test loop: no Prefect server, no end-to-end or crash-harness runs, no long trainings.
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not gpu and not e2e and not heavy"

test-all: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m flows.demo

lint: setup
	$(VENV)/bin/ruff check pcm storage flows tests bench

lock:
	$(PY) -m pip freeze --exclude-editable | grep -v '^pcm-synth' > requirements.lock
