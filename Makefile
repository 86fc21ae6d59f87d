# Fresh machine: `make demo` runs the whole pipeline on the toy world's trained toy models (about 4 minutes
# of stages on 2 cores, measured in README's toy-world section, plus the Prefect server's start); `make test` runs the tests.
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
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	$(PY) -m pip install -q --no-cache-dir -r requirements.lock
	$(PY) -m pip install -q --no-cache-dir --no-deps -e .
	touch $@

# Test files run on TEST_WORKERS pytest-xdist workers, each file whole on one worker (module fixtures,
# one Prefect server for the whole run), the longest first (tests/conftest.py orders them);
# TEST_WORKERS=0 runs them in this process. Three on two cores: the long files wait much of their time
# (for a lease to expire, a server, a worker's poll), and a third worker fills those waits.
TEST_WORKERS ?= 3
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: setup
	$(PYTEST) -m "not slow and not gpu"

# The edit-test loop: no Prefect server, no end-to-end or crash-harness runs, no long trainings.
test-fast: setup
	$(PYTEST) -m "not slow and not gpu and not e2e and not heavy"

test-all: setup
	$(PYTEST)

demo: setup
	$(PY) -m flows.demo

lint: setup
	$(VENV)/bin/ruff check pcm storage flows tests bench

lock:
	$(PY) -m pip freeze --exclude-editable | grep -v '^pcm-synth' > requirements.lock
