# streamrec: `make demo` and `make test` work on a fresh clone; nothing else needs installing by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The event stage's modules that `streamrec native build` compiles with mypyc (streamrec/native.py).
NATIVE_SRC := streamrec/records.py streamrec/serde.py streamrec/state.py streamrec/triggers.py \
	streamrec/windows.py streamrec/validation.py streamrec/partitioner.py streamrec/abuse.py
NATIVE := streamrec/_native.json

.PHONY: install native native-clean demo test test-all test-node test-slow test-reliability lint typecheck bench quality lock docs clean

install: $(STAMP) $(NATIVE)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Optional: without a C compiler the build says so and the sources run (the leading - keeps make going).
$(NATIVE): $(STAMP) $(NATIVE_SRC)
	-$(BIN)/streamrec native build

native: $(STAMP)
	$(BIN)/streamrec native build

native-clean: $(STAMP)
	$(BIN)/streamrec native clean

demo: install
	$(BIN)/streamrec demo

# Lint, import contracts, types, then unit tests, contracts and the integration suite against a real embedded
# broker; slow suites excluded. The compiled modules' own tests run once more on their Python sources.
NATIVE_TESTS := tests/unit/test_serde_properties.py tests/unit/test_state.py tests/unit/test_state_cache.py \
	tests/unit/test_triggers.py tests/unit/test_windows.py tests/unit/test_abuse.py
test: install lint typecheck
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m "not slow and not node and not reliability" -q --durations=15
	$(BIN)/python -m pytest -q --pure-python $(NATIVE_TESTS)

# A Node.js backend and reader (kafkajs + avsc, tests/node) written from docs/contracts.md, against a real
# worker: needs Node.js and the npm registry.
test-node: install
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	$(BIN)/python -m pytest -m node -q

# The bench harness end to end (tests/integration/test_bench_run.py, a minute) and training on real data
# (tests/slow: Amazon Beauty from ../shared/data, the quality benchmark's recipe), about
# 45 minutes on 2 cores: run it on a quiet machine, since its training is time-limited.
test-slow: install
	$(BIN)/python -m pytest -m slow -q

# Faults, fuzz and abuse against a real broker and real worker processes (tests/reliability,
# docs/reliability.md): a broker restart under load, scaling out and in with a kill -9, a slow consumer's
# memory and backlog; also a whole worker over TLS and backfill partitions following a rebalance (moved out
# of `make test` for its 15 minutes). Minutes on 2 cores; benchmarks/reliability.py prints the figures.
test-reliability: install
	$(BIN)/python -m pytest -m reliability -q

lint: install
	$(BIN)/ruff check streamrec streams models tests benchmarks
	$(BIN)/ruff format --check streamrec streams models tests benchmarks

typecheck: install
	$(BIN)/mypy streamrec streams models

bench: install
	$(BIN)/streamrec bench --json

quality: install
	$(BIN)/python benchmarks/quality.py

# docs/settings.md from the settings class (tests/unit/test_readme.py keeps the two equal)
docs: install
	$(BIN)/python -c "from streamrec.settings import settings_reference as r; open('docs/settings.md', 'w').write(r())"

lock:
	$(BIN)/python -m pip freeze --exclude-editable | sed '1i # Versions resolved together on Python 3.11; regenerate with `make lock`.' > requirements.lock

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
