"""Many workers in one process: ``python -m tests.faults.many_workers N POD_PREFIX``.

Each is a full Worker with its own App, pool, lease and LISTEN connection
under pod id ``POD_PREFIX<i>``; settings come from KUBETASKS_* like `kubetasks
worker`. The heartbeat-storm scenario runs 80 of them in a few processes (80
Python processes would not fit two cores).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from kubetasks.worker import Worker
from tests.faults.apps import build


async def main(n: int, prefix: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    apps = [build(1, pod_id=f"{prefix}{i}", pool_size=2) for i in range(n)]
    workers = [Worker(a) for a in apps]
    try:
        await asyncio.gather(*(w.run(stop) for w in workers))
    finally:
        for a in apps:
            await a.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
