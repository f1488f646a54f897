#!/usr/bin/env python3
"""Offline validator for keygate's Istio manifests (no cluster, no network).

For every YAML document it checks what a Kubernetes API server with Istio's CRDs installed
would check before it stores the object, plus what keygate itself needs:

  1. the CRD's openAPIV3Schema (jsonschema), read the way Kubernetes reads a structural schema:
     `nullable`, `format: int32/int64`, `x-kubernetes-int-or-string`, and unknown fields are
     errors (additionalProperties false) wherever the CRD does not say
     x-kubernetes-preserve-unknown-fields (what `kubectl apply`'s strict field validation does);
  2. `x-kubernetes-list-type: map/set` uniqueness;
  3. the CRD's `x-kubernetes-validations` CEL rules (cel-python), with Kubernetes' URL
     library (isURL, url(...).getScheme() ...) ported from Go's net/url;
  4. object metadata: name present and a DNS-1123 subdomain, namespace a DNS-1123 label,
     labels and annotations string maps;
  5. for a WasmPlugin: its `pluginConfig`, converted to JSON the way istiod does
     (protobuf Struct -> protojson), must pass `keygate check-config` (the filter's own parser),
     and a `key_list.cluster` of the form outbound|PORT|SUBSET|HOST must name a port of a
     Service or ServiceEntry among the validated documents (and SUBSET a DestinationRule subset).

Kinds without a CRD at hand (ServiceEntry, DestinationRule unless you pass Istio's CRD bundle
with --crd; core Service and Namespace) get structural checks of the fields keygate relies on.

Usage:
  validate_istio.py [FILE ...]        validate files (default: envoy/istio/*.yaml)
  validate_istio.py --self-test       every document of wasm-valid.yaml must be accepted and every
                                      one of wasm-invalid.yaml refused with the error its `_err`
                                      names (istio/api's own fixtures)

The schemas and fixtures are read from <repo>/tests/data/istio (Istio's WasmPlugin CRD and
istio/api's fixtures, copied into the project; override with the environment variable
KEYGATE_ISTIO_SCHEMAS or --schemas DIR); every *.yaml there holding a CustomResourceDefinition
is loaded, and --crd FILE adds more (e.g. Istio's customresourcedefinitions.gen.yaml, to check
ServiceEntry and DestinationRule fully).

Exit status: 0 all valid, 1 something invalid, 2 bad usage or missing prerequisites.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import celpy
    import jsonschema
    import yaml
    from celpy import celtypes
except ImportError as e:  # pragma: no cover - environment problem
    sys.stderr.write(f"validate_istio: missing Python package ({e.name}); run `make deps` and use "
                     ".venv/bin/python (tests/requirements.txt lists jsonschema, cel-python, PyYAML)\n")
    sys.exit(2)

REPO = Path(__file__).resolve().parents[1]
ENV_SCHEMAS = "KEYGATE_ISTIO_SCHEMAS"
DEFAULT_KEYGATE = REPO / "target" / "release" / "keygate"
DEFAULT_SCHEMAS = REPO / "tests" / "data" / "istio"


def schemas_dir() -> Path:
    env = os.environ.get(ENV_SCHEMAS)
    return Path(env) if env else DEFAULT_SCHEMAS


# =============================================================================================
# YAML: what kubectl / sigs.k8s.io/yaml would read
# =============================================================================================
class _Loader(yaml.SafeLoader):
    """SafeLoader without timestamp resolution (a date stays a string, as in JSON), with mapping
    keys turned into strings (JSON has no other keys) and duplicate keys refused (kubectl
    refuses them too)."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for knode, vnode in node.value:
        key = loader.construct_object(knode, deep=True)
        if isinstance(key, bool):
            key = "true" if key else "false"
        elif key is None:
            key = "null"
        elif not isinstance(key, str):
            key = str(key)
        if key in out:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", knode.start_mark)
        out[key] = loader.construct_object(vnode, deep=deep)
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@dataclass
class Doc:
    source: str  # file name
    index: int  # 1-based position in the file
    line: int  # 1-based line of the document start
    obj: Any

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line} (document {self.index})"

    def describe(self) -> str:
        o = self.obj if isinstance(self.obj, dict) else {}
        md = o.get("metadata") if isinstance(o.get("metadata"), dict) else {}
        name = md.get("name", "?")
        ns = md.get("namespace")
        return f"{o.get('kind', '?')} {ns + '/' if ns else ''}{name}"


def load_docs(path: Path) -> list[Doc]:
    text = path.read_text(encoding="utf-8")
    docs = []
    loader = _Loader(text)
    try:
        i = 0
        while loader.check_node():
            node = loader.get_node()
            i += 1
            obj = loader.construct_document(node)
            if obj is None and node.tag == "tag:yaml.org,2002:null":
                continue  # an empty document (only comments)
            docs.append(Doc(str(path), i, node.start_mark.line + 1, obj))
    finally:
        loader.dispose()
    return docs


# =============================================================================================
# Go net/url, as used by Kubernetes' CEL URL library (k8s.io/apiserver/pkg/cel/library/urls.go)
# =============================================================================================
class GoURLError(ValueError):
    pass


_ENC_PATH, _ENC_PATH_SEGMENT, _ENC_HOST, _ENC_ZONE, _ENC_USERPASS, _ENC_QUERY, _ENC_FRAGMENT = range(1, 8)


def _ishex(c: str) -> bool:
    return c in "0123456789abcdefABCDEF"


