"""Plain (non-async) handlers, each run in a child process the worker can kill.

Owns everything about sync handlers: the check that a function can run in a
child (at registration and again at worker start), the fork server, the
worker's pool of children, the child's side (``SyncTaskContext``) and the
message protocol between them. Async handlers never come here.

Why processes: Python cannot stop a thread. A sync handler in a thread ran on
after its timeout, its cancel or a graceful hand-back, and wrote its side
effects after the task was written failed or was already running elsewhere;
and every worker shared one small thread pool. A process can be killed.

Shape, per worker process:

* a **fork server** (``python -c ...``, in its own session), started when
  the worker starts if the app has sync handlers. It imports the modules that
  define them once, freezes the garbage collector (so children do not copy
  pages the GC would otherwise touch) and forks a child per request. It
  exits when the worker's end of its socket closes, killing its children.
* a **pool** in the worker: one child per running sync task, reused for the
  next task while it behaves, at most ``concurrency`` kept idle. A child runs
  one task at a time, in its main thread.

Stopping a task (its timeout, ``app.cancel``, fencing, a shutdown hand-back):
the worker cancels the asyncio task that waits for the child; here that sets
the child's ``task.cancelled``, gives the handler ``STOP_GRACE`` seconds to
return, then SIGKILLs the child's process group, and lets the cancellation go
on only once the fork server has reaped the child. So an outcome or a
hand-back is written only after the process that ran the handler is gone.

A child never outlives its worker's lease: the worker publishes the instant
(monotonic clock, shared by all processes of the machine) by which its lease
has surely ended on a *lease board*, 16 bytes of memory shared with the fork
server and every child; a watchdog thread in a child that runs a task kills
its own process group when that instant passes. A thread of the worker's own
copies the lease's deadline to the board as heartbeats renew it: neither the
board nor that thread needs the worker's event loop, which an ``async``
handler may hold for a while without losing the lease (the lease renews from
a thread of its own), so a sync handler next to it runs on. A worker that is
SIGSTOPped, or that lost its lease, leaves the board as it is: its children
die by the deadline, before a peer can recover their tasks. If the worker
dies, the server sees its socket close and kills the children's process
groups; each child also has PR_SET_PDEATHSIG=SIGKILL on the server and exits
when its own socket to the worker closes.

WARNING: a killed child cannot undo what it already did elsewhere (a file
written, an HTTP call made, a row committed on another connection), and a
process it started in a new session escapes the group kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import importlib
import inspect
import itertools
import json
import logging
import math
import mmap
import os
import pickle
import queue
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from kubetasks import validation
from kubetasks.errors import Fail, KubetasksError, LeaseLost, Pause, Retry, ValidationError
from kubetasks.model import EnqueueRequest, PeriodicDef, TaskDef
from kubetasks.workflows import POLICIES, ChildFailed, Suspend

if TYPE_CHECKING:
    from kubetasks.config import Settings
    from kubetasks.context import TaskContext

log = logging.getLogger("kubetasks.subprocs")

#: Seconds a handler has to return once ``task.cancelled`` is set, before its process is killed.
STOP_GRACE = 1.0
#: Seconds to wait for the server to report a SIGKILLed child gone before saying so in the log.
KILL_CONFIRM = 5.0
#: A child sends progress to the worker at most this often (the worker coalesces further).
PROGRESS_SEND_INTERVAL = 0.05
#: How often the worker copies its lease's deadline to the lease board.
LEASE_FEED_INTERVAL = 0.1
#: How often a child running a task looks at the board while the deadline is unknown.
LEASE_UNKNOWN_RECHECK = 0.5
#: Set in the fork server and its children: a worker must not start there.
ENV_MARK = "KUBETASKS_SUBPROCESS"
_ENV_PATH = "KUBETASKS_SUBPROCESS_SYS_PATH"
_MAIN_ALIAS = "__kubetasks_main__"

_FRAME = struct.Struct("!I")
_RECORD = struct.Struct("!cii")  # server -> worker: kind, pid, value

#: The pool of the worker running in this context (set by ``Worker.run``).
CURRENT: contextvars.ContextVar[Pool | None] = contextvars.ContextVar("kubetasks_subprocs", default=None)


# -- can this function run in a child? ------------------------------------------


def is_async_handler(func: object) -> bool:
    """Coroutine functions, and objects whose ``__call__`` is one, run on the worker's loop."""
    return inspect.iscoroutinefunction(func) or (
        callable(func) and inspect.iscoroutinefunction(type(func).__call__)
    )


def check_runnable(name: str, func: object, *, bound: bool = True) -> None:
    """Refuse a sync handler a child process cannot find by module and qualified name."""
    why = _why_not(func, bound=bound)
    if why is not None:
        raise ValidationError(
            "handler",
            f"{name!r}: {why}. A plain (non-async) handler runs in a child process that finds it "
            "by module and qualified name: define it with `def` at the top level of a module "
            "(or make it `async def`)",
        )


def check_resolves(name: str, func: Callable[..., Any]) -> None:
    """At worker start, with every module imported: module.qualname must be this very function."""
    check_runnable(name, func, bound=False)
    where = f"{func.__module__}.{func.__qualname__}"
    try:
        found = _resolve(func.__module__, func.__qualname__, main=sys.modules.get("__main__"))
    except Exception as exc:
        raise ValidationError(
            "handler", f"{name!r}: a child process could not find {where}: {type(exc).__name__}: {exc}"
        ) from None
    if found is not func:
        raise ValidationError(
            "handler",
            f"{name!r}: {where} is not the registered function (a decorator above the registration "
            "replaced it, or the name was bound again); a child process would run the other object",
        )


