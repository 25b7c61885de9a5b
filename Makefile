# The two commands a newcomer needs: `make demo` and `make test`. Both create the venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-proxy test test-all lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m cluster.demo

# Proxy-Tuning's arms in the miniature world with subjects (about 75 minutes from scratch, 15 cached).
demo-proxy: $(STAMP)
	$(BIN)/python -m cluster.demo --config jobs/configs/pipeline/proxy_world.yaml --run-dir runs/proxy --no-serve --timeout 7200

# Every run gets a fresh, empty TMPDIR, as on a machine where Ray has never run: state left in /tmp
# (Ray's address file, session dirs) cannot make a run pass that would fail on a fresh machine.
# pytest exits 5 when it collects no test: treat that as a failure of the suite, not a pass.
test: $(STAMP)
	@tmp=$$(mktemp -d /tmp/sar-test-XXXXXX); echo "TMPDIR=$$tmp (fresh for this run)"; \
	  TMPDIR=$$tmp $(BIN)/python -m pytest -q --timeout=900 $(ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing the run"; fi; \
	  if [ $$rc -eq 0 ]; then rm -rf $$tmp; fi; exit $$rc

test-all: $(STAMP)
	@tmp=$$(mktemp -d /tmp/sar-test-XXXXXX); TMPDIR=$$tmp $(BIN)/python -m pytest -q --timeout=1800 -m "" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs .cache/pytest