def _should_escape(c: str, mode: int) -> bool:
    if c.isascii() and c.isalnum():
        return False
    if mode in (_ENC_HOST, _ENC_ZONE) and c in "!$&'()*+,;=:[]<>\"":
        return False
    if c in "-_.~":
        return False
    if c in "$&+,/:;=?@":
        if mode == _ENC_PATH:
            return c == "?"
        if mode == _ENC_PATH_SEGMENT:
            return c in "/;,?"
        if mode == _ENC_USERPASS:
            return c in "@/?:"
        if mode == _ENC_QUERY:
            return True
        if mode == _ENC_FRAGMENT:
            return False
    if mode == _ENC_FRAGMENT and c in "!()*":
        return False
    return True


def _unescape(s: str, mode: int) -> str:
    i = 0
    n = 0
    while i < len(s):
        c = s[i]
        if c == "%":
            n += 1
            if i + 2 >= len(s) or not _ishex(s[i + 1]) or not _ishex(s[i + 2]):
                raise GoURLError(f"invalid URL escape {s[i:i + 3]!r}")
            if mode == _ENC_HOST and int(s[i + 1], 16) < 8 and s[i:i + 3] != "%25":
                raise GoURLError(f"invalid URL escape {s[i:i + 3]!r}")
            if mode == _ENC_ZONE:
                v = int(s[i + 1:i + 3], 16)
                if s[i:i + 3] != "%25" and v != 0x20 and _should_escape(chr(v), _ENC_HOST):
                    raise GoURLError(f"invalid URL escape {s[i:i + 3]!r}")
            i += 3
        else:
            if mode in (_ENC_HOST, _ENC_ZONE) and ord(c) < 0x80 and _should_escape(c, mode):
                raise GoURLError(f"invalid character {c!r} in host name")
            i += 1
    if n == 0 and not (mode == _ENC_QUERY and "+" in s):
        return s
    out = bytearray()
    i = 0
    while i < len(s):
        c = s[i]
        if c == "%":
            out.append(int(s[i + 1:i + 3], 16))
            i += 3
            continue
        out += (b" " if (c == "+" and mode == _ENC_QUERY) else c.encode("utf-8", "surrogateescape"))
        i += 1
    return out.decode("utf-8", "surrogateescape")


def _escape(s: str, mode: int) -> str:
    out = []
    for b in s.encode("utf-8", "surrogateescape"):
        c = chr(b)
        if c == " " and mode == _ENC_QUERY:
            out.append("+")
        elif b >= 0x80 or _should_escape(c, mode):
            out.append(f"%{b:02X}")
        else:
            out.append(c)
    return "".join(out)


def _valid_optional_port(port: str) -> bool:
    return port == "" or (port[0] == ":" and all("0" <= c <= "9" for c in port[1:]))


@dataclass
class GoURL:
    scheme: str = ""
    opaque: str = ""
    user: tuple | None = None
    host: str = ""
    path: str = ""
    raw_path: str = ""
    force_query: bool = False
    raw_query: str = ""
    fragment: str = ""

    def escaped_path(self) -> str:
        if self.raw_path:
            try:
                if _unescape(self.raw_path, _ENC_PATH) == self.path:
                    return self.raw_path
            except GoURLError:
                pass
        if self.path == "*":
            return "*"
        return _escape(self.path, _ENC_PATH)

    def split_host_port(self) -> tuple[str, str]:
        host, port = self.host, ""
        colon = host.rfind(":")
        if colon != -1 and _valid_optional_port(host[colon:]):
            host, port = host[:colon], host[colon + 1:]
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return host, port


def _get_scheme(raw: str) -> tuple[str, str]:
    for i, c in enumerate(raw):
        if ("a" <= c <= "z") or ("A" <= c <= "Z"):
            continue
        if ("0" <= c <= "9") or c in "+-.":
            if i == 0:
                return "", raw
            continue
        if c == ":":
            if i == 0:
                raise GoURLError("missing protocol scheme")
            return raw[:i], raw[i + 1:]
        return "", raw
    return "", raw


def _parse_host(host: str) -> str:
    if host.startswith("["):
        i = host.rfind("]")
        if i < 0:
            raise GoURLError("missing ']' in host")
        colon_port = host[i + 1:]
        if not _valid_optional_port(colon_port):
            raise GoURLError(f"invalid port {colon_port!r} after host")
        zone = host[:i].find("%25")
        if zone >= 0:
            return (_unescape(host[:zone], _ENC_HOST) + _unescape(host[zone:i], _ENC_ZONE)
                    + _unescape(host[i:], _ENC_HOST))
    else:
        i = host.rfind(":")
        if i != -1 and not _valid_optional_port(host[i:]):
            raise GoURLError(f"invalid port {host[i:]!r} after host")
    return _unescape(host, _ENC_HOST)


_USERINFO_OK = set("-._:~!$&'()*+,;=%@")


def _parse_authority(authority: str) -> tuple[tuple | None, str]:
    i = authority.rfind("@")
    host = _parse_host(authority if i < 0 else authority[i + 1:])
    if i < 0:
        return None, host
    userinfo = authority[:i]
    if not all((c.isascii() and c.isalnum()) or c in _USERINFO_OK for c in userinfo):
        raise GoURLError("net/url: invalid userinfo")
    user, sep, password = userinfo.partition(":")
    return (_unescape(user, _ENC_USERPASS), _unescape(password, _ENC_USERPASS) if sep else None), host


