"""keygate in Istio: the WasmPlugin manifests validate offline, and the Wasm OCI image survives a
round trip through a real registry.

(a) scripts/validate_istio.py --self-test: istio/api's own WasmPlugin fixtures are judged like the
    API server judges them (CRD openAPIV3Schema + CEL rules), and a wrong verdict fails it.
(b) envoy/istio/*.yaml validate, including the WasmPlugin's pluginConfig through
    `keygate check-config`; broken variants of the WasmPlugin are refused for the right reason.
(c) scripts/oci-image.py's image is pushed to a local registry (Debian's docker-registry on
    127.0.0.1) with one client and pulled back with another (skopeo -> stdlib Python client, and
    Python -> skopeo); plugin.wasm comes out byte-identical to the build, and the pins in
    envoy/istio/wasmplugin.yaml (spec.sha256 = manifest digest, annotation = wasm sha256) match.

The registry tests skip, saying why, when docker-registry or skopeo is missing (`make deps`
installs both as root).
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WASM = REPO / "target" / "wasm32-wasip1" / "release" / "keygate.wasm"
CLI = REPO / "target" / "release" / "keygate"
VALIDATOR = REPO / "scripts" / "validate_istio.py"
OCI_IMAGE = REPO / "scripts" / "oci-image.py"
PIN = REPO / "scripts" / "istio-manifests.py"
ISTIO_DIR = REPO / "envoy" / "istio"
WASMPLUGIN = ISTIO_DIR / "wasmplugin.yaml"
# Istio's WasmPlugin CRD and istio/api's fixtures, copied into the project (see its README).
ISTIO_SCHEMAS = Path(os.environ.get("KEYGATE_ISTIO_SCHEMAS") or REPO / "tests" / "data" / "istio")
KEY_CLUSTER = "outbound|8080||keys.keygate-system.svc.cluster.local"

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

pytestmark = pytest.mark.timeout(180)


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def built_wasm() -> bytes:
    if not WASM.exists():
        pytest.fail(f"{WASM} is missing: run `make build` first")
    return WASM.read_bytes()


def load_yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def wasmplugin() -> dict:
    docs = [d for d in load_yaml_docs(WASMPLUGIN) if d.get("kind") == "WasmPlugin"]
    assert len(docs) == 1, f"{WASMPLUGIN} must hold exactly one WasmPlugin"
    return docs[0]


def _load_script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


@dataclass
class Image:
    layout: Path
    tag: str
    digest: str  # sha256:<hex> of the manifest
    wasm_sha256: str


def build_image(out: Path) -> Image:
    r = run([sys.executable, str(OCI_IMAGE), "--wasm", str(WASM), "--out", str(out), "--json"], timeout=60)
    assert r.returncode == 0, f"oci-image.py failed:\n{r.stdout}\n{r.stderr}"
    s = json.loads(r.stdout)
    return Image(out, s["tag"], s["manifest_digest"], s["wasm_sha256"])


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Image:
    built_wasm()
    return build_image(tmp_path_factory.mktemp("oci") / "keygate")


@pytest.fixture(scope="module")
def keygate_cli() -> Path:
    if not CLI.exists():
        pytest.fail(f"{CLI} is missing: run `make build` first (validate_istio.py runs `keygate check-config`)")
    return CLI


# =============================================================================================
# (a) the validator's self-test against istio/api's fixtures
# =============================================================================================
def _fixture_count(d: Path) -> int:
    return sum(len(load_yaml_docs(p)) for p in sorted(d.glob("*-valid.yaml")) + sorted(d.glob("*-invalid.yaml")))


def test_validator_self_test_passes():
    assert (ISTIO_SCHEMAS / "wasm-valid.yaml").exists(), f"istio fixtures missing in {ISTIO_SCHEMAS}"
    r = run([sys.executable, str(VALIDATOR), "--self-test", "-v"])
    assert r.returncode == 0, f"self-test failed:\n{r.stdout}\n{r.stderr}"
    m = re.search(r"self-test: (\d+)/(\d+) fixture documents as expected", r.stdout)
    assert m and m.group(1) == m.group(2), r.stdout
    n = _fixture_count(ISTIO_SCHEMAS)
    assert int(m.group(2)) == n, f"expected all {n} fixture documents judged:\n{r.stdout}"
    # Every invalid fixture was refused, each for the reason istio/api's `_err` names.
    refused = [line for line in r.stdout.splitlines() if line.startswith("ok") and ": refused: " in line]
    assert len(refused) == len(load_yaml_docs(ISTIO_SCHEMAS / "wasm-invalid.yaml")), r.stdout


def test_validator_self_test_catches_wrong_verdicts(tmp_path):
    """The self-test is not a rubber stamp: an invalid document placed among the valid ones, and an
    invalid document refused for another reason than its `_err`, both make it fail."""
    for p in ISTIO_SCHEMAS.glob("*.yaml"):
        shutil.copy(p, tmp_path / p.name)
    bad = ("\n---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n"
           "  name: smuggled-invalid\nspec:\n  url: \"http://test\"\n  sha256: foo\n")
    with open(tmp_path / "wasm-valid.yaml", "a", encoding="utf-8") as f:
        f.write(bad)
    env = {**os.environ, "KEYGATE_ISTIO_SCHEMAS": str(tmp_path)}
    r = run([sys.executable, str(VALIDATOR), "--self-test"], env=env)
    assert r.returncode == 1 and "smuggled-invalid" in r.stdout and "FAIL" in r.stdout, r.stdout

    shutil.copy(ISTIO_SCHEMAS / "wasm-valid.yaml", tmp_path / "wasm-valid.yaml")
    wrong = ("\n---\n_err: 'url must have schema one of'\napiVersion: extensions.istio.io/v1alpha1\n"
             "kind: WasmPlugin\nmetadata:\n  name: wrong-reason\nspec:\n  url: \"http://test\"\n  sha256: foo\n")
    with open(tmp_path / "wasm-invalid.yaml", "a", encoding="utf-8") as f:
        f.write(wrong)
    r = run([sys.executable, str(VALIDATOR), "--self-test"], env=env)
    assert r.returncode == 1 and "wrong-reason" in r.stdout and "refused, but without" in r.stdout, r.stdout


# =============================================================================================
# (b) envoy/istio manifests
# =============================================================================================
def test_istio_manifests_validate(keygate_cli):
    r = run([sys.executable, str(VALIDATOR), "--keygate", str(keygate_cli)])
    assert r.returncode == 0, f"envoy/istio manifests invalid:\n{r.stdout}\n{r.stderr}"
    docs = sum(len(load_yaml_docs(p)) for p in ISTIO_DIR.glob("*.yaml"))
    assert f"{docs}/{docs} documents valid" in r.stdout, r.stdout
    wp = [line for line in r.stdout.splitlines() if " WasmPlugin istio-system/keygate " in line]
    assert wp and wp[0].startswith("ok") and "keygate check-config" in wp[0] and "key-service cluster" in wp[0], r.stdout


def test_wasmplugin_is_keygates(keygate_cli):
    wp = wasmplugin()
    assert wp["apiVersion"] == "extensions.istio.io/v1alpha1"
    spec = wp["spec"]
    assert spec["url"].startswith("oci://"), spec["url"]
    assert re.fullmatch(r"[0-9a-f]{64}", spec["sha256"]), spec["sha256"]
    assert spec["phase"] == "AUTHN" and spec["failStrategy"] == "FAIL_CLOSE"
    assert spec["selector"]["matchLabels"], "selector.matchLabels must pick the workloads"
    cfg = spec["pluginConfig"]
    assert cfg["key_list"]["cluster"] == KEY_CLUSTER and cfg["key_list"]["path"] == "/v1/keys"
    assert cfg["credentials"] and cfg["rate_limit"]["default"]
    # The same JSON the filter receives passes the filter's own parser.
    r = run([str(keygate_cli), "check-config", "-"], input=json.dumps(cfg), timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def _mutations() -> dict[str, tuple[Callable[[dict], None], str]]:
    def unknown_plugin_field(s):
        s["pluginConfig"]["key_list"]["refresh"] = 30

    def bad_cluster_port(s):
        s["pluginConfig"]["key_list"]["cluster"] = KEY_CLUSTER.replace("8080", "9090")

    def plain_cluster(s):
        s["pluginConfig"]["key_list"]["cluster"] = "keyservice"

    def bad_sha(s):
        s["sha256"] = "ABC"

    def two_selectors(s):
        s["targetRefs"] = [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "gw"}]

    def bad_scheme(s):
        s["url"] = "ftp://registry.example.com/keygate:0.1.0"

    def unknown_spec_field(s):
        s["failurePolicy"] = "FAIL_CLOSE"

    def bad_phase(s):
        s["phase"] = "AUTHENTICATION"

    def bad_rate_limit(s):
        s["pluginConfig"]["rate_limit"]["default"] = [{"limit": 10, "window_s": 0}]

    def no_plugin_config(s):
        del s["pluginConfig"]

    return {
        "m-unknown-plugin-field": (unknown_plugin_field, "keygate check-config refused it"),
        "m-bad-cluster-port": (bad_cluster_port, "no Service or ServiceEntry"),
        "m-plain-cluster": (plain_cluster, "is not an Istio cluster name"),
        "m-bad-sha": (bad_sha, "spec.sha256 in body should match"),
        "m-two-selectors": (two_selectors, "only one of targetRefs or selector can be set"),
        "m-bad-scheme": (bad_scheme, "url must have schema one of"),
        "m-unknown-spec-field": (unknown_spec_field, 'unknown field "spec.failurePolicy"'),
        "m-bad-phase": (bad_phase, "spec.phase: Unsupported value"),
        "m-bad-rate-limit": (bad_rate_limit, "keygate check-config refused it"),
        "m-no-plugin-config": (no_plugin_config, "spec.pluginConfig: Required value"),
    }


def test_validator_refuses_broken_wasmplugins(tmp_path, keygate_cli):
    muts = _mutations()
    docs = []
    for name, (mutate, _) in muts.items():
        wp = json.loads(json.dumps(wasmplugin()))
        wp["metadata"]["name"] = name
        mutate(wp["spec"])
        docs.append(wp)
    f = tmp_path / "broken.yaml"
    f.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
    r = run([sys.executable, str(VALIDATOR), "--keygate", str(keygate_cli), str(f), str(ISTIO_DIR / "keyservice.yaml")])
    assert r.returncode == 1, r.stdout
    blocks: dict[str, str] = {}
    current = None
    for line in r.stdout.splitlines():
        m = re.match(r"(ok  |FAIL) \S+ WasmPlugin istio-system/(\S+) ", line)
        if m:
            current = m.group(2)
            blocks[current] = line + "\n"
        elif current and line.startswith("     "):
            blocks[current] += line + "\n"
        else:
            current = None
    for name, (_, want) in muts.items():
        block = blocks.get(name, "")
        assert block.startswith("FAIL"), f"{name} was not refused:\n{r.stdout}"
        assert want in block, f"{name}: expected {want!r} in:\n{block}"


# =============================================================================================
# The WasmPlugin pins the current build
# =============================================================================================
def test_oci_image_is_reproducible(image, tmp_path):
    again = build_image(tmp_path / "again")
    assert again.digest == image.digest, "the same keygate.wasm must give the same image digest"
    for p in (image.layout / "blobs" / "sha256").iterdir():
        assert (again.layout / "blobs" / "sha256" / p.name).read_bytes() == p.read_bytes()
    assert image.wasm_sha256 == hashlib.sha256(built_wasm()).hexdigest()


def test_wasmplugin_pins_current_build(image):
    wp = wasmplugin()
    stale = "envoy/istio/wasmplugin.yaml does not pin the current build: run `make image`"
    assert wp["spec"]["sha256"] == image.digest.split(":", 1)[1], (
        f"{stale} (spec.sha256 {wp['spec']['sha256']}, image manifest digest {image.digest})")
    assert wp["metadata"]["annotations"]["keygate.io/wasm-sha256"] == hashlib.sha256(built_wasm()).hexdigest(), stale
    assert wp["spec"]["url"].endswith(":" + image.tag), f"url tag should be {image.tag}: {wp['spec']['url']}"
    r = run([sys.executable, str(PIN), "--check", "--layout", str(image.layout), "--wasm", str(WASM)], timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_oci_layout_is_istio_compat_variant(image):
    """The layout itself, read the way Istio's fetcher reads an image (imagefetcher.go)."""
    index = json.loads((image.layout / "index.json").read_text())
    assert json.loads((image.layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    (desc,) = index["manifests"]
    assert desc["digest"] == image.digest and desc["annotations"]["org.opencontainers.image.ref.name"] == image.tag
    raw = (image.layout / "blobs" / "sha256" / image.digest.split(":")[1]).read_bytes()
    check_compat_manifest(json.loads(raw))


# =============================================================================================
# (c) registry round trip
# =============================================================================================
def check_compat_manifest(m: dict) -> None:
    assert m["schemaVersion"] == 2 and m.get("mediaType") == MT_OCI_MANIFEST
    assert m["annotations"]["module.wasm.image/variant"] == "compat"
    assert m["config"]["mediaType"] == MT_OCI_CONFIG
    assert len(m["layers"]) == 1 and m["layers"][0]["mediaType"] == MT_OCI_LAYER, m["layers"]


def istio_extract(layer: bytes) -> bytes:
    """extractWasmPluginBinary: gunzip, walk the tar, the first entry whose base name is plugin.wasm."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer)), mode="r:") as tar:
        for member in tar:
            if os.path.basename(member.name) == "plugin.wasm":
                f = tar.extractfile(member)
                assert f is not None
                data = f.read()
                assert data[:4] == b"\0asm", "plugin.wasm is not a wasm module"
                return data
    raise AssertionError("plugin.wasm not found in the layer")


class RegistryClient:
    """A minimal OCI distribution client (stdlib only, no proxies): pull and monolithic push."""

    ACCEPT = ", ".join([MT_OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"])

    def __init__(self, base: str):
        self.base = base.rstrip("/")
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, method: str, url: str, data: bytes | None = None, headers: dict | None = None,
             expect: tuple[int, ...] = (200,)):
        if url.startswith("/"):
            url = self.base + url
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            with self.opener.open(req, timeout=30) as resp:
                status, hdrs, body = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            status, hdrs, body = e.code, e.headers, e.read()
        assert status in expect, f"{method} {url}: HTTP {status} {body[:300]!r}"
        return status, hdrs, body

    def pull_manifest(self, repo: str, ref: str) -> tuple[bytes, str]:
        _, hdrs, body = self.call("GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": self.ACCEPT})
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        assert hdrs.get("Docker-Content-Digest") in (None, digest), "registry digest header disagrees with the body"
        assert hdrs.get("Content-Type") == MT_OCI_MANIFEST, hdrs.get("Content-Type")
        return body, digest

    def pull_blob(self, repo: str, digest: str) -> bytes:
        _, _, body = self.call("GET", f"/v2/{repo}/blobs/{digest}")
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest, f"blob {digest} corrupted"
        return body

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        status, _, _ = self.call("HEAD", f"/v2/{repo}/blobs/{digest}", expect=(200, 404))
        if status == 200:
            return digest
        _, hdrs, _ = self.call("POST", f"/v2/{repo}/blobs/uploads/", data=b"", expect=(202,))
        loc = urllib.parse.urljoin(self.base + "/", hdrs["Location"])
        loc += ("&" if "?" in loc else "?") + "digest=" + urllib.parse.quote(digest)
        self.call("PUT", loc, data=data, headers={"Content-Type": "application/octet-stream"}, expect=(201,))
        return digest

    def push_manifest(self, repo: str, tag: str, body: bytes, media_type: str) -> str:
        _, hdrs, _ = self.call("PUT", f"/v2/{repo}/manifests/{tag}", data=body,
                               headers={"Content-Type": media_type}, expect=(201,))
        return hdrs.get("Docker-Content-Digest", "")


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    proc: subprocess.Popen
    log: Path

    @property
    def client(self) -> RegistryClient:
        return RegistryClient(f"http://{self.host}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.skip("docker-registry is not installed (Debian package `docker-registry`; "
                    "`make deps` installs it when run as root)")
    d = tmp_path_factory.mktemp("registry")
    last_log = ""
    for _attempt in range(3):
        port = _free_port()
        cfg = d / f"config-{port}.yml"
        cfg.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {d / 'data'}\n  delete:\n    enabled: true\n"
            "  maintenance:\n    uploadpurging:\n      enabled: false\n"
            f"http:\n  addr: 127.0.0.1:{port}\n  secret: {secrets.token_hex(16)}\n"
            "health:\n  storagedriver:\n    enabled: false\n",
            encoding="utf-8")
        log = d / f"registry-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([binary, "serve", str(cfg)], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        reg = Registry(f"127.0.0.1:{port}", proc, log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                reg.client.call("GET", "/v2/", expect=(200,))
                break
            except (AssertionError, OSError):
                time.sleep(0.1)
        if proc.poll() is None:
            try:
                reg.client.call("GET", "/v2/", expect=(200,))
            except (AssertionError, OSError):
                _stop(proc)
                pytest.fail(f"docker-registry did not answer within 20 s:\n{log.read_text()[-3000:]}")
            try:
                yield reg
            finally:
                _stop(proc)
            return
        last_log = log.read_text()[-3000:]  # exited: most likely the port was taken meanwhile
    pytest.fail(f"docker-registry would not start:\n{last_log}")


@pytest.fixture(scope="module")
def skopeo(tmp_path_factory):
    binary = shutil.which("skopeo")
    if binary is None:
        pytest.skip("skopeo is not installed (Debian package `skopeo`; `make deps` installs it when run as root)")
    d = tmp_path_factory.mktemp("skopeo")
    policy = d / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}), encoding="utf-8")
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           "REGISTRY_AUTH_FILE": str(d / "auth.json"), "XDG_RUNTIME_DIR": str(d)}

    def run_skopeo(*args: str) -> subprocess.CompletedProcess:
        r = run([binary, "--policy", str(policy), "--tmpdir", str(d), *args], timeout=90, env=env)
        assert r.returncode == 0, f"skopeo {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
        return r

    return run_skopeo


def _check_pulled(client: RegistryClient, repo: str, ref: str, image: Image) -> bytes:
    body, digest = client.pull_manifest(repo, ref)
    assert digest == image.digest, f"the registry serves manifest {digest}, the image is {image.digest}"
    m = json.loads(body)
    check_compat_manifest(m)
    client.pull_blob(repo, m["config"]["digest"])
    return istio_extract(client.pull_blob(repo, m["layers"][0]["digest"]))


def test_oci_round_trip_skopeo_push_python_pull(registry, skopeo, image):
    started = time.monotonic()
    dest = f"docker://{registry.host}/keygate:{image.tag}"
    skopeo("copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false", "--dest-no-creds",
           f"oci:{image.layout}:{image.tag}", dest)
    wasm = _check_pulled(registry.client, "keygate", image.tag, image)
    assert wasm == built_wasm(), "plugin.wasm pulled from the registry differs from target/.../keygate.wasm"

    wp = wasmplugin()
    assert hashlib.sha256(wasm).hexdigest() == wp["metadata"]["annotations"]["keygate.io/wasm-sha256"], (
        "envoy/istio/wasmplugin.yaml: keygate.io/wasm-sha256 is not the pulled plugin.wasm: run `make image`")
    assert image.digest == "sha256:" + wp["spec"]["sha256"], (
        "envoy/istio/wasmplugin.yaml: spec.sha256 is not the digest Istio will see for this image: run `make image`")
    # Pulling by digest, as Istio does for oci://...@sha256:..., gives the same module.
    assert _check_pulled(registry.client, "keygate", image.digest, image) == wasm
    assert time.monotonic() - started < 90


def test_oci_round_trip_python_push_skopeo_pull(registry, skopeo, image, tmp_path):
    client = registry.client
    raw = (image.layout / "blobs" / "sha256" / image.digest.split(":")[1]).read_bytes()
    m = json.loads(raw)
    for desc in [m["config"], *m["layers"]]:
        data = (image.layout / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_bytes()
        assert client.push_blob("keygate-py", data) == desc["digest"]
    assert client.push_manifest("keygate-py", image.tag, raw, MT_OCI_MANIFEST) in ("", image.digest)

    src = f"docker://{registry.host}/keygate-py:{image.tag}"
    inspected = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", "--no-creds", src).stdout)
    assert inspected["annotations"]["module.wasm.image/variant"] == "compat"
    pulled = tmp_path / "pulled"
    skopeo("copy", "--quiet", "--preserve-digests", "--src-tls-verify=false", "--src-no-creds",
           src, f"oci:{pulled}:{image.tag}")
    reader = _load_script("istio_manifests", PIN)
    got = reader.read_image(pulled, image.tag)
    assert got["digest"] == image.digest
    assert got["wasm"] == built_wasm()
