"""The `make run` demo: its files agree with each other and the SPEC, and the whole demo
(scripts/run-demo.sh: keygate keyservice on SQLite + echo + Envoy with envoy/demo/envoy.yaml)
behaves as the curl lines it prints say, gateway and admin API alike."""
from __future__ import annotations

import json
import os
import re
import signal
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
    assert cfg["key_list"] == {"cluster": "keyservice", "path": "/v1/keys", "refresh_s": 5}
    assert cfg["usage"] == {"interval_s": 2}
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


class Demo:
    """scripts/run-demo.sh on free ports with its state in a temporary directory."""

    def __init__(self, tmp_path: Path):
        ports = harness._free_ports(4)
        self.listen, self.admin, self.keysvc, self.echo = (f"127.0.0.1:{p}" for p in ports)
        self.run_dir = tmp_path / "run"
        self.out_path = tmp_path / "demo.out"
        env = dict(os.environ, KEYGATE_DEMO_LISTEN=self.listen, KEYGATE_DEMO_ADMIN=self.admin,
                   KEYGATE_DEMO_KEYSVC=self.keysvc, KEYGATE_DEMO_ECHO=self.echo,
                   KEYGATE_DEMO_RUN=str(self.run_dir))
        self.out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(["bash", "scripts/run-demo.sh"], cwd=harness.REPO, env=env,
                                     stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def text(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_up(self, timeout: float = 90.0) -> str:
        def up():
            assert self.proc.poll() is None, f"run-demo.sh exited with {self.proc.returncode}:\n{self.text()[-3000:]}"
            return "Ctrl-C stops the demo." in self.text()
        harness.wait_until(up, timeout, 0.2, "the demo printed its curl lines")
        return self.text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the script stops its three children
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


def printed_block(text: str, title: str) -> list[tuple[str, str]]:
    """(comment, command) pairs of the printed block that starts with `title`."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(title))
    pairs, comment = [], ""
    for ln in lines[start + 1:]:
        if not ln.strip():
            break
        ln = ln.strip()
        if ln.startswith("#"):
            comment = ln
        else:
            pairs.append((comment, ln))
            comment = ""
    return pairs


def bash(cmd: str, timeout: float = 60) -> str:
    """What `cmd` writes on standard output (curl's progress meter goes to standard error)."""
    r = subprocess.run(["bash", "-c", cmd], cwd=harness.REPO, capture_output=True, text=True, timeout=timeout)
    return r.stdout


def test_demo_end_to_end(tmp_path):
    """`make run` as a new user meets it: every printed curl line does what its comment says."""
    _need_built(harness.WASM_PATH, harness.CLI_PATH)
    keys = demo_keys()
    demo = Demo(tmp_path)
    try:
        text = demo.wait_up()
        assert "warning" not in text, text
        assert (demo.run_dir / "admin-tokens").exists() and (demo.run_dir / "keygate.db").exists()

        # The gateway lines: the status each comment promises.
        tried = printed_block(text, "try:")
        assert len(tried) >= 8, tried
        for comment, cmd in tried:
            out = bash(cmd)
            promised = re.search(r"\((\d{3})\b", comment)
            if "rate limited" in comment:
                codes = out.split()
                assert "429" in codes and set(codes) <= {"200", "429"}, (cmd, out)
            elif promised:
                assert f"HTTP/1.1 {promised.group(1)}" in out, (comment, cmd, out)
        assert any(keys["demo_pro"]["key"] in cmd for _, cmd in tried)

        # The admin lines, run in order in one shell (they share TOKEN, NEW, KEY, ID), each
        # answer after a marker.
        admin = printed_block(text, "admin API")
        script = "\n".join(f"echo; echo '@@{i}'\n{cmd}" for i, (_, cmd) in enumerate(admin))
        out = bash(script, timeout=120)
        parts = re.split(r"^@@\d+$", out, flags=re.M)[1:]
        assert len(parts) == len(admin), out
        by = {c: o for (c, _), o in zip(admin, parts)}

        def answer(word: str) -> str:
            return next(o for c, o in by.items() if word in c)

        created = json.loads(answer("create a key").strip())
        assert created["owner"] == "demo-org" and created["key"].startswith("kg_")
        assert created["last_used_at"] is None
        assert "HTTP/1.1 200" in answer("use it through Envoy")
        assert json.loads(answer("disable it"))["status"] == "disabled"
        refused = answer("refused after")
        assert "HTTP/1.1 401" in refused and "expired_key" in refused, refused

        # Usage: the gateway reports every 2 s, so within a few seconds of the use.
        usage_cmd = next(cmd for c, cmd in admin if "last_used_at" in c)
        token_line = admin[0][1]
        assert token_line.startswith("TOKEN=")
        usage_cmd = usage_cmd.replace("$ID", created["id"])

        def used():
            u = json.loads(bash(token_line + "\n" + usage_cmd))
            return u if u["last_used_at"] and u["days"] and u["days"][0]["allowed"] >= 1 else None
        u = harness.wait_until(used, 15, 0.5, "usage reported by the gateway")
        assert u["id"] == created["id"]

        rotated = json.loads(answer("rotate demo_free"))
        assert rotated["key"] and rotated["id"] != "demo_free"
        listed = json.loads(answer("every key"))
        ids = {k["id"] for k in listed["keys"]}
        assert {"demo_free", "demo_pro", "demo_revoked", created["id"], rotated["id"]} <= ids
        assert all("key" not in k and "hash" not in k for k in listed["keys"])
        assert "demo_pro" in answer("with the CLI")

        # The rotated-out demo_free key is refused after the next refresh; the new key works.
        old, new = {"x-api-key": keys["demo_free"]["key"]}, {"x-api-key": rotated["key"]}
        port = int(demo.listen.rsplit(":", 1)[1])

        def swapped():
            a = harness.http_request("127.0.0.1", port, "GET", "/v1/hello", old)
            b = harness.http_request("127.0.0.1", port, "GET", "/v1/hello", new)
            return a.status == 401 and b.status in (200, 429)
        harness.wait_until(swapped, 12, 0.3, "rotation seen by the gateway")
    finally:
        demo.stop()
    tail = demo.text()
    assert "keygate demo stopped" in tail, tail[-2000:]
