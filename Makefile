# mammofl: `make demo` runs the main job end to end, `make test` the whole suite.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DEMO_CONFIG ?= configs/demo.json
BASELINE_CONFIG ?= configs/demo-centralised.json
# The demo's hospitals: synthetic exports carrying (fake) PHI, then what `mammofl anonymize`
# makes of them; every demo config trains on the de-identified copy, behind the gate.
DEMO_DATA ?= data/demo
DEMO_SECRET ?= secrets/anonymize.key

.PHONY: help venv demo-data demo demo-federation serve demo-centralised experiments test bench clean cassandra-up cassandra-down

help:
	@echo "make demo   - synthesise 3 hospital sites, de-identify them, train one model with DP-SGD (Flower simulation), compress it"
	@echo "make demo-federation - the demo as real processes: a TLS SuperLink and one SuperNode per site"
	@echo "make serve  - the REST service and web front end (http://127.0.0.1:8000/) on the demo's model"
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

# CBIS-DDSM scale: about 1,000 training images a site (its ~3,100 images split three ways).
DEMO_PER_SITE := 1250
demo-data: venv
	@if test -f $(DEMO_DATA)/raw/manifest.json && ! grep -q '"per_site": $(DEMO_PER_SITE),' $(DEMO_DATA)/raw/manifest.json; then \
		echo "$(DEMO_DATA) holds demo data of another size (not $(DEMO_PER_SITE) images a site): run make clean first" >&2; exit 2; fi
	test -f $(DEMO_DATA)/raw/manifest.json || $(PY) -m mammofl data synth --out $(DEMO_DATA)/raw \
		--sites 3 --per-site $(DEMO_PER_SITE) --size 192 --seed 0 --lesion-contrast 1.5
	$(PY) -m mammofl anonymize $(DEMO_DATA)/raw $(DEMO_DATA)/deidentified --secret-file $(DEMO_SECRET) \
		$$(test -f $(DEMO_SECRET) || echo --create-secret)
	for site in $(DEMO_DATA)/raw/site-*; do \
		mkdir -p $(DEMO_DATA)/deidentified/$$(basename $$site) && cp -r $$site/csv $(DEMO_DATA)/deidentified/$$(basename $$site)/; \
	done

# The encoder every federated demo config trains a head on: wavelet scattering, standardised with
# statistics measured on a public stand-in set (no site image).
DEMO_ENCODER := data/pretrained/demo-public-scattering.pt
$(DEMO_ENCODER): $(INSTALLED)
	$(PY) -m mammofl pretrain $(DEMO_CONFIG)

demo: demo-data $(DEMO_ENCODER)
	$(PY) -m mammofl config check $(DEMO_CONFIG)
	$(PY) -m mammofl simulate $(DEMO_CONFIG)

# The same job as real processes on loopback: a TLS SuperLink with node authentication and one
# `mammofl site run` SuperNode per site (certificates and enrolment made by `federation up`).
demo-federation: demo-data $(DEMO_ENCODER)
	$(PY) -m mammofl federation up --dir runs/federation --local-sites $(DEMO_CONFIG) & up=$$!; \
	$(PY) -m mammofl federation run $(DEMO_CONFIG) --dir runs/federation --wait 120; status=$$?; \
	kill $$up; wait $$up; exit $$status

# The REST service and web front end on the newest demo run's serving artefacts, with a new
# admin key for site-01 printed once.
serve: venv
	@serving=$$(ls -td runs/*-demo-*/serving 2>/dev/null | head -1); \
	test -n "$$serving" || { echo "no demo run with serving artefacts: run make demo first" >&2; exit 2; }; \
	test -f secrets/keyring.json || $(PY) -m mammofl keys create; \
	test -f $(DEMO_SECRET) || { echo "$(DEMO_SECRET) is missing: run make demo first" >&2; exit 2; }; \
	MAMMOFL_API_MODEL_DIR=$$serving $(PY) -m mammofl api-keys create --site site-01 --role admin --name demo-admin; \
	MAMMOFL_API_MODEL_DIR=$$serving $(PY) -m mammofl serve

demo-centralised: demo-data
	$(PY) -m mammofl pretrain $(BASELINE_CONFIG)
	$(PY) -m mammofl train $(BASELINE_CONFIG)

experiments: demo-data $(DEMO_ENCODER)
	$(PY) -m mammofl experiments configs/demo.json configs/federated-nonprivate.json configs/augmentation-multiplicity.json configs/privacy-sweep

# The suite needs a real single-node Cassandra (the three-node cluster tests start their own)
# and Debian's Chromium for the web front end's tests (scripts/browser.sh installs it).
test: venv
	scripts/browser.sh
	scripts/cassandra/cassandra.sh up
	$(PY) -m pytest; status=$$?; scripts/cassandra/cassandra.sh down; exit $$status

bench: venv demo-data $(DEMO_ENCODER)
	$(PY) bench/utility.py --config $(DEMO_CONFIG)
	$(PY) bench/encoders.py
	$(PY) bench/store.py
	$(PY) bench/deidentification.py
	$(PY) bench/privacy.py
	$(PY) bench/compression.py
	$(PY) bench/rest_service.py
	$(PY) bench/secure_aggregation.py
	$(PY) bench/federation.py

clean:
	rm -rf runs .cache data/synthetic data/demo data/public data/pretrained .pytest_cache

cassandra-up:
	scripts/cassandra/cassandra.sh up

cassandra-down:
	scripts/cassandra/cassandra.sh down