def _go_parse(raw: str, via_request: bool) -> GoURL:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        raise GoURLError("net/url: invalid control character in URL")
    if raw == "" and via_request:
        raise GoURLError("empty url")
    u = GoURL()
    if raw == "*":
        u.path = "*"
        return u
    u.scheme, rest = _get_scheme(raw)
    u.scheme = u.scheme.lower()
    if rest.endswith("?") and rest.count("?") == 1:
        u.force_query = True
        rest = rest[:-1]
    else:
        rest, _, u.raw_query = rest.partition("?")
    if not rest.startswith("/"):
        if u.scheme:
            u.opaque = rest
            return u
        if via_request:
            raise GoURLError("invalid URI for request")
        segment = rest.split("/", 1)[0]
        if ":" in segment:
            raise GoURLError("first path segment in URL cannot contain colon")
    if (u.scheme or (not via_request and not rest.startswith("///"))) and rest.startswith("//"):
        authority, rest = rest[2:], ""
        i = authority.find("/")
        if i >= 0:
            authority, rest = authority[:i], authority[i:]
        u.user, u.host = _parse_authority(authority)
    u.path = _unescape(rest, _ENC_PATH)
    u.raw_path = "" if _escape(u.path, _ENC_PATH) == rest else rest
    return u


def go_parse_request_uri(raw: str) -> GoURL:
    return _go_parse(raw, True)


def go_parse(raw: str) -> GoURL:
    base, sep, frag = raw.partition("#")
    u = _go_parse(base, False)
    if sep and frag:
        u.fragment = _unescape(frag, _ENC_FRAGMENT)
    return u


class CelURL(celtypes.MessageType):
    """The value of CEL's url(string)."""

    def __init__(self, u: GoURL):
        super().__init__()
        self.u = u


def _cel_is_url(s):
    if not isinstance(s, str):
        return celpy.CELEvalError("no such overload: isURL", TypeError)
    try:
        go_parse_request_uri(str(s))
        return celtypes.BoolType(True)
    except GoURLError:
        return celtypes.BoolType(False)


def _cel_url(s):
    if not isinstance(s, str):
        return celpy.CELEvalError("no such overload: url", TypeError)
    try:
        go_parse_request_uri(str(s))
        return CelURL(go_parse(str(s)))
    except GoURLError as e:
        return celpy.CELEvalError(f"URL parse error during conversion from string: {e}", ValueError)


def _url_method(fn):
    def method(u):
        if not isinstance(u, CelURL):
            return celpy.CELEvalError("no such overload", TypeError)
        return fn(u.u)
    return method


def _cel_query(u: GoURL):
    result: dict = {}
    for part in u.raw_query.split("&"):
        if not part or ";" in part:
            continue
        k, _, v = part.partition("=")
        try:
            k, v = _unescape(k, _ENC_QUERY), _unescape(v, _ENC_QUERY)
        except GoURLError:
            continue
        result.setdefault(k, []).append(v)
    return celtypes.MapType({celtypes.StringType(k): celtypes.ListType([celtypes.StringType(x) for x in v])
                             for k, v in result.items()})


def _cel_err(msg: str) -> "celpy.CELEvalError":
    return celpy.CELEvalError(msg, ValueError)


def _str_only(fn):
    def wrapped(s, *args):
        if not isinstance(s, str):
            return _cel_err(f"no such overload: {fn.__name__.lstrip('_')}")
        try:
            return fn(str(s), *args)
        except (IndexError, ValueError) as e:
            return _cel_err(str(e))
    wrapped.__name__ = fn.__name__
    return wrapped


# Kubernetes enables cel-go's strings extension (ext.Strings) and its own list library; the
# functions CRDs use most are here. An unknown function is an evaluation error, which counts
# as a validation failure (never as a pass).
@_str_only
def _char_at(s, i):
    i = int(i)
    if not 0 <= i <= len(s):
        raise IndexError(f"index out of range: {i}")
    return celtypes.StringType(s[i:i + 1])


@_str_only
def _index_of(s, sub, offset=0):
    offset = int(offset)
    if not 0 <= offset <= len(s):
        raise IndexError(f"index out of range: {offset}")
    return celtypes.IntType(s.find(str(sub), offset))


@_str_only
def _last_index_of(s, sub, offset=None):
    end = len(s) if offset is None else int(offset)
    if not 0 <= end <= len(s):
        raise IndexError(f"index out of range: {end}")
    return celtypes.IntType(s.rfind(str(sub), 0, end + len(str(sub))))


@_str_only
def _substring(s, start, end=None):
    start = int(start)
    end = len(s) if end is None else int(end)
    if not 0 <= start <= end <= len(s):
        raise IndexError(f"index out of range: {start if not 0 <= start <= len(s) else end}")
    return celtypes.StringType(s[start:end])


@_str_only
def _lower_ascii(s):
    return celtypes.StringType("".join(c.lower() if c.isascii() else c for c in s))


@_str_only
def _upper_ascii(s):
    return celtypes.StringType("".join(c.upper() if c.isascii() else c for c in s))


@_str_only
def _replace(s, old, new, n=-1):
    return celtypes.StringType(s.replace(str(old), str(new), int(n)))


@_str_only
def _split(s, sep, n=-1):
    n = int(n)
    if n == 0:
        return celtypes.ListType([])
    parts = s.split(str(sep), n - 1) if n > 0 else s.split(str(sep))
    return celtypes.ListType([celtypes.StringType(x) for x in parts])


@_str_only
def _trim(s):
    return celtypes.StringType(s.strip())


def _join(lst, sep=""):
    if not isinstance(lst, list):
        return _cel_err("no such overload: join")
    return celtypes.StringType(str(sep).join(str(x) for x in lst))


def _is_sorted(lst):
    if not isinstance(lst, list):
        return _cel_err("no such overload: isSorted")
    return celtypes.BoolType(all(a <= b for a, b in zip(lst, lst[1:])))


