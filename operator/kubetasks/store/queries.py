"""The loader for the named queries in ``sql/``: named blocks, each with a result shape.

Keeping every statement in SQL files means the SQL is reviewed, EXPLAINed and
grepped as SQL. ``queries.sql`` holds the engine's; each other ``*.sql`` file
beside it (not ``schema.sql``) holds one area's (``operations.sql``: bulk
actions, listings and audit queries; ``dashboard.sql``: the dashboard's reads
and rollups). Names are unique across all of them. A block is ``-- name: x :kind`` followed by comment lines
(its parameters) and the statement; ``kind`` maps mechanically onto asyncpg:
``one`` -> fetchrow, ``many`` -> fetch, ``val`` -> fetchval, ``exec`` -> execute.
A header may end in ``:replica`` (``-- name: x :many :replica``): a read-only
query whose answer may lag the primary by the replication delay (stats,
listings, dashboard reads, metrics), which goes to the read replica when one
is configured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

KINDS = ("one", "many", "val", "exec")
_HEADER = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*:(\w+)(\s*:replica)?\s*$", re.MULTILINE)


class QueryFileError(ValueError):
    pass


@dataclass(frozen=True)
class Query:
    name: str
    kind: str
    sql: str
    #: read-only and content with a lagging copy: may run on the read replica
    replica: bool = False


def parse(text: str) -> dict[str, Query]:
    """Split a queries file into named queries; duplicate names and bad kinds are errors."""
    out: dict[str, Query] = {}
    headers = list(_HEADER.finditer(text))
    for i, m in enumerate(headers):
        name, kind = m.group(1), m.group(2)
        if kind not in KINDS:
            raise QueryFileError(f"query {name!r}: unknown kind :{kind} (one of {', '.join(KINDS)})")
        if name in out:
            raise QueryFileError(f"query {name!r} is defined twice")
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        body = [line for line in text[m.end() : end].splitlines() if not line.lstrip().startswith("--")]
        sql = "\n".join(body).strip().rstrip(";").strip()
        if not sql:
            raise QueryFileError(f"query {name!r} has no statement")
        out[name] = Query(name, kind, sql, replica=m.group(3) is not None)
    return out


#: Files of ``sql/`` that are not named queries.
NOT_QUERIES = ("schema.sql",)


def load() -> dict[str, Query]:
    """Every named query of every queries file in ``sql/``; a name defined twice is an error."""
    folder = resources.files("kubetasks.store").joinpath("sql")
    out: dict[str, Query] = {}
    files = sorted(
        (e for e in folder.iterdir() if e.name.endswith(".sql") and e.name not in NOT_QUERIES),
        key=lambda e: (e.name != "queries.sql", e.name),
    )
    for entry in files:
        for name, q in parse(entry.read_text()).items():
            if name in out:
                raise QueryFileError(f"query {name!r} is defined twice ({entry.name} and another file)")
            out[name] = q
    return out


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration, in order."""
    folder = resources.files("kubetasks.store").joinpath("sql/migrations")
    found = []
    for entry in folder.iterdir():
        m = re.match(r"^(\d{4})_([a-z0-9_]+)\.sql$", entry.name)
        if m:
            found.append((int(m.group(1)), m.group(2), entry.read_text()))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise QueryFileError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


def schema_sql() -> str:
    return resources.files("kubetasks.store").joinpath("sql/schema.sql").read_text()
