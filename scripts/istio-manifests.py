#!/usr/bin/env python3
"""Pin keygate's Istio WasmPlugin (envoy/istio/wasmplugin.yaml) to the image in target/oci.

Reads the OCI image layout written by scripts/oci-image.py, checks it (compat variant, one
tar+gzip layer holding plugin.wasm, every blob matching its digest) and writes into the
WasmPlugin, editing only these lines so that comments and layout stay:

  spec.sha256                          the hex manifest digest (what Istio verifies for oci://)
  metadata.annotations keygate.io/wasm-sha256   the sha256 of plugin.wasm in the image
  spec.url                             the tag (oci://HOST/REPO:TAG), or the digest if the url
                                       is pinned as oci://HOST/REPO@sha256:...

With --check nothing is written: exit 1 when the manifest is stale, or when the image does not
hold the current build (--wasm, default target/wasm32-wasip1/release/keygate.wasm). Stdlib only.

Exit status: 0 ok (or updated), 1 stale / invalid image, 2 bad usage.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LAYOUT = REPO / "target" / "oci" / "keygate"
DEFAULT_MANIFEST = REPO / "envoy" / "istio" / "wasmplugin.yaml"
DEFAULT_WASM = REPO / "target" / "wasm32-wasip1" / "release" / "keygate.wasm"
WASM_ANNOTATION = "keygate.io/wasm-sha256"
REF_NAME = "org.opencontainers.image.ref.name"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class ImageError(Exception):
    pass


def _blob(layout: Path, digest: str) -> bytes:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexd):
        raise ImageError(f"unsupported digest {digest!r}")
    try:
        data = (layout / "blobs" / "sha256" / hexd).read_bytes()
    except OSError as e:
        raise ImageError(f"blob {digest} missing: {e.strerror}") from e
    if hashlib.sha256(data).hexdigest() != hexd:
        raise ImageError(f"blob {digest} does not match its digest")
    return data


def extract_plugin_wasm(layer_targz: bytes) -> bytes:
    """What Istio does (pkg/wasm/imagefetcher.go extractWasmPluginBinary): gunzip, walk the tar,
    take the first entry whose base name is plugin.wasm."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer_targz)), mode="r:") as tar:
        for member in tar:
            if Path(member.name).name == "plugin.wasm" and member.isfile():
                f = tar.extractfile(member)
                if f is not None:
                    return f.read()
    raise ImageError("plugin.wasm not found in the layer")