CEL_FUNCTIONS = {
    "charAt": _char_at,
    "indexOf": _index_of,
    "lastIndexOf": _last_index_of,
    "substring": _substring,
    "lowerAscii": _lower_ascii,
    "upperAscii": _upper_ascii,
    "replace": _replace,
    "split": _split,
    "trim": _trim,
    "join": _join,
    "isSorted": _is_sorted,
    "isURL": _cel_is_url,
    "url": _cel_url,
    "getScheme": _url_method(lambda u: celtypes.StringType(u.scheme)),
    "getHost": _url_method(lambda u: celtypes.StringType(u.host)),
    "getHostname": _url_method(lambda u: celtypes.StringType(u.split_host_port()[0])),
    "getPort": _url_method(lambda u: celtypes.StringType(u.split_host_port()[1])),
    "getEscapedPath": _url_method(lambda u: celtypes.StringType(u.escaped_path())),
    "getQuery": _url_method(_cel_query),
}

_CEL_ENV = celpy.Environment()
_CEL_CACHE: dict[str, Any] = {}


def cel_eval(expr: str, value: Any):
    """Evaluate a CEL expression with `self` bound to `value`; returns the CEL result or raises."""
    prog = _CEL_CACHE.get(expr)
    if prog is None:
        prog = _CEL_ENV.program(_CEL_ENV.compile(expr), functions=CEL_FUNCTIONS)
        _CEL_CACHE[expr] = prog
    result = prog.evaluate({"self": celpy.json_to_cel(value)})
    if isinstance(result, celpy.CELEvalError):
        raise result
    return result


# =============================================================================================
# Structural schema (CRD openAPIV3Schema) -> JSON Schema + Kubernetes keywords
# =============================================================================================
_COPY_KEYWORDS = ("enum", "minLength", "maxLength", "pattern", "minimum", "maximum", "multipleOf",
                  "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties", "required")
_INT_FORMATS = {"int32": (-(2 ** 31), 2 ** 31 - 1), "int64": (-(2 ** 63), 2 ** 63 - 1)}


def convert_schema(s: dict, root: bool = False) -> dict:
    out: dict = {}
    t = s.get("type")
    nullable = bool(s.get("nullable"))
    if t:
        out["type"] = [t, "null"] if nullable else t
        out["x-k8s-type"] = t
    for kw in _COPY_KEYWORDS:
        if kw in s:
            out[kw] = s[kw]
    if "enum" in out and nullable and None not in out["enum"]:
        out["enum"] = [*out["enum"], None]
    # OpenAPI 3.0 boolean exclusiveMinimum/Maximum -> JSON Schema numbers.
    for ex, base in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if s.get(ex) is True and base in s:
            out.pop(base, None)
            out[ex] = s[base]
    if t == "integer" and s.get("format") in _INT_FORMATS:
        lo, hi = _INT_FORMATS[s["format"]]
        out.setdefault("minimum", lo)
        out.setdefault("maximum", hi)
    if "properties" in s:
        out["properties"] = {k: convert_schema(v) for k, v in s["properties"].items()}
    if root:
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    ap = s.get("additionalProperties")
    if isinstance(ap, dict):
        out["additionalProperties"] = convert_schema(ap)
    elif ap is not None:
        out["additionalProperties"] = bool(ap)
    elif t == "object" and not s.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if "items" in s:
        out["items"] = convert_schema(s["items"])
    for comb in ("anyOf", "allOf", "oneOf"):
        if comb in s:
            out[comb] = [convert_schema(x) for x in s[comb]]
    if "not" in s:
        out["not"] = convert_schema(s["not"])
    for kw in ("x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys"):
        if kw in s:
            out[kw] = s[kw]
    return out


_JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}


def _has_type(value: Any, t: str | None) -> bool:
    if t is None:
        return value is not None
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _JSON_TYPES.get(t, object))


def _go_value(v: Any) -> str:
    """A short Go-ish rendering of a value for error messages."""
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def _cel_error_text(e: Exception) -> str:
    """A one-line reason from a cel-python error (they nest the Python cause in their args)."""
    args = getattr(e, "args", ())
    text = str(args[0]) if args else str(e)
    if len(args) >= 3 and isinstance(args[2], tuple) and args[2]:
        text = str(args[2][0])
    if text.startswith("undeclared reference to"):
        text = text.split(" (in activation", 1)[0] + " (a CEL function this validator does not implement)"
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _kw_validations(validator, rules, instance, schema):
    t = schema.get("x-k8s-type")
    if not _has_type(instance, t):
        return  # a type error is reported by `type`; Kubernetes does not run the rules then
    for rule in rules:
        expr = rule.get("rule", "")
        if "oldSelf" in expr:
            continue  # a transition rule: not evaluated when an object is created
        try:
            ok = cel_eval(expr, instance)
        except Exception as e:  # noqa: BLE001 - any CEL failure is a validation error
            # As the API server words it: "<error> evaluating rule: <message, else the rule>".
            yield jsonschema.ValidationError(f"Invalid value: {_go_value(t or 'object')}: "
                                             f"{_cel_error_text(e)} evaluating rule: {rule.get('message') or expr}")
            continue
        if ok is True or (isinstance(ok, celtypes.BoolType) and bool(ok)):
            continue
        if not isinstance(ok, celtypes.BoolType):
            yield jsonschema.ValidationError(f"Invalid value: {_go_value(t or 'object')}: rule did not evaluate "
                                             f"to a bool: {rule.get('message') or expr}")
            continue
        msg = rule.get("message")
        if rule.get("messageExpression"):
            try:
                msg = str(cel_eval(rule["messageExpression"], instance))
            except Exception:  # noqa: BLE001
                pass
        if not msg:
            msg = f"failed rule: {expr}"
        path = []
        if rule.get("fieldPath"):
            path = [p for p in re.split(r"\.|\[|\]", rule["fieldPath"].lstrip(".")) if p]
        yield jsonschema.ValidationError(f"Invalid value: {_go_value(t or 'object')}: {msg}", path=path)


