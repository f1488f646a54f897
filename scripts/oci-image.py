#!/usr/bin/env python3
"""Package keygate.wasm as a Wasm OCI image, *compat* variant, as an OCI image layout directory.

Stdlib only; no Docker, no registry. The layout (default target/oci/keygate) holds one image,
tagged with the crate version (org.opencontainers.image.ref.name), that Istio's WasmPlugin
fetcher (istio/istio pkg/wasm/imagefetcher.go) accepts:

  * an OCI image manifest (application/vnd.oci.image.manifest.v1+json) annotated
    module.wasm.image/variant=compat (solo-io/wasm spec/spec-compat.md);
  * an OCI image config (application/vnd.oci.image.config.v1+json), platform wasm/wasip1;
  * exactly one layer, application/vnd.oci.image.layer.v1.tar+gzip, a tar holding the module
    as `plugin.wasm` at its root. (Istio refuses an uncompressed `...tar` layer.)

The image is reproducible: the same keygate.wasm always gives the same manifest digest (tar
entry with mtime 0 and owner root, gzip header without name or time, fixed JSON encoding, no
creation time unless SOURCE_DATE_EPOCH is set). The digest is what a WasmPlugin's `sha256`
must hold for an `oci://` url: Istio compares it with the manifest digest, not with the sha256
of the .wasm (istio/istio pkg/wasm/cache.go). The digest only stays the same if the image is
copied to the registry unchanged (`skopeo copy oci:... docker://...` does so); rebuilding it
with another tool gives another digest.

Push it with e.g.
    skopeo copy oci:target/oci/keygate:0.1.0 docker://REGISTRY/keygate:0.1.0
then run scripts/istio-manifests.py (or `make image`, which runs both scripts) to write the
digest into envoy/istio/wasmplugin.yaml.

Exit status: 0 ok, 1 error, 2 bad usage.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WASM = REPO / "target" / "wasm32-wasip1" / "release" / "keygate.wasm"
DEFAULT_OUT = REPO / "target" / "oci" / "keygate"

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
VARIANT_ANNOTATION = "module.wasm.image/variant"
REF_NAME = "org.opencontainers.image.ref.name"
WASM_MAGIC = b"\x00asm"
PLUGIN_FILE = "plugin.wasm"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj) -> bytes:
    """The byte encoding of every JSON blob in the image (its digest depends on it)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def crate_version() -> str:
    """The workspace's version ([workspace.package] of the root Cargo.toml)."""
    data = tomllib.loads((REPO / "Cargo.toml").read_text(encoding="utf-8"))
    version = data.get("workspace", {}).get("package", {}).get("version")
    if not isinstance(version, str):
        raise SystemExit("oci-image: no [workspace.package] version in Cargo.toml")
    return version


def layer_tar(wasm: bytes) -> bytes:
    """An uncompressed tar with one regular file, plugin.wasm, normalised for reproducibility."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(PLUGIN_FILE)
        info.size = len(wasm)
        info.mode = 0o644
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        tar.addfile(info, io.BytesIO(wasm))
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    # filename="" and mtime=0: no name and no time in the gzip header.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def build_image(wasm: bytes, version: str, created: str | None) -> dict:
    """The blobs of the image: {"manifest": bytes, "config": bytes, "layer": bytes, ...}."""
    tar = layer_tar(wasm)
    layer = gzip_bytes(tar)
    config_obj = {
        "architecture": "wasm",
        "os": "wasip1",
        "config": {"Labels": {"org.opencontainers.image.title": "keygate",
                              "org.opencontainers.image.version": version}},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha256_hex(tar)]},
    }
    if created:
        config_obj["created"] = created
    config = canonical_json(config_obj)
    annotations = {
        VARIANT_ANNOTATION: "compat",
        "org.opencontainers.image.title": "keygate",
        "org.opencontainers.image.description": "keygate proxy-wasm API-key filter (plugin.wasm)",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.licenses": "Apache-2.0",
        # Not part of the compat spec: lets anyone check the module without unpacking the layer.
        "io.keygate.wasm.sha256": sha256_hex(wasm),
    }
    if created:
        annotations["org.opencontainers.image.created"] = created
    manifest_obj = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": "sha256:" + sha256_hex(config), "size": len(config)},
        "layers": [{
            "mediaType": MT_LAYER,
            "digest": "sha256:" + sha256_hex(layer),
            "size": len(layer),
        }],
        "annotations": annotations,
    }
    manifest = canonical_json(manifest_obj)
    return {"manifest": manifest, "config": config, "layer": layer,
            "digest": "sha256:" + sha256_hex(manifest), "wasm_sha256": sha256_hex(wasm)}


def write_layout(out: Path, image: dict, tag: str) -> None:
    """Write (replace) the OCI image layout at `out` atomically: a temporary sibling directory
    renamed over the old one, so a reader never sees half an image."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        blobs = tmp / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        for key in ("config", "layer", "manifest"):
            data = image[key]
            (blobs / sha256_hex(data)).write_bytes(data)
        (tmp / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
        index = {
            "schemaVersion": 2,
            "mediaType": MT_INDEX,
            "manifests": [{
                "mediaType": MT_MANIFEST,
                "digest": image["digest"],
                "size": len(image["manifest"]),
                "annotations": {REF_NAME: tag},
            }],
        }
        (tmp / "index.json").write_bytes(canonical_json(index))
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old.{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wasm", type=Path, default=DEFAULT_WASM, help=f"the module (default {DEFAULT_WASM.relative_to(REPO)})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"OCI image layout directory to (re)write (default {DEFAULT_OUT.relative_to(REPO)})")
    ap.add_argument("--tag", default=None, help="reference name in the layout (default: the crate version)")
    ap.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    args = ap.parse_args(argv)

    try:
        wasm = args.wasm.read_bytes()
    except OSError as e:
        print(f"oci-image: cannot read {args.wasm}: {e.strerror} (run `make wasm` first)", file=sys.stderr)
        return 1
    if len(wasm) < 8 or wasm[:4] != WASM_MAGIC:
        print(f"oci-image: {args.wasm} is not a WebAssembly module", file=sys.stderr)
        return 1
    tag = args.tag or crate_version()
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", tag):
        print(f"oci-image: {tag!r} is not a valid tag", file=sys.stderr)
        return 2
    created = None
    if os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():
        import datetime as dt
        created = dt.datetime.fromtimestamp(int(os.environ["SOURCE_DATE_EPOCH"]), dt.timezone.utc) \
            .strftime("%Y-%m-%dT%H:%M:%SZ")

    image = build_image(wasm, tag, created)
    write_layout(args.out, image, tag)
    summary = {
        "layout": str(args.out),
        "tag": tag,
        "manifest_digest": image["digest"],
        "wasm_sha256": image["wasm_sha256"],
        "wasm_bytes": len(wasm),
        "layer_bytes": len(image["layer"]),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        try:
            shown = args.out.resolve().relative_to(Path.cwd())
        except ValueError:
            shown = args.out
        print(f"oci-image: wrote {shown} (tag {tag})\n"
              f"  manifest digest  {image['digest']}   <- WasmPlugin spec.sha256 (hex part)\n"
              f"  plugin.wasm      sha256:{image['wasm_sha256']} ({len(wasm)} bytes, layer {len(image['layer'])} bytes gzip)\n"
              f"  push: skopeo copy oci:{shown}:{tag} docker://REGISTRY/keygate:{tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
