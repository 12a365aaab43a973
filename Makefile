# mammofl: `make demo` runs the main job end to end, `make test` the whole suite.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DEMO_CONFIG ?= configs/demo.json
BASELINE_CONFIG ?= configs/demo-centralised.json

.PHONY: help venv demo demo-centralised experiments test bench clean cassandra-up cassandra-down

help:
	@echo "make demo   - synthesise 3 hospital sites and run a federated DP-SGD simulation with its privacy report"
	@echo "make demo-centralised - pretrain the encoder (autoencoder) and train the centralised baseline"
	@echo "make experiments - run every config in configs/ and configs/privacy-sweep/ and compare them"
	@echo "make test   - run the whole test suite"
	@echo "make bench  - run the benchmarks in bench/ (prints ratios; slow)"
	@echo "make clean  - remove runs/, caches and generated demo data (keeps .venv)"

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(INSTALLED)

venv: $(INSTALLED)

demo: venv
	$(PY) -m mammofl config check $(DEMO_CONFIG)
	$(PY) -m mammofl simulate $(DEMO_CONFIG)

demo-centralised: venv
	$(PY) -m mammofl pretrain $(BASELINE_CONFIG)
	$(PY) -m mammofl train $(BASELINE_CONFIG)

experiments: venv
	$(PY) -m mammofl experiments configs/demo.json configs/federated-nonprivate.json configs/augmentation-off.json configs/privacy-sweep

# The suite needs a real single-node Cassandra; the three-node cluster tests start their own.
test: venv
	scripts/cassandra/cassandra.sh up
	$(PY) -m pytest; status=$$?; scripts/cassandra/cassandra.sh down; exit $$status

bench: venv
	$(PY) bench/encoders.py
	$(PY) bench/store.py
	$(PY) bench/anonymize.py
	$(PY) bench/privacy.py
	$(PY) bench/compression.py

clean:
	rm -rf runs .cache data/synthetic data/pretrained .pytest_cache

cassandra-up:
	scripts/cassandra/cassandra.sh up

cassandra-down:
	scripts/cassandra/cassandra.sh down
