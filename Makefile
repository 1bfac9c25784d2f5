# dps-mqtt: `make demo` and `make test` install what they need first (Debian packages, .venv).
# GNU make. Variables: PYTHON (interpreter .venv is built from), EXTRAS (pip extras in .venv),
# PYTEST_ARGS (extra pytest arguments), DEMO_ARGS (extra arguments for the demo),
# BENCH_ARGS (extra arguments for benchmarks/run.py, e.g. --smoke or --only provisioning).

PYTHON ?= python3
VENV = .venv
SDK_VENV = .venv-azure-sdk
EXTRAS ?= dev,emulator,tpm
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=
BENCH_EXTRAS = dev,emulator,tpm,bench

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
# Steps depend on each other's side effects (apt before venv); never run them in parallel.
.NOTPARALLEL:
.DEFAULT_GOAL := test

# The stamp's name changes with pyproject.toml's content and EXTRAS, so either change reinstalls.
VENV_HASH := $(shell { cat pyproject.toml; echo '$(EXTRAS)'; } | sha256sum | cut -c1-16)
VENV_STAMP = $(VENV)/.installed-$(VENV_HASH)

.PHONY: venv system-deps sdk-venv test demo bench lint typecheck clean

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml | system-deps
	@echo "==> building $(VENV) with extras [$(EXTRAS)]"
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(VENV)/bin/python -m pip install --disable-pip-version-check --progress-bar off \
		-e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

system-deps:
	@PYTHON='$(PYTHON)' bash scripts/install-system-deps.sh

sdk-venv:
	@PYTHON='$(PYTHON)' SDK_VENV='$(SDK_VENV)' bash scripts/sdk-venv.sh

# The SDK virtualenv is built here, before pytest, so that no single test pays for it under its
# per-test timeout; tests/sdk_support.py would otherwise build it on first use.
test: system-deps venv sdk-venv
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)
	$(VENV)/bin/mypy
	$(VENV)/bin/ruff check .

demo: system-deps venv
	$(VENV)/bin/python -m dps_mqtt.demo $(DEMO_ARGS)

# Benchmarks (benchmarks/README.md): the same .venv with the bench extra (matplotlib) added, and the
# SDK virtualenv for the footprint comparison; the run starts and stops mosquitto, the emulator
# and swtpm itself, writes benchmarks/results/ and updates the table in benchmarks/README.md.
bench: system-deps sdk-venv
	$(MAKE) --no-print-directory venv EXTRAS=$(BENCH_EXTRAS)
	$(VENV)/bin/python -m benchmarks.run $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

typecheck: venv
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(SDK_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist
	find . -name '*.egg-info' -prune -exec rm -rf {} +
	find . -name __pycache__ -prune -exec rm -rf {} +
