"""pytest fixtures for keygate's integration tests (real Envoy + built keygate.wasm).

Fixtures:
    echo          -> tests/support/echo.EchoServer, started (port, url, requests, clear())
    keyservice    -> tests/support/keyservice.KeyService, started, empty key list
                     (set_document(), status, delay, body_override, drop, count, requests, ...)
    envoy_factory -> start_envoy(...) with the same signature as harness.start_envoy; every Envoy
                     it starts is stopped at teardown, and a failing test gets the tail of each
                     Envoy log attached to its report. At teardown the test errors if any Envoy
                     logged a wasm panic/trap, unless marked @pytest.mark.allow_wasm_failure.
    wasm_path     -> Path of target/wasm32-wasip1/release/keygate.wasm (fails if not built)
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (str(HERE), str(REPO / "tests" / "support")):
    if p not in sys.path:
        sys.path.insert(0, p)

import harness  # noqa: E402
from echo import EchoServer  # noqa: E402
from keyservice import KeyService  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_wasm_failure: a wasm panic/trap in Envoy's log is expected")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call"):
        for env in getattr(item, "_keygate_envoys", []):
            tail = "\n".join(env.log().splitlines()[-120:])
            rep.sections.append((f"envoy log {env.url} ({env.log_path})", tail))


@pytest.fixture
def echo():
    with EchoServer() as server:
        yield server


@pytest.fixture
def keyservice():
    with KeyService() as ks:
        yield ks


@pytest.fixture
def wasm_path() -> Path:
    if not harness.WASM_PATH.exists():
        pytest.fail(f"{harness.WASM_PATH} is missing: run `make build` first")
    return harness.WASM_PATH


@pytest.fixture
def envoy_factory(request):
    started: list[harness.Envoy] = []
    request.node._keygate_envoys = started

    def factory(*args, **kwargs) -> harness.Envoy:
        env = harness.start_envoy(*args, **kwargs)
        started.append(env)
        return env

    def from_config(*args, **kwargs) -> harness.Envoy:
        env = harness.start_envoy_config(*args, **kwargs)
        started.append(env)
        return env

    factory.config = from_config  # envoy_factory.config(bootstrap, port, admin_port, ...)

    yield factory

    failures = []
    for env in started:
        env.stop()
        failures += env.wasm_failures()
    if failures and request.node.get_closest_marker("allow_wasm_failure") is None:
        pytest.fail("the wasm VM crashed (SPEC §5: nothing makes the filter panic):\n" + "\n".join(failures[:20]))
