#!/usr/bin/env python3
"""Turn Kubernetes OpenAPI into the JSON schemas kubeconform reads, offline.

kubeconform normally downloads its schemas; nothing but the package registries
is reachable here, so we write the same layout ourselves:

    <out>/<version>-standalone[-strict]/<kind>-<group prefix>-<version>.json

e.g. ``v1.34.4-standalone-strict/deployment-apps-v1.json`` and
``.../service-v1.json`` (the file names kubeconform computes from a manifest's
apiVersion and kind; pass ``-schema-location <out> -kubernetes-version 1.34.4``).

Two sources:

* ``swagger <swagger.json> <out> <version>``: the ``definitions`` of an
  OpenAPI v2 document -- ``api/openapi-spec/swagger.json`` of the pinned
  ``k8s.io/kubernetes`` module, or ``kubectl get --raw /openapi/v2``.
* ``crd <out> <version> <crd.yaml>...``: the ``openAPIV3Schema`` of each CRD
  version (needs PyYAML), so custom resources are validated too.

Each file is self-contained: ``$ref``s point into the file's own
``definitions`` (recursive types such as JSONSchemaProps stay finite). The
strict flavour adds ``additionalProperties: false`` to every object schema
that lists properties, as kubectl's validation does. ``int-or-string`` and
Quantity accept a string or a number, as the API server does.

Standard library only (PyYAML only for ``crd``).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

REF = "#/definitions/"
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"


def _walk(schema: Any, fn: Any) -> Any:
    """Apply ``fn`` to every sub-schema (not to property names), bottom-up."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _walk(v, fn) for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _walk(out[key], fn)
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [_walk(s, fn) for s in out[key]]
    return fn(out)


def _normalise(schema: dict[str, Any], *, strict: bool) -> dict[str, Any]:
    if schema.get("format") == "int-or-string" or schema.get("x-kubernetes-int-or-string"):
        keep = {k: v for k, v in schema.items() if k in ("description",)}
        return {**keep, "oneOf": [{"type": "string"}, {"type": "integer"}]}
    if (
        strict
        and "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    return schema


def _refs(schema: Any) -> set[str]:
    found: set[str] = set()

    def visit(s: Any) -> None:
        if isinstance(s, dict):
            ref = s.get("$ref")
            if isinstance(ref, str) and ref.startswith(REF):
                found.add(ref[len(REF) :])
            for v in s.values():
                visit(v)
        elif isinstance(s, list):
            for v in s:
                visit(v)

    visit(schema)
    return found


def _prepare_definitions(defs: dict[str, Any], *, strict: bool) -> dict[str, Any]:
    out = {}
    for name, schema in defs.items():
        if name == QUANTITY:
            out[name] = {
                "description": schema.get("description", ""),
                "oneOf": [{"type": "string"}, {"type": "number"}],
            }
            continue
        out[name] = _walk(copy.deepcopy(schema), lambda s: _normalise(s, strict=strict))
    return out


def _standalone(name: str, defs: dict[str, Any]) -> dict[str, Any]:
    """The definition ``name`` with the closure of what it references."""
    needed: dict[str, Any] = {}
    todo = [name]
    while todo:
        n = todo.pop()
        if n in needed or n not in defs:
            continue
        needed[n] = defs[n]
        todo.extend(_refs(defs[n]))
    root = dict(defs[name])
    others = {k: v for k, v in needed.items() if k != name}
    others[name] = defs[name]  # the root may be referenced from below (recursion)
    root["definitions"] = others
    return root


def file_name(kind: str, group: str, version: str) -> str:
    prefix = group.split(".", maxsplit=1)[0].lower()
    return f"{kind.lower()}{'-' + prefix if prefix else ''}-{version.lower()}.json"


def _write(out: Path, k8s_version: str, strict: bool, fname: str, schema: dict[str, Any]) -> None:
    d = out / f"v{k8s_version.lstrip('v')}-standalone{'-strict' if strict else ''}"
    d.mkdir(parents=True, exist_ok=True)
    (d / fname).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")


def from_swagger(swagger: Path, out: Path, k8s_version: str) -> int:
    raw = json.loads(swagger.read_text())["definitions"]
    n = 0
    for strict in (False, True):
        defs = _prepare_definitions(raw, strict=strict)
        for name, schema in raw.items():
            for gvk in schema.get("x-kubernetes-group-version-kind", []):
                fname = file_name(gvk["kind"], gvk.get("group", ""), gvk["version"])
                _write(out, k8s_version, strict, fname, _standalone(name, defs))
                n += 1
    return n


OBJECT_META: dict[str, Any] = {
    "type": "object",
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
    },
}


def from_crds(out: Path, k8s_version: str, files: list[Path]) -> int:
    import yaml

    n = 0
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for ver in spec.get("versions", []):
                schema = (ver.get("schema") or {}).get("openAPIV3Schema")
                if not schema:
                    continue
                for strict in (False, True):
                    s = _walk(copy.deepcopy(schema), lambda x, st=strict: _normalise(x, strict=st))
                    # the root keeps apiVersion/kind/metadata even where the CRD omits them
                    props = {**OBJECT_META["properties"], **s.get("properties", {})}
                    s = {**s, "properties": props}
                    fname = file_name(spec["names"]["kind"], spec["group"], ver["name"])
                    _write(out, k8s_version, strict, fname, s)
                    n += 1
    return n


def main(argv: list[str]) -> int:
    if len(argv) >= 4 and argv[0] == "swagger":
        n = from_swagger(Path(argv[1]), Path(argv[2]), argv[3])
    elif len(argv) >= 4 and argv[0] == "crd":
        n = from_crds(Path(argv[1]), argv[2], [Path(a) for a in argv[3:]])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(f"openapi2jsonschema: wrote {n} schema files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
