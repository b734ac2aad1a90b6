#!/usr/bin/env python3
"""Copy the CRDs of crds/ (the source of truth) into the chart.

* crds/tasks.kubetasks.dev.yaml, crds/cronjoblocks.kubetasks.dev.yaml ->
  templates/crd-<name>.yaml: the source unchanged, wrapped in
  ``{{- if .Values.crds.enabled }}`` ... ``{{- end }}``, with the chart's
  labels and (crds.keep) ``helm.sh/resource-policy: keep`` inserted under
  ``metadata:`` -- the cert-manager pattern.
* crds/kopf-peering.yaml -> crds/kopf-peering.yaml, byte for byte: Helm
  installs its crds/ directory before it builds the templates, which the
  chart's KopfPeering object needs on a first install.

Usage: python3 charts/kubetasks/hack/crds.py [--check]
(--check: exit 1 if the chart's copies differ; tests/unit/test_chart_render.py
checks the same.)
"""

from __future__ import annotations

import sys
from pathlib import Path

CHART = Path(__file__).resolve().parent.parent
ROOT = CHART.parent.parent
TEMPLATED = ["tasks.kubetasks.dev.yaml", "cronjoblocks.kubetasks.dev.yaml"]
VERBATIM = ["kopf-peering.yaml"]

HEADER = "{{- if .Values.crds.enabled }}\n"
FOOTER = "{{- end }}\n"
METADATA_EXTRA = """\
  {{- if .Values.crds.keep }}
  annotations:
    helm.sh/resource-policy: keep
  {{- end }}
  labels:
    {{- include "kubetasks.labels" . | nindent 4 }}
"""


def wrap(source: str) -> str:
    """The chart template for one source CRD."""
    if "{{" in source:
        raise ValueError("a CRD containing '{{' would be read as a template")
    lines = source.splitlines(keepends=True)
    try:
        i = lines.index("metadata:\n")
    except ValueError:
        raise ValueError("no top-level 'metadata:' line") from None
    block = []
    for ln in lines[i + 1 :]:
        if not ln.startswith("  "):
            break
        block.append(ln)
    if any(ln.startswith(("  labels:", "  annotations:")) for ln in block):
        # refuse rather than emit duplicate keys
        raise ValueError("the source CRD has metadata labels/annotations; merge them in wrap()")
    return HEADER + "".join(lines[: i + 1]) + METADATA_EXTRA + "".join(lines[i + 1 :]) + FOOTER


def unwrap(template: str) -> str:
    """Inverse of wrap(): the template minus exactly the lines wrap() adds."""
    if not (template.startswith(HEADER) and template.endswith(FOOTER)):
        raise ValueError("template does not start/end with the crds.enabled wrapper")
    body = template[len(HEADER) : -len(FOOTER)]
    if "\nmetadata:\n" + METADATA_EXTRA not in "\n" + body:
        raise ValueError("template lacks the inserted metadata block")
    return ("\n" + body).replace("\nmetadata:\n" + METADATA_EXTRA, "\nmetadata:\n", 1)[1:]


def expected() -> dict[Path, str]:
    out = {}
    for name in TEMPLATED:
        out[CHART / "templates" / f"crd-{name}"] = wrap((ROOT / "crds" / name).read_text())
    for name in VERBATIM:
        out[CHART / "crds" / name] = (ROOT / "crds" / name).read_text()
    return out


def main(argv: list[str]) -> int:
    stale = [p for p, text in expected().items() if not p.exists() or p.read_text() != text]
    if "--check" in argv:
        for p in stale:
            print(f"stale: {p.relative_to(ROOT)} (run python3 charts/kubetasks/hack/crds.py)")
        return 1 if stale else 0
    for p, text in expected().items():
        p.write_text(text)
    print(f"wrote {len(expected())} files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