def _kw_list_type(validator, list_type, instance, schema):
    if not isinstance(instance, list):
        return
    seen: dict[str, int] = {}
    for i, item in enumerate(instance):
        if list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            if not isinstance(item, dict) or any(k not in item for k in keys):
                continue  # missing keys are `required` errors
            ident = _go_value({k: item[k] for k in keys})
        elif list_type == "set":
            ident = _go_value(item)
        else:
            continue
        if ident in seen:
            yield jsonschema.ValidationError(f"Duplicate value: {ident}", path=[i])
        else:
            seen[ident] = i


_K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    {"x-kubernetes-validations": _kw_validations, "x-kubernetes-list-type": _kw_list_type},
)


def fmt_path(path) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(p)):
            out += ("." if out else "") + str(p)
        else:
            out += f"[{p}]"
    return out


def _k8s_type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(v), type(v).__name__)


def k8s_message(err: jsonschema.ValidationError) -> list[str]:
    """Render a jsonschema error the way the Kubernetes API server words it."""
    path = fmt_path(err.absolute_path)
    here = path or "<root>"
    kw, val, inst = err.validator, err.validator_value, err.instance
    if kw == "type":
        want = val[0] if isinstance(val, list) else val
        return [f"{here} in body must be of type {want}: {_go_value(_k8s_type_name(inst))}"]
    if kw == "required":
        return [f"{fmt_path([*err.absolute_path, p])}: Required value"
                for p in val if isinstance(inst, dict) and p not in inst][:1] or [f"{here}: Required value"]
    if kw == "additionalProperties" and val is False and isinstance(inst, dict):
        known = set((err.schema or {}).get("properties", {}))
        return [f'unknown field "{fmt_path([*err.absolute_path, k])}"' for k in inst if k not in known]
    if kw == "enum":
        return [f"{here}: Unsupported value: {_go_value(inst)}: supported values: "
                + ", ".join(_go_value(v) for v in val if v is not None)]
    invalid = f"{here}: Invalid value: {_go_value(inst)}: "
    if kw == "minLength":
        return [f"{invalid}{here} in body should be at least {val} chars long"]
    if kw == "maxLength":
        return [f"{here}: Too long: may not be more than {val} bytes"]
    if kw == "pattern":
        return [f"{invalid}{here} in body should match '{val}'"]
    if kw == "minimum":
        return [f"{invalid}{here} in body should be greater than or equal to {val}"]
    if kw == "maximum":
        return [f"{invalid}{here} in body should be less than or equal to {val}"]
    if kw == "exclusiveMinimum":
        return [f"{invalid}{here} in body should be greater than {val}"]
    if kw == "exclusiveMaximum":
        return [f"{invalid}{here} in body should be less than {val}"]
    if kw == "maxItems":
        return [f"{here}: Too many: {len(inst)}: must have at most {val} items"]
    if kw == "minItems":
        return [f"{here} in body should have at least {val} items"]
    if kw == "maxProperties":
        return [f"{here}: Too many: {len(inst)}: must have at most {val} items"]
    if kw == "minProperties":
        return [f"{here} in body should have at least {val} properties"]
    if kw in ("x-kubernetes-validations", "x-kubernetes-list-type"):
        return [f"{here}: {err.message}"]
    return [f"{here}: {err.message}"]


# =============================================================================================
# Object metadata (what the API server checks for every object)
# =============================================================================================
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def _check_qualified_key(key: str, where: str) -> list[str]:
    prefix, sep, name = key.rpartition("/")
    errs = []
    if sep and (not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(prefix)):
        errs.append(f"{where}: Invalid value: {key!r}: prefix part must be a lowercase RFC 1123 subdomain")
    if not name or len(name) > 63 or not _QUALIFIED_NAME.fullmatch(name):
        errs.append(f"{where}: Invalid value: {key!r}: name part must consist of alphanumeric characters, "
                    "'-', '_' or '.', and must start and end with an alphanumeric character")
    return errs


def check_metadata(obj: dict, namespaced: bool = True) -> list[str]:
    md = obj.get("metadata")
    if md is None:
        return ["metadata: Required value"]
    if not isinstance(md, dict):
        return [f"metadata in body must be of type object: {_go_value(_k8s_type_name(md))}"]
    errs = []
    name = md.get("name")
    if name is None and not md.get("generateName"):
        errs.append("metadata.name: Required value: name or generateName is required")
    elif name is not None and (not isinstance(name, str) or len(name) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(name)):
        errs.append(f"metadata.name: Invalid value: {_go_value(name)}: a lowercase RFC 1123 subdomain must consist "
                    "of lower case alphanumeric characters, '-' or '.', and must start and end with an "
                    "alphanumeric character")
    ns = md.get("namespace")
    if ns is not None:
        if not namespaced:
            errs.append("metadata.namespace: Forbidden: not allowed on this type")
        elif not isinstance(ns, str) or len(ns) > 63 or not _DNS1123_LABEL.fullmatch(ns):
            errs.append(f"metadata.namespace: Invalid value: {_go_value(ns)}: a lowercase RFC 1123 label must "
                        "consist of lower case alphanumeric characters or '-'")
    for field_name in ("labels", "annotations"):
        m = md.get(field_name)
        if m is None:
            continue
        if not isinstance(m, dict):
            errs.append(f"metadata.{field_name} in body must be of type object: {_go_value(_k8s_type_name(m))}")
            continue
        for k, v in m.items():
            where = f"metadata.{field_name}"
            errs += _check_qualified_key(k, where)
            if not isinstance(v, str):
                errs.append(f"{where}[{k}] in body must be of type string: {_go_value(_k8s_type_name(v))}")
            elif field_name == "labels" and (len(v) > 63 or not _LABEL_VALUE.fullmatch(v)):
                errs.append(f"{where}: Invalid value: {_go_value(v)}: a valid label must be an empty string or "
                            "consist of alphanumeric characters, '-', '_' or '.'")
    if isinstance(md.get("annotations"), dict):
        size = sum(len(k) + len(str(v)) for k, v in md["annotations"].items())
        if size > 256 * 1024:
            errs.append(f"metadata.annotations: Too long: must have at most 262144 bytes ({size})")
    return errs


