# Quick start on a fresh Debian/Ubuntu machine:
#   make run    set everything up, then run the daemon on built-in defaults
#   make test   set everything up, then run ruff, mypy and the whole test suite
#
# Set-up is idempotent: apt packages are installed only when missing (needs root or sudo),
# the virtualenv is (re)built only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Build and run time: pymilter compiles against libmilter; the tests start a real DNS server.
APT_PACKAGES := gcc python3-dev python3-venv libmilter-dev libmilter1.0.1 dnsmasq-base pebble
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test setup system-packages test-packages lint bench clean deb demo

run: setup
	$(BIN)/mtls-milter serve $(ARGS)

test: setup test-packages lint
	$(BIN)/pytest -ra $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

bench: setup test-packages
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/run_all.py

# The Debian package (packaging/build-deb.sh: a venv in /opt/mtls-milter, units, man pages,
# sysusers/tmpfiles, example config) into dist/. Installs nothing on this machine.
deb: system-packages
	sh packaging/build-deb.sh dist

# The README's check examples against a demo CA (demo/) and a demo DNS server (dnsmasq).
demo: setup
	$(BIN)/python tests/demo.py

setup: system-packages $(STAMP)

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Real Postfix and Sendmail, swaks, miltertest: what the end-to-end tests and benches drive.
# Postfix is installed only on a host without any MTA (an installed Postfix is used as it is;
# beside another MTA the Postfix tests skip); Sendmail is only ever unpacked into a directory.
# Never starts system daemons; `sh tests/e2e/install_mtas.sh --plan` shows the decision.
# Prometheus (the metrics tests' scraper, and promtool) is only unpacked into its own directory.
test-packages:
	$(SUDO) sh tests/e2e/install_mtas.sh
	$(SUDO) sh tests/e2e/install_prometheus.sh

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