def _why_not(func: object, *, bound: bool) -> str | None:
    if inspect.ismethod(func):
        return "it is a bound method, which a child process cannot re-create"
    if not inspect.isfunction(func):
        return f"it is a {type(func).__name__} object, not a function"
    qualname = func.__qualname__
    if "<lambda>" in qualname:
        return "it is a lambda"
    if "<locals>" in qualname:
        outer = qualname.split(".<locals>", 1)[0]
        return f"it is defined inside {outer}() (a closure, or a method of a local class)"
    module = func.__module__
    if not module:
        return "it has no module"
    if module == "__main__" and _main_ref(sys.modules.get("__main__")) is None:
        return "it is defined in an interactive session or `python -c` (__main__ has no file)"
    mod = sys.modules.get(module)
    if bound and mod is not None:
        try:
            found = _resolve(module, qualname, main=mod)
        except AttributeError:
            return None  # not bound yet: a decorator is still running; the worker checks again
        if found is not func:
            return f"{module}.{qualname} names another object (was the name bound again?)"
    return None


def _main_ref(main: types.ModuleType | None) -> tuple[str, str] | None:
    """How the fork server can import the worker's __main__: ("name", mod) or ("path", file)."""
    if main is None:
        return None
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if spec_name and not spec_name.endswith("__main__"):
        return ("name", spec_name)
    path = getattr(main, "__file__", None)
    if path:
        return ("path", os.path.abspath(path))
    return None


def _resolve(module: str, qualname: str, *, main: types.ModuleType | None = None) -> Any:
    if module == "__main__":
        if main is None:
            raise ImportError("__main__ of the worker was not imported in this process")
        obj: Any = main
    else:
        obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# -- framing ----------------------------------------------------------------------


def _frame(msg: object) -> bytes:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(data)) + data


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket) -> Any:
    (n,) = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    return pickle.loads(_recv_exact(sock, n))


# -- exceptions across the boundary ------------------------------------------------


class SyncHandlerDied(KubetasksError):
    """The child process running a sync handler ended without reporting an outcome."""


class HandlerError(Exception):
    """An exception a sync handler raised in its child, re-raised in the worker under the same name.

    Its ``__cause__`` holds the child's traceback as text (as ProcessPoolExecutor does).
    """


class _RemoteTraceback(Exception):
    def __init__(self, tb: str) -> None:
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


_REMOTE_TYPES: dict[tuple[str, str], type[HandlerError]] = {}


def _remote_type(module: str, name: str) -> type[HandlerError]:
    cls = _REMOTE_TYPES.get((module, name))
    if cls is None:
        cls = types.new_class(name, (HandlerError,))
        cls.__module__ = module
        _REMOTE_TYPES[(module, name)] = cls
    return cls


def _encode_exc(exc: BaseException) -> tuple[Any, ...]:
    if isinstance(exc, Suspend):
        return ("suspend", exc.child_ids, exc.policy)
    if isinstance(exc, Pause):
        return ("pause", exc.message)
    if isinstance(exc, ChildFailed):
        return ("child_failed", exc.child_id, exc.handler, exc.status, exc.error)
    if isinstance(exc, Retry):
        return ("retry", exc.delay, exc.message)
    if isinstance(exc, Fail):
        return ("fail", exc.message)
    if isinstance(exc, LeaseLost):
        return ("lease_lost", str(exc))
    if isinstance(exc, ValidationError):
        return ("validation", exc.field, exc.message)
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not cost the outcome
        text = "<the exception's str() failed>"
    return ("error", type(exc).__module__, type(exc).__name__, text)


def _decode_exc(enc: tuple[Any, ...], tb: str | None = None) -> BaseException:
    kind = enc[0]
    if kind == "suspend":
        return Suspend(enc[1], enc[2])
    if kind == "pause":
        return Pause(enc[1])
    if kind == "child_failed":
        return ChildFailed(enc[1], enc[2], enc[3], enc[4])
    if kind == "retry":
        return Retry(enc[1], enc[2])
    if kind == "fail":
        return Fail(enc[1])
    if kind == "lease_lost":
        return LeaseLost(enc[1])
    if kind == "validation":
        return ValidationError(enc[1], enc[2])
    exc = _remote_type(enc[1], enc[2])(enc[3])
    if tb:
        exc.__cause__ = _RemoteTraceback(tb)
    return exc


# -- the lease board -----------------------------------------------------------------


