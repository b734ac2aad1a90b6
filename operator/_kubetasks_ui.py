"""Building the dashboard's page: ``dashboard-ui/`` (Preact, uPlot, dagre) bundled by Vite
into ``operator/kubetasks/dashboard/static/``, so every wheel ships it and ``pip install
kubetasks`` serves the page without any network.

The build runs only when the page's sources changed since the last one (a hash of
them is kept in ``static/.source-hash``): ``npm ci`` when ``node_modules`` is
missing, incomplete or older than ``package-lock.json``, then ``npm run build``. Where there is
no npm (the Python stage of the Dockerfile, which copies the page its Node stage
built) a page already in ``static/`` is used as it is; with neither npm nor a built
page the build fails and says what to install.

Used by the build backend (``_kubetasks_build``) before every wheel, editable
install and sdist; ``python operator/_kubetasks_ui.py [--force]`` builds the page
alone (``make ui``, ``make venv``, e2e/cluster/image.py). Needs nothing but the
standard library.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UI = ROOT / "dashboard-ui"
STATIC = ROOT / "operator" / "kubetasks" / "dashboard" / "static"
STAMP = STATIC / ".source-hash"
SOURCES = ("package.json", "package-lock.json", "index.html", "vite.config.js", "src")


def source_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        path = UI / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(UI)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _say(msg: str) -> None:
    print(f"kubetasks build: {msg}", file=sys.stderr, flush=True)


def build_ui(force: bool = False) -> None:
    """Build the page when its sources changed (see the module docstring)."""
    built = (STATIC / "index.html").is_file()
    if not (UI / "package.json").is_file():
        if not built:
            raise RuntimeError(
                f"no dashboard page: neither its sources ({UI}) nor a built page ({STATIC}) are here"
            )
        return
    want = source_hash()
    if built and not force and STAMP.is_file() and STAMP.read_text().strip() == want:
        return
    npm = shutil.which("npm")
    if npm is None:
        if built:
            _say("npm not found; using the page already in static/")
            return
        raise RuntimeError(
            "building the dashboard's page needs Node.js 20 and npm (Debian: apt-get install nodejs npm)"
        )
    modules = UI / "node_modules"
    lock = UI / "package-lock.json"
    env = {
        **os.environ,
        "npm_config_audit": "false",
        "npm_config_fund": "false",
        "npm_config_update_notifier": "false",
    }
    # npm writes node_modules/.package-lock.json last: without it (no install, or one cut
    # short) the directory is not trusted and npm ci starts it again.
    installed = modules / ".package-lock.json"
    if not installed.is_file() or installed.stat().st_mtime < lock.stat().st_mtime:
        _say("npm ci (the page's dependencies, from the npm registry)")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=UI, check=True, env=env)
    _say("npm run build (Vite)")
    subprocess.run([npm, "run", "build"], cwd=UI, check=True, env=env)
    if not (STATIC / "index.html").is_file():
        raise RuntimeError(f"npm run build wrote no {STATIC / 'index.html'}")
    STAMP.write_text(want + "\n")


if __name__ == "__main__":
    build_ui(force="--force" in sys.argv)