# =============================================================================================
# Validators per kind
# =============================================================================================
@dataclass
class CRDKind:
    group: str
    version: str
    kind: str
    namespaced: bool
    validator: Any


def load_crds(paths: list[Path]) -> dict[tuple[str, str], CRDKind]:
    kinds: dict[tuple[str, str], CRDKind] = {}
    for p in paths:
        for d in load_docs(p):
            o = d.obj
            if not isinstance(o, dict) or o.get("kind") != "CustomResourceDefinition":
                continue
            spec = o["spec"]
            for ver in spec.get("versions", []):
                schema = ((ver.get("schema") or {}).get("openAPIV3Schema"))
                if not schema:
                    continue
                js = convert_schema(schema, root=True)
                _K8sValidator.check_schema(js)
                kinds[(f"{spec['group']}/{ver['name']}", spec["names"]["kind"])] = CRDKind(
                    spec["group"], ver["name"], spec["names"]["kind"], spec.get("scope") == "Namespaced",
                    _K8sValidator(js))
    return kinds


def validate_with_crd(obj: dict, crd: CRDKind) -> list[str]:
    errs: list[str] = []
    for e in sorted(crd.validator.iter_errors(obj), key=lambda e: (list(map(str, e.absolute_path)), str(e.validator))):
        for m in k8s_message(e):
            if m not in errs:
                errs.append(m)
    return errs