def read_image(layout: Path, tag: str | None) -> dict:
    try:
        index = json.loads((layout / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ImageError(f"{layout}/index.json: {e} (run `make image`)") from e
    descs = index.get("manifests") or []
    if tag is not None:
        descs = [d for d in descs if (d.get("annotations") or {}).get(REF_NAME) == tag]
    if len(descs) != 1:
        raise ImageError(f"{layout}: expected one image{' tagged ' + tag if tag else ''}, found {len(descs)}")
    desc = descs[0]
    raw = _blob(layout, desc["digest"])
    manifest = json.loads(raw)
    if manifest.get("mediaType", MT_MANIFEST) != MT_MANIFEST:
        raise ImageError(f"manifest media type {manifest.get('mediaType')!r} is not {MT_MANIFEST}")
    if (manifest.get("annotations") or {}).get("module.wasm.image/variant") != "compat":
        raise ImageError("manifest lacks the annotation module.wasm.image/variant=compat")
    layers = manifest.get("layers") or []
    if len(layers) != 1 or layers[0].get("mediaType") != MT_LAYER:
        raise ImageError(f"the compat variant needs exactly one {MT_LAYER} layer")
    _blob(layout, manifest["config"]["digest"])
    wasm = extract_plugin_wasm(_blob(layout, layers[0]["digest"]))
    if wasm[:4] != b"\0asm":
        raise ImageError("plugin.wasm is not a WebAssembly module")
    return {
        "digest": desc["digest"],
        "tag": (desc.get("annotations") or {}).get(REF_NAME),
        "wasm": wasm,
        "wasm_sha256": hashlib.sha256(wasm).hexdigest(),
    }


def _replace_one(text: str, pattern: str, repl, what: str) -> str:
    rx = re.compile(pattern, re.MULTILINE)
    found = rx.findall(text)
    if len(found) != 1:
        raise ValueError(f"expected exactly one {what} line in the manifest, found {len(found)}")
    return rx.sub(repl, text, count=1)


def pin(text: str, digest_hex: str, wasm_hex: str, tag: str | None) -> str:
    text = _replace_one(text, r'^(\s+sha256:[ \t]*)("?)[0-9a-f]*("?)([ \t]*(#.*)?)$',
                        lambda m: f'{m.group(1)}"{digest_hex}"{m.group(4)}', "spec.sha256")
    text = _replace_one(text, r'^(\s+' + re.escape(WASM_ANNOTATION) + r':[ \t]*)("?)[0-9a-f]*("?)([ \t]*(#.*)?)$',
                        lambda m: f'{m.group(1)}"{wasm_hex}"{m.group(4)}', WASM_ANNOTATION)

    def url(m: re.Match) -> str:
        ref = m.group(2)
        if "@" in ref:  # pinned by digest
            ref = ref.split("@", 1)[0] + "@sha256:" + digest_hex
        elif tag:
            slash = ref.rfind("/")
            colon = ref.rfind(":")
            ref = (ref[:colon] if colon > slash else ref) + ":" + tag
        return f"{m.group(1)}{ref}{m.group(3)}"

    return _replace_one(text, r'^(\s+url:[ \t]*"?oci://)([^"\s#]+)("?[ \t]*(#.*)?)$', url, "spec.url (oci://)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", type=Path, default=DEFAULT_LAYOUT, help="OCI image layout (default target/oci/keygate)")
    ap.add_argument("--tag", default=None, help="image in the layout (default: the only one)")
    ap.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="the WasmPlugin YAML to pin")
    ap.add_argument("--wasm", type=Path, default=DEFAULT_WASM, help="the current build, which the image must hold")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if anything is stale")
    args = ap.parse_args(argv)

    try:
        img = read_image(args.layout, args.tag)
    except (ImageError, KeyError, ValueError, tarfile.TarError, OSError) as e:
        print(f"istio-manifests: invalid image: {e}", file=sys.stderr)
        return 1
    stale = []
    try:
        built = args.wasm.read_bytes()
        if built != img["wasm"]:
            stale.append(f"{args.layout} does not hold the current {args.wasm.name} "
                         f"(sha256 {hashlib.sha256(built).hexdigest()}): run `make image`")
    except OSError:
        pass  # no build to compare with (e.g. CI packaging a downloaded module)
    try:
        old = args.manifest.read_text(encoding="utf-8")
        new = pin(old, img["digest"].split(":", 1)[1], img["wasm_sha256"], img["tag"])
    except (OSError, ValueError) as e:
        print(f"istio-manifests: {args.manifest}: {e}", file=sys.stderr)
        return 1
    if new != old:
        if args.check:
            stale.append(f"{args.manifest} is not pinned to {img['digest']}: run `make image`")
        else:
            args.manifest.write_text(new, encoding="utf-8")
            print(f"istio-manifests: pinned {args.manifest.name} to {img['digest']} "
                  f"(plugin.wasm sha256 {img['wasm_sha256']}, tag {img['tag']})")
    elif not args.check:
        print(f"istio-manifests: {args.manifest.name} already pinned to {img['digest']}")
    for s in stale:
        print(f"istio-manifests: {s}", file=sys.stderr)
    if stale and args.check:
        return 1
    if args.check:
        print(f"istio-manifests: {args.manifest.name} is pinned to {img['digest']} (current build)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
