"""tests/unit runs with no server, no network and no program but this interpreter.

Every test here is held to that while it runs (setup, call and teardown): an
audit hook (PEP 578) refuses any socket connect or bind, any name lookup, and
any program started (subprocess, exec, spawn, system), and the test fails
naming what it tried -- even when the code under test caught the refusal.
The session's servers (tests/conftest.py: PostgreSQL and Redis) are refused
the same way, as their fixtures connect or start them. A test that needs a
server belongs in tests/integration; one that needs helm, kubeconform or the
package registry in tests/packaging.

At the end of a session the servers every tier shared are torn down in the
last test's teardown: that teardown is not watched.

Threads that were already running when the test started are not watched: in
a `pytest tests e2e` session, a worker thread an earlier integration test left
behind may still talk to its server, and that is not this test's doing.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Generator
from typing import Any

import pytest

#: Audit events (https://docs.python.org/3/library/audit_events.html) a unit test may not raise.
REFUSED = frozenset(
    {
        "socket.connect",
        "socket.bind",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "subprocess.Popen",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
    }
)


class OffLimits(RuntimeError):
    """Raised where a unit test reached for a socket or a program."""


class _Guard:
    def __init__(self) -> None:
        self.active = False
        self.main = threading.main_thread().ident
        self.before: frozenset[int | None] = frozenset()
        self.seen: list[str] = []

    def start(self) -> None:
        self.before = frozenset(t.ident for t in threading.enumerate())
        self.seen = []
        self.active = True

    def stop(self) -> list[str]:
        self.active = False
        return self.seen

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active or event not in REFUSED:
            return
        me = threading.get_ident()
        if me != self.main and me in self.before:
            return
        what = f"{event} {_describe(event, args)}"
        self.seen.append(what)
        raise OffLimits(f"tests/unit may not use sockets or start programs: {what}")


def _describe(event: str, args: tuple[Any, ...]) -> str:
    if event in ("socket.connect", "socket.bind"):
        return repr(args[1])
    if event == "subprocess.Popen":
        return repr(args[1])[:300]
    return repr(args)[:300]


GUARD = _Guard()
sys.addaudithook(GUARD.hook)


def _guarded() -> Generator[None, Any, Any]:
    GUARD.start()
    failed: BaseException | None = None
    try:
        result = yield
    except BaseException as exc:
        failed = exc
    seen = GUARD.stop()
    if seen:
        _refuse(seen, failed)
    if failed is not None:
        raise failed
    return result


def _refuse(seen: list[str], cause: BaseException | None) -> None:
    pytest.fail(
        "a unit test runs with no server, no network and no program but this interpreter; "
        "it tried:\n  " + "\n  ".join(seen) + "\n(servers: tests/integration; helm, kubeconform, "
        "pip: tests/packaging)" + (f"\nand then failed with {cause!r}" if cause is not None else ""),
        pytrace=False,
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _guarded())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _guarded())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, Any, Any]:
    if nextitem is None:
        # The end of the session: the session's fixtures (the servers every tier shares) are
        # torn down now, on behalf of all tiers, not of this test.
        return (yield)
    return (yield from _guarded())
