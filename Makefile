# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what they need; a stamp makes the second run quick.

SHELL  := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CUDA builds of torch/fbgemm only where a GPU answers; the CPU builds otherwise.
DEVICE := $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
DATA   ?= synthetic
PYTEST_ARGS ?=

.PHONY: install demo test bench clean redis-server

install: $(STAMP)

$(STAMP): pyproject.toml infra/constraints-$(DEVICE).txt infra/fbgemm_stub.py
	$(PYTHON) -m venv $(VENV)
	$(PYTHON) infra/fbgemm_stub.py build/wheels
	@echo "installing into $(VENV) for $(DEVICE) (a few minutes the first time)"
	set -o pipefail; PIP_FIND_LINKS="$${PIP_FIND_LINKS:+$$PIP_FIND_LINKS }$(CURDIR)/build/wheels" \
	  $(BIN)/pip install --quiet -c infra/constraints-$(DEVICE).txt -e '.[features,serving,eval,dev]' \
	  2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	$(BIN)/pip check
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/recsys demo --data $(DATA)

test: $(STAMP) redis-server
	$(BIN)/lint-imports --no-cache  # the layers in pyproject.toml: recsys < features < streaming < serving, offline_eval < commands
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/update_throughput.py
	$(BIN)/python bench/stream_throughput.py
	$(BIN)/python bench/serving_load.py

# The worker-group test runs against a real Redis online store too: its server binary comes
# from the system's packages where we may install them (root with apt-get); elsewhere that
# variant says it is skipped and why.
redis-server:
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get install -y -q redis-server >/dev/null 2>&1 && echo "installed redis-server"; } \
	  || echo "redis-server not installed: the Redis variant of tests/test_worker_group.py will be skipped"

clean:
	rm -rf $(VENV) build runs
