# The two commands of the README:
#   make run    install everything, then run the daemon with the default configuration
#   make test   install everything, then run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint proto system system-test kind-image clean

run: system $(VENV)/.installed
	$(BIN)/criopy run

test: system-test $(VENV)/.installed-test
	$(BIN)/pytest
	# The e2e modules whose calls exercise the transport once more against grpcio's server (grpc_server: grpcio,
	# the fallback): unary and streaming RPCs, deadlines, error mapping, the kubelet's grpc-go client. The rest
	# (crash recovery, nested nodes, storage, user namespaces) does not depend on the server and runs once.
	E2E_GRPC_SERVER=grpcio $(BIN)/pytest $(addprefix tests/e2e/,$(GRPCIO_E2E))

GRPCIO_E2E := test_daemon.py test_containers.py test_sandboxes.py test_images.py test_go_grpc_client.py \
              test_request_fuzz.py test_streaming.py

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Regenerate the Python stubs from api/runtime/v1/api.proto.
proto: $(VENV)/.installed-test
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. api/runtime/v1/api.proto

system:
	deploy/install.sh

# The kind node image (deploy/kind/): BASE=kindest/node:vX.Y.Z to pick the base, TAG for the name.
kind-image: $(VENV)/.installed
	PYTHON=$(abspath $(BIN)/python) deploy/kind/build.sh $(if $(BASE),--base $(BASE)) --tag $(or $(TAG),criopy/kind-node:dev)

system-test:
	deploy/install.sh --test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e .
	touch $@

# container-runtime-interface-api is the independent copy of the CRI descriptor the
# contract test compares against. Only its source is read (never imported), so it
# is installed without its dependencies, which pin an older protobuf than ours.
$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps 'container-runtime-interface-api==2.0.1'
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
