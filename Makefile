# svclab: install, test and demo entry points.
#
#   make setup        install Debian packages, .venv, start Open vSwitch (idempotent)
#   make test         setup, then pytest: every tier (extra args: make test PYTEST_ARGS='-k foo -x')
#   make test-unit    the unit tier alone: pure tests, no root, no kernel, seconds (needs .venv)
#   make demo         setup, then `svclab demo`
#   make bench        setup, then the API server benchmark
#   make protos       regenerate the gRPC/protobuf stubs from protos/
#   make clean-venv   remove .venv
#
# setup, test, demo and bench need root: run by another user, they re-run this make
# through sudo (keeping PATH, so pyenv's python3 is still found, and PYTEST_ARGS).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export PYTEST_ARGS

ROOT_TARGETS := setup test demo bench

UNIT_TIER := unit and not kernel and not cluster

.PHONY: $(ROOT_TARGETS) test-unit protos clean-venv

ifneq ($(shell id -u),0)

# Not root: every root-needing target re-runs itself as root, before any of its
# prerequisites run as this user.
$(ROOT_TARGETS):
	@echo "make: $@ needs root: re-running 'make $@' through sudo"
	@exec sudo -E env "PATH=$$PATH" "PYTEST_ARGS=$$PYTEST_ARGS" "$(MAKE)" --no-print-directory $@

else

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/svclab demo

bench: setup
	$(PY) -m bench.apiserver

endif

test-unit:
	@test -x $(PY) || { echo "no $(VENV): run 'make setup' first" >&2; exit 1; }
	$(PY) -m pytest -q -m "$(UNIT_TIER)" $(PYTEST_ARGS)

protos:
	@test -x $(PY) || { echo "no $(VENV): run 'make setup' first" >&2; exit 1; }
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/testbed/api/v1/api.proto

clean-venv:
	rm -rf $(VENV)