def _port_number_ok(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535


NO_SCHEMA = "metadata only (no CRD given)"


def structural_builtin(obj: dict) -> tuple[list[str], str]:
    """Checks for kinds without a CRD at hand: the fields keygate's manifests rely on."""
    kind, api = obj.get("kind"), obj.get("apiVersion")
    spec = obj.get("spec")
    errs: list[str] = []
    if kind == "Namespace" and api == "v1":
        return check_metadata(obj, namespaced=False), "core v1 checks"
    if kind == "Service" and api == "v1":
        if not isinstance(spec, dict):
            return ["spec: Required value"], "core v1 checks"
        ports = spec.get("ports")
        if not isinstance(ports, list) or not ports:
            errs.append("spec.ports: Required value")
        else:
            names = set()
            for i, p in enumerate(ports):
                if not isinstance(p, dict) or not _port_number_ok(p.get("port")):
                    errs.append(f"spec.ports[{i}].port: Invalid value: must be between 1 and 65535")
                    continue
                if len(ports) > 1 and not p.get("name"):
                    errs.append(f"spec.ports[{i}].name: Required value")
                if p.get("name") in names:
                    errs.append(f"spec.ports[{i}].name: Duplicate value: {p.get('name')!r}")
                names.add(p.get("name"))
                if p.get("protocol", "TCP") not in ("TCP", "UDP", "SCTP"):
                    errs.append(f"spec.ports[{i}].protocol: Unsupported value: {p.get('protocol')!r}")
        if "selector" in spec and not isinstance(spec["selector"], dict):
            errs.append("spec.selector in body must be of type object")
        return errs, "core v1 checks"
    if api and api.startswith("networking.istio.io/") and kind in ("ServiceEntry", "DestinationRule"):
        if not isinstance(spec, dict):
            return ["spec in body must be of type object"], "built-in checks (no CRD given)"
        if kind == "ServiceEntry":
            hosts = spec.get("hosts")
            if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
                errs.append("spec.hosts: Required value: at least one host")
            for i, p in enumerate(spec.get("ports") or []):
                if not isinstance(p, dict) or not _port_number_ok(p.get("number")):
                    errs.append(f"spec.ports[{i}].number: Invalid value: must be between 1 and 65535")
                if isinstance(p, dict) and not p.get("name"):
                    errs.append(f"spec.ports[{i}].name: Required value")
            if spec.get("resolution") not in (None, "NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"):
                errs.append(f"spec.resolution: Unsupported value: {spec.get('resolution')!r}")
            if spec.get("location") not in (None, "MESH_EXTERNAL", "MESH_INTERNAL"):
                errs.append(f"spec.location: Unsupported value: {spec.get('location')!r}")
        else:
            if not isinstance(spec.get("host"), str) or not spec.get("host"):
                errs.append("spec.host: Required value")
            seen = set()
            for i, s in enumerate(spec.get("subsets") or []):
                if not isinstance(s, dict) or not s.get("name"):
                    errs.append(f"spec.subsets[{i}].name: Required value")
                elif s["name"] in seen:
                    errs.append(f"spec.subsets[{i}]: Duplicate value: {s['name']!r}")
                else:
                    seen.add(s["name"])
        return errs, "built-in checks (no CRD given)"
    if isinstance(api, str) and re.fullmatch(r"[a-z0-9.-]+\.istio\.io/v[0-9a-z]+", api):
        return [], NO_SCHEMA
    return [f"no schema for apiVersion {api!r} kind {kind!r} (pass its CRD with --crd)"], "unknown kind"


# =============================================================================================
# keygate: pluginConfig and the key service it names
# =============================================================================================
def protojson(value: Any) -> Any:
    """What istiod sends as the plugin configuration: pluginConfig is a google.protobuf.Struct,
    so every number is a double, written by protojson like Go's encoding/json ('f' format below
    1e21): 30 -> 30, 1.0 -> 1, 2**60 -> 1152921504606846976 (rounded to a double)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        f = float(value)
        if math.isfinite(f) and f == int(f) and abs(f) < 1e21:
            return int(f)
        return f
    if isinstance(value, list):
        return [protojson(v) for v in value]
    if isinstance(value, dict):
        return {str(k): protojson(v) for k, v in value.items()}
    raise TypeError(f"pluginConfig holds a {type(value).__name__}, which is not JSON")


def check_plugin_config(obj: dict, keygate: Path) -> list[str]:
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    if "pluginConfig" not in spec:
        return ["spec.pluginConfig: Required value: keygate needs at least key_list.cluster and key_list.path"]
    try:
        text = json.dumps(protojson(spec["pluginConfig"]), separators=(",", ":"))
    except TypeError as e:
        return [f"spec.pluginConfig: {e}"]
    if not keygate.exists():
        return [f"spec.pluginConfig: cannot check: {keygate} is missing (run `make cli`), "
                "or pass --skip-plugin-config"]
    try:
        r = subprocess.run([str(keygate), "check-config", "-"], input=text.encode(), capture_output=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"spec.pluginConfig: cannot run {keygate} check-config: {e}"]
    out = (r.stdout + r.stderr).decode("utf-8", "replace").strip()
    if r.returncode == 0 and r.stdout.decode().strip() == "ok":
        return []
    return [f"spec.pluginConfig: keygate check-config refused it (exit {r.returncode}): {out}"]


def known_clusters(docs: list[Doc]) -> tuple[dict[tuple[str, int], str], dict[str, set[str]]]:
    """Istio outbound clusters the documents create: (host, port) -> what defines it, and the
    DestinationRule subsets per host."""
    ports: dict[tuple[str, int], str] = {}
    subsets: dict[str, set[str]] = {}
    for d in docs:
        o = d.obj
        if not isinstance(o, dict) or not isinstance(o.get("spec"), dict):
            continue
        md = o.get("metadata") if isinstance(o.get("metadata"), dict) else {}
        ns = md.get("namespace") or "default"
        spec = o["spec"]
        if o.get("kind") == "Service" and o.get("apiVersion") == "v1":
            host = f"{md.get('name')}.{ns}.svc.cluster.local"
            for p in spec.get("ports") or []:
                if isinstance(p, dict) and _port_number_ok(p.get("port")):
                    ports[(host, p["port"])] = f"Service {ns}/{md.get('name')} ({d.where})"
        elif o.get("kind") == "ServiceEntry":
            for h in spec.get("hosts") or []:
                for p in spec.get("ports") or []:
                    if isinstance(p, dict) and _port_number_ok(p.get("number")):
                        ports[(str(h), p["number"])] = f"ServiceEntry {ns}/{md.get('name')} ({d.where})"
        elif o.get("kind") == "DestinationRule" and isinstance(spec.get("host"), str):
            host = spec["host"]
            if "." not in host:
                host = f"{host}.{ns}.svc.cluster.local"
            subsets.setdefault(host, set()).update(
                s["name"] for s in spec.get("subsets") or [] if isinstance(s, dict) and s.get("name"))
    return ports, subsets


def check_key_service(obj: dict, docs: list[Doc]) -> list[str]:
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    cfg = spec.get("pluginConfig")
    kl = cfg.get("key_list") if isinstance(cfg, dict) else None
    cluster = kl.get("cluster") if isinstance(kl, dict) else None
    if not isinstance(cluster, str):
        return []
    parts = cluster.split("|")
    if len(parts) != 4 or parts[0] not in ("outbound", "inbound"):
        return [f"spec.pluginConfig.key_list.cluster: {cluster!r} is not an Istio cluster name "
                "(outbound|PORT|SUBSET|HOST); in a mesh only those exist"]
    direction, port, subset, host = parts
    if direction != "outbound":
        return [f"spec.pluginConfig.key_list.cluster: {cluster!r}: the key service is reached through an "
                "outbound cluster (outbound|PORT|SUBSET|HOST)"]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return [f"spec.pluginConfig.key_list.cluster: {cluster!r}: {port!r} is not a port"]
    ports, subsets = known_clusters(docs)
    if (host, int(port)) not in ports:
        have = ", ".join(f"outbound|{p}||{h}" for h, p in sorted(ports)) or "none"
        return [f"spec.pluginConfig.key_list.cluster: {cluster!r}: no Service or ServiceEntry among the validated "
                f"documents defines host {host} port {port} (clusters defined: {have}); "
                "pass the file that does, or --no-cross-check"]
    if subset and subset not in subsets.get(host, set()):
        return [f"spec.pluginConfig.key_list.cluster: {cluster!r}: no DestinationRule for {host} defines "
                f"subset {subset!r}"]
    return []


# =============================================================================================
# Driver
# =============================================================================================
@dataclass
class Result:
    doc: Doc
    errors: list[str]
    checks: str
    warnings: list[str] = field(default_factory=list)


def validate_doc(doc: Doc, crds: dict, all_docs: list[Doc], keygate: Path | None,
                 cross_check: bool) -> Result:
    o = doc.obj
    if not isinstance(o, dict):
        return Result(doc, [f"document is a {_k8s_type_name(o)}, not an object"], "-")
    api, kind = o.get("apiVersion"), o.get("kind")
    if not isinstance(api, str) or not api:
        return Result(doc, ["apiVersion: Required value"], "-")
    if not isinstance(kind, str) or not kind:
        return Result(doc, ["kind: Required value"], "-")
    crd = crds.get((api, kind))
    if crd is not None:
        errs = validate_with_crd(o, crd) + check_metadata(o, crd.namespaced)
        checks = "CRD schema + CEL"
    else:
        errs, checks = structural_builtin(o)
        if kind not in ("Namespace",):
            errs += check_metadata(o)
    warnings: list[str] = []
    if checks == NO_SCHEMA:
        warnings.append(f"no CRD for {api} {kind}: only metadata checked (pass Istio's CRD bundle with --crd)")
    if kind == "WasmPlugin" and keygate is not None:
        errs += check_plugin_config(o, keygate)
        checks += " + keygate check-config"
        if cross_check:
            errs += check_key_service(o, all_docs)
            checks += " + key-service cluster"
        spec = o.get("spec") if isinstance(o.get("spec"), dict) else {}
        if spec.get("failStrategy") in (None, "FAIL_OPEN"):
            warnings.append("failStrategy is not FAIL_CLOSE: if the module cannot be fetched or loaded, "
                            "requests pass without API-key checks")
        if str(spec.get("url", "")).startswith("oci://") and not spec.get("sha256"):
            warnings.append("oci:// url without sha256: the image is not pinned")
    return Result(doc, errs, checks, warnings)


def default_crd_files(sdir: Path) -> list[Path]:
    if not sdir.is_dir():
        return []
    return sorted(p for p in sdir.glob("*.yaml")
                  if "CustomResourceDefinition" in p.read_text(encoding="utf-8", errors="replace")[:4096])


def self_test(sdir: Path, crds: dict, verbose: bool) -> int:
    pairs = sorted(sdir.glob("*-valid.yaml"))
    if not pairs:
        print(f"validate_istio: no *-valid.yaml fixtures in {sdir}", file=sys.stderr)
        return 2
    failures = total = 0
    for valid_file in pairs:
        invalid_file = valid_file.with_name(valid_file.name.replace("-valid.yaml", "-invalid.yaml"))
        for path, want_valid in ((valid_file, True), (invalid_file, False)):
            if not path.exists():
                print(f"FAIL {path}: missing")
                failures += 1
                continue
            for d in load_docs(path):
                total += 1
                want_err = None
                if isinstance(d.obj, dict):
                    want_err = d.obj.pop("_err", None)
                r = validate_doc(d, crds, [], None, False)
                name = d.describe()
                if want_valid:
                    ok = not r.errors
                    detail = "accepted" if ok else "refused: " + "; ".join(r.errors)
                else:
                    matched = want_err is None or any(want_err in e for e in r.errors)
                    ok = bool(r.errors) and matched
                    if not r.errors:
                        detail = f"accepted, but should be refused with {want_err!r}"
                    elif not matched:
                        detail = f"refused, but without {want_err!r}: " + "; ".join(r.errors)
                    else:
                        detail = "refused: " + next((e for e in r.errors if want_err and want_err in e), r.errors[0])
                if not ok:
                    failures += 1
                if verbose or not ok:
                    print(f"{'ok  ' if ok else 'FAIL'} {Path(path).name}:{d.line} {name}: {detail}")
    print(f"self-test: {total - failures}/{total} fixture documents as expected ({sdir})")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="YAML files (default: envoy/istio/*.yaml)")
    ap.add_argument("--self-test", action="store_true", help="check the validator against istio/api's fixtures")
    ap.add_argument("--schemas", type=Path, default=None,
                    help=f"directory with the CRD(s) and fixtures (default ${ENV_SCHEMAS} or tests/data/istio)")
    ap.add_argument("--crd", type=Path, action="append", default=[], help="another file with CRDs (repeatable)")
    ap.add_argument("--keygate", type=Path, default=DEFAULT_KEYGATE,
                    help="the keygate CLI used for `check-config` (default target/release/keygate)")
    ap.add_argument("--skip-plugin-config", action="store_true", help="do not run keygate check-config")
    ap.add_argument("--no-cross-check", action="store_true",
                    help="do not require key_list.cluster to name a Service/ServiceEntry among the files")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    sdir = args.schemas or schemas_dir()
    crd_files = default_crd_files(sdir) + args.crd
    if not crd_files:
        print(f"validate_istio: no CRD found in {sdir} (set {ENV_SCHEMAS} or pass --crd FILE)", file=sys.stderr)
        return 2
    try:
        crds = load_crds(crd_files)
    except (OSError, yaml.YAMLError, jsonschema.SchemaError, KeyError) as e:
        print(f"validate_istio: cannot load CRDs: {e}", file=sys.stderr)
        return 2
    if args.verbose:
        print("schemas: " + ", ".join(f"{k[0]} {k[1]}" for k in sorted(crds)))

    if args.self_test:
        return self_test(sdir, crds, args.verbose)

    files = args.files or sorted((REPO / "envoy" / "istio").glob("*.yaml"))
    if not files:
        print("validate_istio: no files", file=sys.stderr)
        return 2
    docs: list[Doc] = []
    for f in files:
        try:
            docs += load_docs(f)
        except (OSError, yaml.YAMLError) as e:
            print(f"FAIL {f}: {e}")
            return 1
    keygate = None if args.skip_plugin_config else args.keygate
    failures = 0
    for d in docs:
        r = validate_doc(d, crds, docs, keygate, not args.no_cross_check)
        try:
            shown = str(Path(d.source).resolve().relative_to(REPO))
        except ValueError:
            shown = d.source
        where = f"{shown}:{d.line}"
        if r.errors:
            failures += 1
            print(f"FAIL {where} {d.describe()} [{r.checks}]")
            for e in r.errors:
                print(f"     - {e}")
        else:
            print(f"ok   {where} {d.describe()} [{r.checks}]")
        for w in r.warnings:
            print(f"     warning: {w}")
    print(f"{len(docs) - failures}/{len(docs)} documents valid")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
