# tfcluster: `make demo` runs the local demo, `make test` runs the test suite.
# Both do their own set-up first (virtualenv, etcd + CoreDNS builds, the
# Debian tools the tests check against) and are safe to run again.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PKGS   := discovery cloudinit templates
# mypy sees the folders under the import names they install as.
TYPECHECK := .build/typecheck

.PHONY: setup tools tools-arm64 system lint test demo bench clean

setup: $(STAMP) tools system

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 10) else "tfcluster needs Python >= 3.10; run make PYTHON=python3.11 ...")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[tf,test]'
	@touch $@

tools:
	@scripts/install-tools

# CoreDNS and etcd for arm64 instances: what `up` stages for Graviton roles,
# and what the arm64 staging test checks (about a minute the first time).
tools-arm64:
	@TFCLUSTER_GOARCH=arm64 scripts/install-tools

system:
	@scripts/install-system-packages

lint: setup
	$(VENV)/bin/ruff check $(PKGS) tests scripts examples
	$(VENV)/bin/ruff format --check $(PKGS) tests scripts examples
	@rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/tfcluster
	@for p in $(PKGS); do ln -s ../../../$$p $(TYPECHECK)/tfcluster/$$p; done
	$(VENV)/bin/mypy $(TYPECHECK)/tfcluster

test: setup tools-arm64 lint
	cd coredns && go test ./tfzone/
	$(PY) -m pytest

demo: setup
	$(PY) scripts/demo

# The barrier (server path, client path, predicted, all-in-one, naive), then
# CoreDNS's serving cost (tfzone against a static zone; dnsperf).
bench: setup
	$(PY) scripts/bench_barrier
	$(PY) scripts/bench_serving

clean:
	-scripts/local-stack down
	rm -rf $(VENV) .tools .run .build