class _LeaseBoard:
    """The instant (``time.monotonic()``) by which the worker's lease has surely ended, in shared
    memory: written by the worker, read by its children. NaN: not known (no lease yet).

    The value is stored with a check word (its bits XOR a constant), so a reader in another
    process that catches a write half done sees a mismatch and reads again: no lock spans
    processes, and no torn value is ever used.
    """

    SIZE = 16
    _CHECK = 0x6B75_6265_7461_736B
    _LAYOUT = struct.Struct("<dQ")
    _BITS = struct.Struct("<Q")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._mem = mmap.mmap(fd, self.SIZE)
        self._lock = threading.Lock()

    @classmethod
    def create(cls) -> _LeaseBoard:
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("kubetasks-lease-board", os.MFD_CLOEXEC)
        else:  # no memfd: an unlinked temporary file (only its page cache is used)
            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
            os.set_inheritable(fd, False)
        os.ftruncate(fd, cls.SIZE)
        board = cls(fd)
        board.publish(lambda: None)
        return board

    def publish(self, deadline_of: Callable[[], float | None]) -> None:
        """Write what ``deadline_of()`` says now. Writers of this process take turns, each reading
        the lease inside its turn, so an older reading never overwrites a newer one."""
        with self._lock:
            deadline = deadline_of()
            value = math.nan if deadline is None else float(deadline)
            (bits,) = self._BITS.unpack(struct.pack("<d", value))
            self._mem[: self.SIZE] = self._LAYOUT.pack(value, bits ^ self._CHECK)

    def read(self) -> float | None:
        while True:
            raw = self._mem[: self.SIZE]
            value, check = self._LAYOUT.unpack(raw)
            if self._BITS.unpack(raw[:8])[0] ^ self._CHECK == check:
                return None if math.isnan(value) else value
            time.sleep(0.0001)  # a write was under way: it takes nanoseconds

    def close(self) -> None:
        self._mem.close()
        os.close(self.fd)


# -- the child's side ------------------------------------------------------------


