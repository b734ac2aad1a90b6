"""Structure metrics of the kubetasks package (issue 16's closing note).

``python tools/structure_metrics.py`` prints: import cycles between modules
(grimp, the graph import-linter checks; with and without imports under
``TYPE_CHECKING``), the ten largest modules, uses of another module's private
names, raw ``store.run(`` call sites outside ``store/``, ``os.environ`` reads
outside the settings module and ``# noqa: PLC0415`` (function-level imports).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "operator" / "kubetasks"
SETTINGS = {"config.py"}


def cycles(exclude_type_checking: bool) -> list[list[str]]:
    """Strongly connected components (>1 module) of the module-level import graph."""
    sys.path.insert(0, str(ROOT / "operator"))
    g = grimp.build_graph("kubetasks", exclude_type_checking_imports=exclude_type_checking, cache_dir=None)
    mods = sorted(g.modules)
    edges = {m: sorted(g.find_modules_directly_imported_by(m) & set(mods)) for m in mods}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            # A package importing its own submodule (__init__ re-exports) is not a cycle.
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for m in mods:
        if m not in index:
            strong(m)
    return out


def files(include_tests: bool = False) -> list[Path]:
    out = sorted(PKG.rglob("*.py"))
    if include_tests:
        out += sorted((ROOT / "tests").rglob("*.py"))
    return out


#: Underscored names that are public API (namedtuple's methods).
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make"}


def defined_privates(tree: ast.AST) -> set[str]:
    """Private names a file defines itself: ``self._x = ``, ``def _x``, ``class _X``, ``_x: int``."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(node.name)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in {"self", "cls"}
        ):
            out.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
        elif isinstance(node, ast.Assign):
            out.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return {n for n in out if n.startswith("_")}


def private_uses(paths: list[Path]) -> list[str]:
    """``x._name`` where ``x`` is not ``self``/``cls`` and ``_name`` is not defined in the same
    file (a private of another module's object), and ``from m import _name``. Dunder names and
    namedtuple's ``_replace``... are not private."""
    hits = []
    for p in paths:
        tree = ast.parse(p.read_text())
        own = defined_privates(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in {"self", "cls"}:
                    continue
                if node.attr in own or node.attr in PUBLIC_UNDERSCORED:
                    continue
                # Names of the stdlib that are private by convention but documented (sys._getframe...)
                if isinstance(base, ast.Name) and base.id in {"sys", "os", "asyncio", "signal", "collections"}:
                    continue
                hits.append(f"{p.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kubetasks"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        hits.append(f"{p.relative_to(ROOT)}:{node.lineno}: import {a.name}")
    return hits


def store_runs(paths: list[Path]) -> list[str]:
    """Calls of ``x.run("query_name", ...)`` (or ``x.run(query, ...)``): raw, positional query calls."""
    hits = []
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "run":
                first = node.args[0] if node.args else None
                named = isinstance(first, ast.Constant) and isinstance(first.value, str)
                if not (named or (isinstance(first, ast.Name) and first.id == "query")):
                    continue
                hits.append(f"{p.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:100]}")
    return sorted(hits)


def grep(pattern: str, paths: list[Path], skip: set[str] | None = None) -> list[str]:
    rx = re.compile(pattern)
    out = []
    for p in paths:
        rel = p.relative_to(PKG) if p.is_relative_to(PKG) else p.relative_to(ROOT)
        if skip and (str(rel).split("/")[0] in skip or str(rel) in skip):
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if rx.search(line):
                out.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    return out


def main() -> None:
    verbose = "-v" in sys.argv
    for tc in (False, True):
        cs = cycles(tc)
        label = "import cycles (runtime imports only)" if tc else "import cycles (incl. TYPE_CHECKING)"
        print(f"{label}: {len(cs)}")
        for c in cs:
            print("   ", " <-> ".join(m.removeprefix("kubetasks.") for m in c))
    sizes = sorted(((len(p.read_text().splitlines()), p) for p in files()), reverse=True)[:10]
    print("largest modules (lines):")
    for n, p in sizes:
        print(f"   {n:5d} {p.relative_to(PKG)}")
    sections = [
        ("cross-module private-name uses (package)", private_uses(files())),
        ("cross-module private-name uses (tests)", private_uses(sorted((ROOT / "tests").rglob("*.py")))),
        ("store.run( call sites outside store/", store_runs([p for p in files() if "store" not in p.relative_to(PKG).parts[:1]])),
        ("os.environ reads outside config.py", grep(r"os\.environ|os\.getenv", files(), {"config.py"})),
        ("# noqa: PLC0415", grep(r"noqa: [^\n]*PLC0415", files())),
        ("# fmt: skip", grep(r"# fmt: skip", files())),
    ]
    for label, hits in sections:
        print(f"{label}: {len(hits)}")
        if verbose:
            for h in hits:
                print("   ", h)


if __name__ == "__main__":
    main()
