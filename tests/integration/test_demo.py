"""The `make run` demo: its files agree with each other and the SPEC, and the whole demo
(keygate serve + echo + Envoy with envoy/demo/envoy.yaml) behaves as its printed curl lines say."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

import harness
from keyservice import sha256_hex

DEMO = harness.REPO / "envoy" / "demo"


def demo_keys() -> dict[str, dict]:
    out = {}
    for line in (DEMO / "demo-keys.txt").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        kid, key, plan, status = line.split()
        out[kid] = {"key": key, "plan": plan, "status": status}
    return out


def demo_plugin_config(yaml_text: str) -> dict:
    """The JSON block under `value: |` in envoy.yaml (no YAML parser needed)."""
    lines = yaml_text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "value: |")
    indent = len(lines[start]) - len(lines[start].lstrip())
    block = []
    for ln in lines[start + 1:]:
        if ln.strip() and len(ln) - len(ln.lstrip()) <= indent:
            break
        block.append(ln)
    return json.loads("\n".join(block))


def test_demo_key_files_agree():
    keys = demo_keys()
    doc = json.loads((DEMO / "keys.json").read_text())
    assert set(keys) == {k["id"] for k in doc["keys"]}
    statuses = set()
    for entry in doc["keys"]:
        demo = keys[entry["id"]]
        assert demo["key"].startswith("kg_")
        assert entry["hash"] == sha256_hex(demo["key"])
        assert demo["key"] not in (DEMO / "keys.json").read_text()
        assert entry.get("status", "active") == demo["status"]
        assert entry["plan"] == demo["plan"] and entry["plan"] in doc["plans"]
        assert doc["owners"][entry["owner"]].get("status", "active") == "active"
        statuses.add(demo["status"])
    assert statuses == {"active", "revoked"}
    assert doc["plans"]["free"]["rate_limits"] == [{"limit": 5, "window_s": 60}]


def test_demo_envoy_yaml_shape():
    text = (DEMO / "envoy.yaml").read_text()
    cfg = demo_plugin_config(text)
    assert cfg["key_list"] == {"cluster": "keyservice", "path": "/v1/keys", "refresh_s": 10}
    assert {"header": "x-api-key"} in cfg["credentials"]
    assert {"header": "authorization", "scheme": "Bearer"} in cfg["credentials"]
    assert cfg["rate_limit"]["default"] == [{"limit": 60, "window_s": 60}]
    assert any(r.get("path_exact") == "/healthz" for r in cfg["exempt"])
    for port in (8080, 8081, 8082, 9901):
        assert f"port_value: {port}" in text
    assert "filename: target/wasm32-wasip1/release/keygate.wasm" in text
    assert "envoy.wasm.runtime.v8" in text


def _need_built(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"not built yet ({', '.join(missing)}): run `make build`")


def test_demo_envoy_yaml_validates_with_the_built_filter():
    """`envoy --mode validate` loads the wasm and runs on_configure on the demo configuration."""
    _need_built(harness.WASM_PATH)
    r = subprocess.run(
        [harness.envoy_binary(), "--mode", "validate", "-c", "envoy/demo/envoy.yaml", "--disable-hot-restart"],
        cwd=harness.REPO, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "OK" in out, out[-3000:]


def _rewrite_ports(text: str, ports: dict[int, int]) -> str:
    for old, new in ports.items():
        text, n = re.subn(rf"port_value: {old}\b", f"port_value: {new}", text)
        assert n == 1, old
    return text.replace("filename: target/", f"filename: {harness.REPO}/target/")


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    import socket

    def up():
        assert proc.poll() is None, f"keygate serve exited with {proc.returncode}"
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True

    harness.wait_until(up, timeout, 0.1, f"keygate serve listening on {port}")


def test_demo_end_to_end(envoy_factory, echo, tmp_path):
    _need_built(harness.WASM_PATH, harness.CLI_PATH)
    keys = demo_keys()
    ks_port, port, admin_port = harness._free_ports(3)
    ks_log = open(tmp_path / "keyservice.log", "wb")
    ks = subprocess.Popen([str(harness.CLI_PATH), "serve", str(DEMO / "keys.json"), "--listen", f"127.0.0.1:{ks_port}"],
                          stdout=ks_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_port(ks_port, ks)
        text = _rewrite_ports((DEMO / "envoy.yaml").read_text(),
                              {8080: port, 9901: admin_port, 8081: ks_port, 8082: echo.port})
        env = envoy_factory.config(text, port, admin_port, concurrency=2)
        pro = {"x-api-key": keys["demo_pro"]["key"]}
        harness.wait_until(lambda: env.request("GET", "/v1/hello", pro).status != 503, 20, 0.1, "key list loaded")

        r = env.request("GET", "/v1/hello", pro)
        assert r.status == 200, r
        seen = r.json()["headers"]
        assert seen["x-api-key-id"] == "demo_pro" and seen["x-api-key-owner"] == "demo-org"
        assert "x-api-key" not in seen

        r = env.request("GET", "/v1/hello", {"authorization": "Bearer " + keys["demo_pro"]["key"]})
        assert r.status == 200, r
        assert "authorization" not in r.json()["headers"]

        r = env.request("GET", "/v1/hello")
        assert (r.status, r.json()["error"]["code"]) == (401, "missing_key")
        r = env.request("GET", "/v1/hello", {"x-api-key": "kg_not_a_real_key"})
        assert (r.status, r.json()["error"]["code"]) == (401, "invalid_key")
        r = env.request("GET", "/v1/hello", {"x-api-key": keys["demo_revoked"]["key"]})
        assert (r.status, r.json()["error"]["code"]) == (401, "expired_key")
        assert env.request("GET", "/healthz").status == 200

        # free plan: 5 a minute (stay clear of a window boundary)
        if 60 - time.time() % 60 < 5:
            time.sleep(60 - time.time() % 60 + 0.2)
        free = {"x-api-key": keys["demo_free"]["key"]}
        statuses = [env.request("GET", "/v1/hello", free) for _ in range(7)]
        assert [r.status for r in statuses] == [200] * 5 + [429] * 2, statuses
        assert int(statuses[-1].headers["retry-after"]) >= 1
        assert statuses[0].headers["x-ratelimit-limit"] == "5"

        assert any(k.startswith("keygate_") for k in env.stats())
    finally:
        ks.terminate()
        try:
            ks.wait(timeout=5)
        except subprocess.TimeoutExpired:
            ks.kill()
            ks.wait()
        ks_log.close()
