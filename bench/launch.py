"""Start a worker command on a signal, so that all worker processes of a run begin together.

    python bench/launch.py <module> [args...]

is ``python -m <module> [args...]`` with one difference: the module's CLI and
the bench app are imported first, then the file named by BENCH_READY_FILE is
created and the process waits for one line on stdin before it runs the
command. Python start-up and imports (0.2-0.4 s) then fall outside the
measured window, and W processes do not start a few hundred ms apart.
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys
from pathlib import Path

PRELOAD = {
    "kubetasks": ["kubetasks.cli", "kubetasks.worker", "bench.apps.kt_app"],
    "bench.apps.pgq_app": ["pgqueuer.adapters.cli.supervisor", "uvloop"],
    "procrastinate": ["procrastinate.cli", "bench.apps.pc_app"],
}


def main() -> None:
    module, args = sys.argv[1], sys.argv[2:]
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    for name in PRELOAD.get(module, []):
        importlib.import_module(name)
    ready = os.environ.get("BENCH_READY_FILE")
    if ready:
        Path(ready).write_text(str(os.getpid()))
        sys.stdin.readline()
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