class SyncTaskContext:
    """What a plain (``def``) handler receives, in its child process.

    The same identity as ``TaskContext`` (``id``, ``handler``, ``queue``,
    ``payload``, ``attempt``, ``max_attempts``, ``priority``, ``tags``,
    ``worker_id``, ``pod_id``, ``parent_id``, ``is_last_attempt``), with blocking
    methods: ``progress`` (sent to the worker, which writes it fenced and
    coalesced like an async handler's), ``spawn``/``spawn_many``/``wait``
    (carried out by the worker; a ``wait`` on unfinished children ends this run
    and the handler runs again from the top once they have ended).

    ``pause_requested`` is true while the run is asked to pause: ``pause()`` (or
    ``raise Pause(...)``) at a checkpoint ends the attempt uncharged and leaves
    the task paused (see ``TaskContext.pause_requested``).

    ``cancelled`` is a ``threading.Event`` set when the task's timeout passes,
    it is cancelled, taken away from this worker, or handed back at shutdown.
    Poll it (or ``cancelled.wait(seconds)`` instead of ``time.sleep``) and
    return; the process is killed ``STOP_GRACE`` seconds after it is set in
    any case.
    """

    def __init__(self, rt: _ChildRuntime, run_id: int, fields: Mapping[str, Any]) -> None:
        self._rt = rt
        self._run_id = run_id
        self.id: int = fields["id"]
        self.handler: str = fields["handler"]
        self.queue: str = fields["queue"]
        self.payload: dict[str, Any] = fields["payload"]
        self.attempt: int = fields["attempt"]
        self.max_attempts: int = fields["max_attempts"]
        self.priority: int = fields["priority"]
        self.tags: list[str] = fields["tags"]
        self.worker_id: str = fields["worker_id"]
        self.pod_id: str = fields["pod_id"]
        self.parent_id: int | None = fields["parent_id"]
        self.cancelled = threading.Event()
        self._pause = threading.Event()
        if fields.get("pause_requested"):
            self._pause.set()
        self._seq = 0

    def __repr__(self) -> str:
        return f"SyncTaskContext(id={self.id}, handler={self.handler!r}, attempt={self.attempt})"

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts

    @property
    def pause_requested(self) -> bool:
        """True while this run is asked to pause (see ``TaskContext.pause_requested``)."""
        return self._pause.is_set()

    def pause(self, message: str | None = None) -> NoReturn:
        """End this attempt here without charging it; the task stays paused until resumed."""
        raise Pause(message)

    def _raise_if_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise LeaseLost(
                f"task {self.id} attempt {self.attempt} was stopped (cancelled, timed out or taken away)"
            )

    def progress(
        self,
        percent: int | float,
        message: str | None = None,
        *,
        stage: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Report progress (0-100) with an optional stage and metadata (see ``TaskContext.progress``);
        cheap to call often. Raises LeaseLost once ``cancelled`` is set."""
        validation.progress_details(stage, metadata)
        self._raise_if_cancelled()
        p = max(0, min(100, int(percent)))
        self._rt.set_progress(self._run_id, (p, None if message is None else str(message), stage, metadata))

    def spawn(
        self,
        handler: str,
        payload: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        priority: int | None = None,
        queue: str | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        tags: Sequence[str] | None = None,
        retry_delay: float | None = None,
        backoff: float | None = None,
        max_retry_delay: float | None = None,
    ) -> int:
        """Add a child task of this one and return its id (see ``TaskContext.spawn``)."""
        req = EnqueueRequest(
            handler, payload, delay, run_at, priority, queue, timeout, max_attempts, tags,
            retry_delay=retry_delay, backoff=backoff, max_retry_delay=max_retry_delay,
        )  # fmt: skip
        return self.spawn_many([req], keys=None if key is None else [key])[0]

    def audit(self, code: str, message: str | None = None, metadata: dict[str, Any] | None = None) -> None:
        """Record a checkpoint of this run (see ``TaskContext.audit``); carried out by the worker."""
        self._call("audit", [code], {"message": message, "metadata": metadata})

    def spawn_many(
        self, requests: Iterable[EnqueueRequest], *, keys: Sequence[str] | None = None
    ) -> list[int]:
        """Add many children in one round trip; ids in the order given (see ``TaskContext.spawn_many``)."""
        ids: list[int] = self._call(
            "spawn_many", [list(requests)], {"keys": None if keys is None else list(keys)}
        )
        return ids

    def wait(self, children: Sequence[int], *, policy: str = "fail_fast") -> list[Any]:
        """The children's results once all have ended (see ``TaskContext.wait``)."""
        if policy not in POLICIES:
            raise ValidationError("policy", f"unknown policy {policy!r}; one of {', '.join(POLICIES)}")
        out: list[tuple[Any, ...]] = self._call("wait", [[int(c) for c in children]], {"policy": policy})
        return [_decode_exc(v[1]) if v[0] == "raise" else v[1] for v in out]

    def _call(self, method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        self._raise_if_cancelled()
        self._seq += 1
        return self._rt.call(self, self._seq, method, args, kwargs)


class _ChildRuntime:
    """The child process: a reader thread for the worker's messages, a progress sender, and
    the main thread running one handler at a time."""

    def __init__(self, sock: socket.socket, board: _LeaseBoard) -> None:
        self.sock = sock
        self.board = board
        self.send_lock = threading.Lock()
        self.runs: queue.Queue[tuple[SyncTaskContext, Any]] = queue.Queue()
        self.replies: queue.Queue[tuple[int, int, str, Any]] = queue.Queue()
        self.current: SyncTaskContext | None = None
        self.state_lock = threading.Lock()
        self.progress_cond = threading.Condition()
        self.pending: tuple[int, tuple[Any, ...]] | None = None  # run id, progress()'s arguments
        self.funcs: dict[tuple[str, str], Any] = {}
        self.running_cond = threading.Condition()
        self.running = False  # a task runs: the lease board's deadline applies

    def send(self, msg: object) -> None:
        data = _frame(msg)
        with self.send_lock:
            self.sock.sendall(data)

    def serve(self) -> None:
        threading.Thread(target=self._read, name="kubetasks-child-reader", daemon=True).start()
        threading.Thread(target=self._send_progress, name="kubetasks-child-progress", daemon=True).start()
        threading.Thread(target=self._watchdog, name="kubetasks-child-watchdog", daemon=True).start()
        self.send(("hello", os.getpid()))
        while True:
            ctx, spec = self.runs.get()
            if self._run(ctx, spec):
                os._exit(70)  # the handler raised SystemExit/KeyboardInterrupt/MemoryError: start afresh

    def _read(self) -> None:
        try:
            while True:
                msg = _recv_frame(self.sock)
                kind = msg[0]
                if kind == "run":
                    _, run_id, spec = msg
                    ctx = SyncTaskContext(self, run_id, spec["fields"])
                    with self.state_lock:
                        self.current = ctx
                    self.set_running(True)
                    self.runs.put((ctx, spec))
                elif kind == "cancel":
                    with self.state_lock:
                        if self.current is not None and self.current._run_id == msg[1]:
                            self.current.cancelled.set()
                elif kind == "pause":
                    with self.state_lock:
                        if self.current is not None and self.current._run_id == msg[1]:
                            (self.current._pause.set if msg[2] else self.current._pause.clear)()
                elif kind == "reply":
                    self.replies.put(msg[1:])
        except BaseException:
            os._exit(0)

    def set_running(self, running: bool) -> None:
        with self.running_cond:
            self.running = running
            self.running_cond.notify()

    def _watchdog(self) -> None:
        while True:
            with self.running_cond:
                if not self.running:
                    self.running_cond.wait()
                    continue
            deadline = self.board.read()
            left = LEASE_UNKNOWN_RECHECK if deadline is None else deadline - time.monotonic()
            if left > 0:
                # Until the deadline as it stands; then the board again (renewed meanwhile, or not).
                with self.running_cond:
                    self.running_cond.wait(left)
                continue
            # The lease may have run out: a peer can take the task now. Stop at once.
            with contextlib.suppress(OSError):
                if os.getpgid(0) == os.getpid():
                    os.killpg(0, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

    def set_progress(self, run_id: int, report: tuple[Any, ...]) -> None:
        with self.progress_cond:
            self.pending = (run_id, report)
            self.progress_cond.notify()

    def _send_progress(self) -> None:
        last = 0.0
        while True:
            with self.progress_cond:
                while self.pending is None:
                    self.progress_cond.wait()
            wait = last + PROGRESS_SEND_INTERVAL - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with self.progress_cond:  # taken with the send, so a flush cannot overtake it
                item, self.pending = self.pending, None
                if item is not None:
                    self.send(("progress", item[0], *item[1]))
            last = time.monotonic()

    def _flush_progress(self) -> None:
        with self.progress_cond:
            item, self.pending = self.pending, None
            if item is not None:
                self.send(("progress", item[0], *item[1]))

    def call(
        self, ctx: SyncTaskContext, seq: int, method: str, args: list[Any], kwargs: dict[str, Any]
    ) -> Any:
        self.send(("call", ctx._run_id, seq, method, args, kwargs))
        while True:
            try:
                run_id, rseq, status, value = self.replies.get(timeout=0.1)
            except queue.Empty:
                ctx._raise_if_cancelled()
                continue
            if run_id != ctx._run_id or rseq != seq:
                continue  # left over from an earlier call
            if status == "raise":
                raise _decode_exc(value)
            return value

    def _run(self, ctx: SyncTaskContext, spec: Mapping[str, Any]) -> bool:
        """Run one task and send its outcome; True if the process should end afterwards."""
        run_id = ctx._run_id
        fatal = False
        try:
            key = (spec["module"], spec["qualname"])
            func = self.funcs.get(key)
            if func is None:
                func = _resolve(key[0], key[1], main=sys.modules.get(_MAIN_ALIAS))
                self.funcs[key] = func
            result = func(ctx)
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()
                raise TypeError(
                    f"handler {ctx.handler!r} is a plain function that returned an awaitable; declare it "
                    "`async def` (plain functions run in a child process, without an event loop)"
                )
            try:
                validation.to_json("result", result, spec["max_bytes"])
                done: tuple[Any, ...] = ("done", run_id, "ok", result)
                data = _frame(done)
            except Exception as exc:
                done = (
                    "done",
                    run_id,
                    "raise",
                    ("fail", f"handler returned a result that cannot be stored: {exc}"),
                    None,
                    False,
                )
                data = _frame(done)
        except BaseException as exc:
            fatal = (not isinstance(exc, Exception) and not isinstance(exc, Suspend | Pause)) or isinstance(
                exc, MemoryError
            )
            enc = _encode_exc(exc)
            tb = traceback.format_exc() if enc[0] == "error" else None
            data = _frame(("done", run_id, "raise", enc, tb, fatal))
        self._flush_progress()
        with self.send_lock:
            self.sock.sendall(data)
        with self.state_lock:
            if self.current is ctx:
                self.current = None
                self.set_running(False)
        return fatal


def _child_main(fd: int, board_fd: int, server_pid: int) -> None:
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # one group per child: the worker kills the handler and what it started
    _die_with_parent()
    if os.getppid() != server_pid:
        os._exit(0)
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    _ChildRuntime(sock, _LeaseBoard(board_fd)).serve()


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes  # noqa: PLC0415 - Linux only; loaded by the server before it forks

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# -- the fork server ---------------------------------------------------------------


def _serve() -> None:
    """Entry point of the fork server: ``argv = [ctl_fd, board_fd, main_kind, main_ref, *modules]``.

    The lease board's descriptor stays open here for the children to inherit."""
    ctl_fd, board_fd, main_kind, main_ref, *modules = sys.argv[1:]
    sys.path[:] = json.loads(os.environ.pop(_ENV_PATH, "[]")) or sys.path
    ctl = socket.socket(fileno=int(ctl_fd))
    ctl.setblocking(True)
    if main_kind != "-":
        try:
            _import_main(main_kind, main_ref)
        except BaseException:
            print(f"kubetasks fork server: could not import __main__ ({main_ref}):", file=sys.stderr)
            traceback.print_exc()
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException:
            print(f"kubetasks fork server: could not import {name}:", file=sys.stderr)
            traceback.print_exc()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes  # noqa: PLC0415, F401 - children call prctl without loading it themselves
    gc.collect()
    gc.freeze()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    live: set[int] = set()
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    me = os.getpid()
    ctl.sendall(_RECORD.pack(b"R", me, 0))
    try:
        while True:
            for key, _ in sel.select():
                if key.fileobj is ctl:
                    msg, fds, _flags, _addr = socket.recv_fds(ctl, 1, 1)
                    if not msg:
                        return  # the worker is gone or closed us
                    if not fds:
                        continue
                    pid = os.fork()
                    if pid == 0:
                        code = 0
                        try:
                            sel.close()
                            ctl.close()
                            signal.set_wakeup_fd(-1)
                            os.close(wake_r)
                            os.close(wake_w)
                            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                            signal.signal(signal.SIGINT, signal.default_int_handler)
                            _child_main(fds[0], int(board_fd), me)
                        except BaseException:
                            traceback.print_exc()
                            code = 1
                        finally:
                            os._exit(code)
                    with contextlib.suppress(OSError):
                        os.setpgid(pid, pid)  # also here: no window where killpg misses it
                    os.close(fds[0])
                    live.add(pid)
                    ctl.sendall(_RECORD.pack(b"P", pid, 0))
                else:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 512):
                            pass
                    while live:
                        try:
                            pid, status = os.waitpid(-1, os.WNOHANG)
                        except ChildProcessError:
                            break
                        if pid == 0:
                            break
                        live.discard(pid)
                        ctl.sendall(_RECORD.pack(b"X", pid, os.waitstatus_to_exitcode(status)))
    except (BrokenPipeError, ConnectionResetError):
        return
    finally:
        for pid in live:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _import_main(kind: str, ref: str) -> None:
    if kind == "name":
        sys.modules[_MAIN_ALIAS] = importlib.import_module(ref)
        return
    import runpy  # noqa: PLC0415

    mod = types.ModuleType(_MAIN_ALIAS)
    mod.__file__ = ref
    sys.modules[_MAIN_ALIAS] = mod
    mod.__dict__.update(runpy.run_path(ref, run_name=_MAIN_ALIAS))


# -- the worker's side ---------------------------------------------------------------


def _start_server(args: list[str], fds: list[int], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "from kubetasks.subprocs import _serve; _serve()", *args],
        pass_fds=fds,
        env=env,
        start_new_session=True,  # terminal signals reach the worker only; it decides
        stdin=subprocess.DEVNULL,
    )


class _Gone(Exception):
    """The child's socket closed."""


class _Child:
    def __init__(self, pid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.pid = pid
        self.writer = writer
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.clean = True  # no run in progress, nothing pending: can take the next task
        self.killed = False
        self.pump = asyncio.create_task(self._pump(reader), name=f"kubetasks-child-{pid}")

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (n,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
                self.inbox.put_nowait(pickle.loads(await reader.readexactly(n)))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.inbox.put_nowait(None)

    @property
    def gone(self) -> bool:
        return self.killed or self.exited.done() or self.pump.done()

    def send(self, msg: object) -> None:
        if self.writer.is_closing():
            raise _Gone
        self.writer.write(_frame(msg))

    async def recv(self) -> Any:
        msg = await self.inbox.get()
        if msg is None:
            self.inbox.put_nowait(None)  # every later recv sees the end too
            raise _Gone
        return msg

    def kill(self) -> None:
        self.killed = True
        self.clean = False
        if not self.exited.done():
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                with contextlib.suppress(OSError):
                    os.kill(self.pid, signal.SIGKILL)
        self.close()

    def close(self) -> None:
        self.writer.close()
        self.pump.cancel()


class PoolApp(Protocol):
    """What the pool needs of its App: the handlers its children may run, and the payload limit."""

    @property
    def settings(self) -> Settings: ...

    @property
    def handlers(self) -> Mapping[str, TaskDef]: ...

    @property
    def periodics(self) -> Mapping[str, PeriodicDef]: ...


class Pool:
    """The worker's children for sync handlers (see the module docstring)."""

    def __init__(
        self, app: PoolApp, *, max_idle: int, lease_left: Callable[[], float | None] | None = None
    ) -> None:
        self.app = app
        self.max_idle = max_idle
        # Seconds until the worker's lease surely ends (None: unknown); called from a thread.
        self.lease_left = lease_left
        self.max_bytes = app.settings.max_payload_bytes
        self.stats = {"spawned": 0, "reused": 0, "killed": 0, "died": 0}
        self._idle: deque[_Child] = deque()
        self._board: _LeaseBoard | None = None
        self._feeder: threading.Thread | None = None
        self._feeder_stop = threading.Event()
        self._children: dict[int, _Child] = {}
        self._early_exits: dict[int, int] = {}
        self._forks: deque[asyncio.Future[int]] = deque()
        self._seq = itertools.count(1)
        self._server: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        self._ctl_reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._start_lock = asyncio.Lock()
        self._closing = False
        self._modules: list[str] = []
        self._main: tuple[str, str] | None = None

    # -- start and stop ------------------------------------------------------------

    def sync_handlers(self) -> dict[str, Callable[..., Any]]:
        out: dict[str, Callable[..., Any]] = {}
        for td in self.app.handlers.values():
            if not td.is_async:
                out[td.name] = td.func
        for pd in self.app.periodics.values():
            if not is_async_handler(pd.func):
                out[pd.handler] = pd.func
        return out

    async def start(self) -> None:
        """Check every sync handler can be found by a child; start the server if there is one."""
        self._closing = False
        funcs = self.sync_handlers()
        for name, func in funcs.items():
            check_resolves(name, func)
        if funcs:
            await self._ensure_server()

    def _plan(self) -> None:
        funcs = self.sync_handlers().values()
        mods = {f.__module__ for f in funcs}
        self._main = _main_ref(sys.modules.get("__main__")) if "__main__" in mods else None
        self._modules = sorted(mods - {"__main__"})

    async def _ensure_server(self) -> None:
        async with self._start_lock:
            if self._closing:
                raise RuntimeError("the worker is stopping: no new child processes")
            if (
                self._server is not None
                and self._server.poll() is None
                and self._ctl_reader is not None
                and not self._ctl_reader.done()
            ):
                return
            await self._stop_server()
            if os.environ.get(ENV_MARK):
                raise RuntimeError(
                    "a kubetasks worker cannot start inside a sync handler's child process or its fork "
                    "server (does a module start a worker when imported? guard it with "
                    "`if __name__ == '__main__':`)"
                )
            self._plan()
            loop = asyncio.get_running_loop()
            ours, theirs = socket.socketpair()
            env = dict(os.environ)
            env[ENV_MARK] = "1"
            env[_ENV_PATH] = json.dumps(sys.path)
            main_kind, main_ref = self._main if self._main else ("-", "-")
            board = self._lease_board()
            args = [str(theirs.fileno()), str(board.fd), main_kind, main_ref, *self._modules]
            try:
                self._server = await asyncio.to_thread(_start_server, args, [theirs.fileno(), board.fd], env)
            finally:
                theirs.close()
            ours.setblocking(False)
            self._ctl = ours
            self._ready = loop.create_future()
            self._ctl_reader = asyncio.create_task(self._read_ctl(ours), name="kubetasks-forkserver")
            ready = self._ready
            try:
                await asyncio.wait_for(asyncio.shield(ready), 120)
            except TimeoutError:
                await self._stop_server()
                raise RuntimeError("the fork server for sync handlers did not start within 120 s") from None

    async def _read_ctl(self, ctl: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        buf = b""
        try:
            while True:
                data = await loop.sock_recv(ctl, 4096)
                if not data:
                    break
                buf += data
                while len(buf) >= _RECORD.size:
                    kind, pid, value = _RECORD.unpack(buf[: _RECORD.size])
                    buf = buf[_RECORD.size :]
                    if kind == b"R" and self._ready is not None and not self._ready.done():
                        self._ready.set_result(None)
                    elif kind == b"P" and self._forks:
                        fut = self._forks.popleft()
                        if not fut.done():
                            fut.set_result(pid)
                    elif kind == b"X":
                        child = self._children.pop(pid, None)
                        if child is None:
                            self._early_exits[pid] = value
                        elif not child.exited.done():
                            child.exited.set_result(value)
        except OSError:
            pass
        finally:
            gone = RuntimeError("the fork server for sync handlers exited")
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(gone)
            while self._forks:
                fut = self._forks.popleft()
                if not fut.done():
                    fut.set_exception(gone)
            # Its children were SIGKILLed (its own cleanup, or PR_SET_PDEATHSIG).
            for child in list(self._children.values()):
                child.kill()
                if not child.exited.done():
                    child.exited.set_result(-signal.SIGKILL)
            self._children.clear()

    async def _stop_server(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self._ctl_reader is not None:
            self._ctl_reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._ctl_reader
            self._ctl_reader = None
        server, self._server = self._server, None
        if server is not None:
            try:
                await asyncio.to_thread(server.wait, 5)
            except subprocess.TimeoutExpired:
                server.kill()
                await asyncio.to_thread(server.wait)

    async def close(self) -> None:
        """Kill every child and wait until they are gone, then stop the server."""
        self._closing = True
        children = list(self._children.values())
        for child in children:
            child.kill()
        self._idle.clear()
        await self._confirm_exits(children)
        await self._stop_server()
        self._stop_feeder()

    def kill_all(self) -> None:
        """Synchronous last resort when the worker ends without ``close``: kill children, stop the server."""
        self._closing = True
        if self._ctl_reader is not None:
            self._ctl_reader.cancel()
        for child in list(self._children.values()):
            child.kill()
        self._idle.clear()
        if self._ctl is not None:
            self._ctl.close()  # the server kills what is left and exits
            self._ctl = None
        server, self._server = self._server, None
        if server is not None:
            try:
                server.wait(2)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        self._stop_feeder()

    # -- the lease board -----------------------------------------------------------------

    def _lease_board(self) -> _LeaseBoard:
        """The board the fork server's children read, and the thread that keeps it current."""
        if self._board is None:
            self._board = _LeaseBoard.create()
        if self._feeder is None or not self._feeder.is_alive():
            self._feeder_stop.clear()
            self._feeder = threading.Thread(
                target=self._feed, args=(self._board, self._feeder_stop), name="kubetasks-lease-board",
                daemon=True,
            )  # fmt: skip
            self._feeder.start()
        return self._board

    def _feed(self, board: _LeaseBoard, stop: threading.Event) -> None:
        """Copy the lease's deadline to the board (a thread: the event loop may be held by a handler)."""
        while True:
            board.publish(self._deadline)
            if stop.wait(LEASE_FEED_INTERVAL):
                return

    def _stop_feeder(self) -> None:
        feeder, self._feeder = self._feeder, None
        self._feeder_stop.set()
        if feeder is not None:
            feeder.join(1.0)
        board, self._board = self._board, None
        if board is not None:
            board.close()

    async def _confirm_exits(self, children: Sequence[_Child]) -> None:
        waiting = [c.exited for c in children if not c.exited.done()]
        if not waiting:
            return
        _done, pending = await asyncio.wait(waiting, timeout=KILL_CONFIRM)
        if pending:
            log.error(
                "%d child process(es) of sync handlers not reported gone %.0f s after SIGKILL",
                len(pending), KILL_CONFIRM,
            )  # fmt: skip

    # -- children ----------------------------------------------------------------------

    async def _acquire(self) -> _Child:
        while self._idle:
            child = self._idle.popleft()
            if not child.gone:
                self.stats["reused"] += 1
                return child
            child.kill()
        spawn = asyncio.ensure_future(self._spawn())
        try:
            return await asyncio.shield(spawn)
        except asyncio.CancelledError:
            spawn.add_done_callback(self._park)
            raise

    def _park(self, fut: asyncio.Future[_Child]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._release(fut.result())

    async def _spawn(self) -> _Child:
        await self._ensure_server()
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        try:
            ctl = self._ctl
            if ctl is None:
                raise RuntimeError("the fork server for sync handlers is not running")
            fut: asyncio.Future[int] = loop.create_future()
            self._forks.append(fut)  # the server answers in request order
            socket.send_fds(ctl, [b"F"], [theirs.fileno()])
            pid = await fut
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        child = _Child(pid, reader, writer)
        self._children[pid] = child
        if pid in self._early_exits:
            child.exited.set_result(self._early_exits.pop(pid))
        self.stats["spawned"] += 1
        try:
            async with asyncio.timeout(30):
                hello = await child.recv()
            if hello[0] != "hello":
                raise _Gone
        except (TimeoutError, _Gone):
            child.kill()
            raise SyncHandlerDied(f"a child process for sync handlers did not start (pid {pid})") from None
        return child

    def _release(self, child: _Child) -> None:
        if child.clean and not child.gone and not self._closing and len(self._idle) < self.max_idle:
            self._idle.append(child)
        else:
            child.kill()

    # -- running a task ----------------------------------------------------------------

    async def run(self, func: Callable[..., Any], ctx: TaskContext) -> Any:
        """Run ``func`` for ``ctx`` in a child; its result, or the exception it ended with."""
        child = await self._acquire()
        run_id = next(self._seq)
        fields = {
            "id": ctx.id, "handler": ctx.handler, "queue": ctx.queue, "payload": ctx.payload,
            "attempt": ctx.attempt, "max_attempts": ctx.max_attempts, "priority": ctx.priority,
            "tags": list(ctx.tags), "worker_id": ctx.worker_id, "pod_id": ctx.pod_id,
            "parent_id": ctx.parent_id, "pause_requested": ctx.pause_requested,
        }  # fmt: skip
        spec = {
            "module": func.__module__,
            "qualname": func.__qualname__,
            "fields": fields,
            "max_bytes": self.max_bytes,
        }
        if self._board is not None:
            # As the run starts, not up to a feed interval later: the lease may be brand new.
            self._board.publish(self._deadline)
        child.clean = False

        def tell_pause(asked: bool) -> None:
            with contextlib.suppress(_Gone, OSError):
                child.send(("pause", run_id, asked))

        stop_telling = ctx.on_pause_change(tell_pause)
        try:
            try:
                child.send(("run", run_id, spec))
            except _Gone:
                raise await self._died(child, ctx) from None
            return await self._converse(child, ctx, run_id)
        except BaseException:
            if not child.clean:
                await self._stop(child, run_id)
            raise
        finally:
            stop_telling()
            self._release(child)

    def _deadline(self) -> float | None:
        """From any thread: ``lease_left`` must be safe to call off the event loop."""
        left = None if self.lease_left is None else self.lease_left()
        return None if left is None else time.monotonic() + left

    async def _converse(self, child: _Child, ctx: TaskContext, run_id: int) -> Any:
        while True:
            try:
                msg = await child.recv()
            except _Gone:
                raise await self._died(child, ctx) from None
            kind = msg[0]
            if msg[1] != run_id:
                continue  # left over from a run that was stopped
            if kind == "progress":
                # The child validated stage and metadata as the handler reported them.
                await ctx.progress(msg[2], msg[3], stage=msg[4], metadata=msg[5])
            elif kind == "call":
                _, _, seq, method, args, kwargs = msg
                child.send(("reply", run_id, seq, *await self._call(ctx, method, args, kwargs)))
            elif kind == "done":
                if msg[2] == "ok":
                    child.clean = True
                    return msg[3]
                _, _, _, enc, tb, fatal = msg
                child.clean = not fatal
                raise _decode_exc(enc, tb)

    async def _call(
        self, ctx: TaskContext, method: str, args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[str, Any]:
        try:
            if method == "spawn_many":
                return ("ok", await ctx.spawn_many(*args, **kwargs))
            if method == "audit":
                await ctx.audit(*args, **kwargs)
                return ("ok", None)
            if method == "wait":
                results = await ctx.wait(*args, **kwargs)
                return (
                    "ok",
                    [("raise", _encode_exc(r)) if isinstance(r, ChildFailed) else ("ok", r) for r in results],
                )
            raise RuntimeError(f"unknown call {method!r} from a sync handler")
        except (Exception, Suspend) as exc:
            return ("raise", _encode_exc(exc))

    async def _died(self, child: _Child, ctx: TaskContext) -> SyncHandlerDied:
        self.stats["died"] += 1
        child.clean = False
        code: int | None = None
        with contextlib.suppress(TimeoutError):
            code = await asyncio.wait_for(asyncio.shield(child.exited), KILL_CONFIRM)
        if code is None:
            how = "ended without reporting an outcome"
        elif code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            how = f"was killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
        else:
            how = f"exited with code {code}"
        return SyncHandlerDied(f"the process running handler {ctx.handler!r} (pid {child.pid}) {how}")

    async def _stop(self, child: _Child, run_id: int) -> None:
        """Set the child's ``cancelled``; kill it unless its handler returns within STOP_GRACE."""
        try:
            if not child.gone:
                with contextlib.suppress(_Gone, OSError):
                    child.send(("cancel", run_id))
                try:
                    async with asyncio.timeout(STOP_GRACE):
                        while True:
                            msg = await child.recv()
                            if msg[0] == "done" and msg[1] == run_id:
                                child.clean = msg[2] == "ok" or not msg[5]
                                break
                except (TimeoutError, _Gone):
                    pass
        finally:
            # Also when cancelled again while waiting: the process must not outlive this.
            if not child.clean:
                self.stats["killed"] += 1
                child.kill()
        if not child.clean:
            await self._confirm_exits([child])


async def run(func: Callable[..., Any], ctx: TaskContext) -> Any:
    """Run the sync handler ``func`` in a child process of the worker running this task."""
    pool = CURRENT.get()
    if pool is None:
        raise RuntimeError(
            f"handler {ctx.handler!r} is a plain function: it runs in a child process of a kubetasks "
            "worker, and none runs in this context"
        )
    return await pool.run(func, ctx)
