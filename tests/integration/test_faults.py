"""Faults under load, short form (issue 17; the long form is `make test-faults`): one Envoy
(--concurrency 2), 64 keep-alive connections of traffic whose answer is known at every instant,
while the key service misbehaves phase after phase (tests/faults/scenario.py). One test per
phase, judged on that phase's traffic and fetch metrics; one for the process over the whole run.

KEYGATE_FAULTS_PHASE_S changes the length of a phase (default 3 s; the whole run is about 80 s)."""
from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))

import scenario  # noqa: E402

PHASE_S = float(os.environ.get("KEYGATE_FAULTS_PHASE_S", scenario.SHORT_PHASE_S))


@pytest.fixture(scope="module")
def fault_run():
    """Runs every phase once, in order, under one load on one Envoy."""
    t = time.time()
    stack = scenario.start_stack()
    try:
        results = asyncio.run(scenario.run_phases(stack, PHASE_S, log=lambda s: None))
        health = stack.health()
        log_tail = "\n".join(stack.log().splitlines()[-60:])
    finally:
        stack.stop()
    print("\n" + scenario.report(results, stack.name, time.time() - t))
    return {r.name: r for r in results}, health, log_tail


def _params():
    out = []
    for ph in scenario.PHASES:
        marks = [pytest.mark.xfail(strict=False, reason=ph.xfail)] if ph.xfail else []
        out.append(pytest.param(ph.name, marks=marks, id=ph.name))
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", _params())
def test_fault_phase(fault_run, name):
    results, _, _ = fault_run
    r = results[name]
    detail = "\n".join([r.line(), *(f"  - {n}" for n in r.notes), *(f"  sample: {s}" for s in r.samples[:10])])
    assert not r.problems, f"{name} ({r.what}):\n" + "\n".join(r.problems) + "\n" + detail


@pytest.mark.timeout(300)
def test_same_process_no_panic_no_critical(fault_run):
    _, health, log_tail = fault_run
    assert not health, "\n".join(health) + "\n----- log tail -----\n" + log_tail


@pytest.mark.timeout(300)
def test_client_faults():
    """Disconnects mid-request, headers byte by byte, pipelining, HTTP/1.0, h2c and large header
    sets next to a judged load (tests/faults/client_faults.py; the long form is in make test-faults):
    no wrong answer, Envoy alive with the same PID, no growth from the first round to the last."""
    import client_faults

    stack = scenario.start_stack(hcm_extra=scenario.HCM_HTTP10)
    try:
        c, figures, problems = asyncio.run(client_faults.run(stack, rounds=3, per_round=6))
    finally:
        stack.stop()
    text = client_faults.summary(c, figures, problems, stack.name)
    print("\n" + text)
    assert c.checked > 100 and not problems, text
