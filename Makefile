# vlmforge make targets. CONFIG= and TARGET= override what `make engines` builds.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CONFIG  ?= configs/default.yaml
TARGET  ?=
JOBS    ?= 2
TARGET_ARGS := $(foreach t,$(TARGET),--target $(t))

.PHONY: setup engines farm package plan test test-all test-scale lint clean

$(BIN)/vlmforge: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	# torch first, by the exact pin that resolves to the CPU build (any other pulls CUDA wheels)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -c constraints.txt -e '.[toolchain,farm,dev]'
	# type stubs for the full-TensorRT path; --no-deps: its `tensorrt` dependency is a stub
	# package that downloads from a host outside the registries and cannot install here
	$(BIN)/pip install --no-deps tensorrt-stubs==10.13.0.35.1
	@touch $@

setup: $(BIN)/vlmforge

engines: setup
	$(BIN)/vlmforge build $(CONFIG) $(TARGET_ARGS) -j $(JOBS)

# the build farm on this machine: a local Ray cluster (a head and 2 workers) builds CONFIG, then stops
farm: setup
	$(BIN)/python -m pipeline.farm_cluster --workers 2 -- build $(CONFIG) $(TARGET_ARGS)

# one device archive per target: artifacts/packages/<config>-<target>-<key16>.tar
package: setup
	$(BIN)/vlmforge package $(CONFIG) $(TARGET_ARGS) -j $(JOBS)

plan: setup
	$(BIN)/vlmforge plan $(CONFIG)

# -ra: the summary names every skipped test and why (e.g. the browser test on a machine with
# no Chromium; VLMFORGE_REQUIRE_BROWSER=1, as .ci/run sets it, turns that skip into a failure)
test: setup
	$(BIN)/pytest -q -ra -m "not slow"

test-all: setup
	$(BIN)/pytest -q -ra -m "not scale"

# released-width models built end to end (tests/test_scale_e2e.py): ~20 GB of disk, ~30 min
test-scale: setup
	$(BIN)/pytest -q -ra -s -m scale

lint: setup
	$(BIN)/ruff check pipeline stages tests bench
	$(BIN)/mypy pipeline stages bench

clean:
	rm -rf artifacts/cache artifacts/runs artifacts/out artifacts/locks artifacts/timing-caches
