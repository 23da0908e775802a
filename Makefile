# Two commands on a fresh clone: `make demo` and `make test`.
# The venv is (re)installed only when the packaging files or the C core change.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CORE   := $(wildcard sage_queue/_core/*.c sage_queue/_core/*.h)
PYTEST_ARGS ?=

.PHONY: demo test lint kit bench soak clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py $(CORE)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "sage-queue: installing into $(VENV) with its extras (log: $(VENV)/install.log)"
	@{ $(PY) -m pip install --upgrade pip "setuptools>=77" && $(PY) -m pip install -e ".[all,test]"; } > $(VENV)/install.log 2>&1 \
		|| { tail -n 40 $(VENV)/install.log; echo "sage-queue: install failed; full log in $(VENV)/install.log"; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sage-queue demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint $(STAMP)
	$(PY) -m pytest -n auto --dist loadgroup $(PYTEST_ARGS)

# The scorecard: the kit on every built-in backend and on the anchors (multiprocessing's queues,
# faster-fifo, ray.util.queue, queue.Queue), clause by clause, into docs/scorecard.{md,json}.
kit: $(STAMP)
	$(PY) -m conformance --scorecard --scorecard-dir docs

bench: $(STAMP)
	$(VENV)/bin/sage-queue bench --backend all

clean:
	rm -rf $(VENV) build *.egg-info sage_queue/*.so .pytest_cache .mypy_cache .hypothesis

# The long runs: thousands of kills per scenario and backend, long fuzzing of corrupt segments
# (Python and C under ASan), minutes of stops. Every test here also runs short in `make test`.
SOAK_TESTS := tests/test_sage.py tests/test_shm_processes.py tests/test_faults_harness.py \
	tests/test_sage_corruption.py tests/test_shm_fuzz.py tests/test_core_c.py
soak: $(STAMP)
	SAGE_SOAK=1 SAGE_SOAK_KILLS=$${SAGE_SOAK_KILLS:-1000} $(PY) -m pytest -s --timeout=3600 $(SOAK_TESTS)
