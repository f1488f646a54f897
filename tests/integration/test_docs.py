"""The reference in docs/ keeps up with the code: every plugin-configuration field the parser
accepts is documented in docs/configuration.md, every `keygate_` metric the filter defines in
docs/metrics.md, every default refusal body in docs/responses.md, and every relative link between
the documentation pages resolves (file and anchor).

The field names come from the real parser (`keygate check-config`'s "unknown field …, expected one
of …" error for each object), the metric names and bodies from the Rust sources wherever they live,
so the test follows a change of layout.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
CLI = REPO / "target" / "release" / "keygate"
MINIMAL_KEY_LIST = {"cluster": "k", "path": "/"}


def rust_sources() -> list[Path]:
    return [p for p in REPO.rglob("*.rs") if "target" not in p.relative_to(REPO).parts]


def doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def expected_fields(cfg: dict) -> list[str]:
    """The members the parser accepts where `cfg` put the unknown member `zz_unknown`."""
    if not CLI.exists():
        pytest.fail(f"{CLI} is missing: run `make build` first")
    r = subprocess.run([str(CLI), "check-config", "-"], input=json.dumps(cfg), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1, r.stdout + r.stderr
    m = re.search(r"unknown field `zz_unknown`, expected (?:one of )?(.*?) at line", r.stderr)
    assert m, r.stderr
    return re.findall(r"`([^`]+)`", m.group(1))


# Where each object of the configuration sits, as a configuration holding `zz_unknown` there.
U = {"zz_unknown": 1}
OBJECTS = {
    "": {"key_list": MINIMAL_KEY_LIST, **U},
    "key_list": {"key_list": {**MINIMAL_KEY_LIST, **U}},
    "credentials[]": {"key_list": MINIMAL_KEY_LIST, "credentials": [U]},
    "exempt[]": {"key_list": MINIMAL_KEY_LIST, "exempt": [U]},
    "client_ip": {"key_list": MINIMAL_KEY_LIST, "client_ip": U},
    "site": {"key_list": MINIMAL_KEY_LIST, "site": U},
    "routes[]": {"key_list": MINIMAL_KEY_LIST, "routes": [U]},
    "rate_limit": {"key_list": MINIMAL_KEY_LIST, "rate_limit": U},
    "limit": {"key_list": MINIMAL_KEY_LIST, "rate_limit": {"default": [U]}},
    "rate_limit.global": {"key_list": MINIMAL_KEY_LIST, "rate_limit": {"global": {"cluster": "c", **U}}},
    "invalid_key_limit": {"key_list": MINIMAL_KEY_LIST, "invalid_key_limit": U},
    "upstream": {"key_list": MINIMAL_KEY_LIST, "upstream": U},
    "errors.<class>": {"key_list": MINIMAL_KEY_LIST, "errors": {"forbidden": U}},
    "whoami": {"key_list": MINIMAL_KEY_LIST, "whoami": U},
    "usage": {"key_list": MINIMAL_KEY_LIST, "usage": U},
}


@pytest.mark.parametrize("where", list(OBJECTS))
def test_every_configuration_field_is_documented(where):
    text = doc("configuration.md")
    fields = expected_fields(OBJECTS[where])
    assert fields, where
    # Documented as `name`, `where.name`, or inside a JSON form such as `{"header": NAME}`.
    missing = [f for f in fields if not any(s in text for s in (f"`{f}`", f"`{where}.{f}`", f'"{f}"'))]
    assert not missing, f"docs/configuration.md does not document {where or 'top-level'} fields {missing}"


def test_every_metric_is_documented():
    names = set()
    for p in rust_sources():
        src = p.read_text(encoding="utf-8")
        if "MetricType" in src:  # the module that defines the metrics
            names |= set(re.findall(r'"(keygate_[a-z_.]+)"', src))
    assert len(names) >= 16, names
    text = doc("metrics.md")

    # `name.tag.value` is documented in its Prometheus form (envoy/prometheus/stats_tags.yaml).
    def prometheus(n: str) -> str:
        m = re.fullmatch(r"(keygate_[a-z_]+)\.([a-z_]+)\.([a-z_]+)", n)
        return f'{m.group(1)}{{{m.group(2)}="{m.group(3)}"}}' if m else n

    missing = sorted(n for n in names if f"`{prometheus(n)}`" not in text)
    assert not missing, f"docs/metrics.md does not document {missing}"


def test_every_default_body_is_documented():
    bodies = set()
    for p in rust_sources():
        src = p.read_text(encoding="utf-8")
        if "fn default_body" in src:  # the module that holds the classes' defaults
            bodies |= set(re.findall(r'r#"(\{"error":\{"code":"[a-z_]+","message":"[^"]*"[^\n]*?)"#', src))
    codes = {json.loads(b.replace("{retry_after}", "0"))["error"]["code"] for b in bodies}
    assert {"missing_key", "invalid_key", "expired_key", "forbidden", "ip_denied", "rate_limited",
            "unavailable"} <= codes, codes
    text = doc("responses.md")
    missing = sorted(b for b in bodies if f"`{b}`" not in text)
    assert not missing, f"docs/responses.md does not show the default bodies {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_documentation_links_resolve():
    pages = sorted(DOCS.glob("*.md")) + [REPO / "README.md"]
    anchors = {p.resolve(): {_slug(h) for h in re.findall(r"^#+ (.*)$", p.read_text(encoding="utf-8"), re.M)}
               for p in pages}
    broken = []
    for p in pages:
        for link in re.findall(r"\]\(([^)\s]+)\)", p.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, frag = link.partition("#")
            target = (p.parent / path).resolve() if path else p.resolve()
            if not target.exists():
                broken.append(f"{p.name}: {link} (no such file)")
            elif frag and target in anchors and frag not in anchors[target]:
                broken.append(f"{p.name}: {link} (no such heading)")
    assert not broken, "\n".join(broken)
    assert not re.search(r"\.\./shared", (REPO / "README.md").read_text(encoding="utf-8")), \
        "README.md must not point outside the repository"
