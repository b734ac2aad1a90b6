"""The exceptions kubetasks raises, and those a handler raises to steer its task.

Every input error names the field and the limit it broke, because the person
reading it is usually looking at a manifest or a call site, not our code.
"""

from __future__ import annotations

import math


class KubetasksError(Exception):
    """Base of every error kubetasks raises on purpose."""


class ValidationError(KubetasksError, ValueError):
    """Input refused before anything was written; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class UnknownHandler(ValidationError):
    """No handler of that name is registered; the message lists the known ones."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = sorted(known)
        listing = ", ".join(self.known) if self.known else "(none registered)"
        super().__init__("handler", f"unknown handler {name!r}; known handlers: {listing}")


class ConfigError(ValidationError):
    """A setting (argument or KUBETASKS_* variable) is malformed."""


class TaskNotFound(KubetasksError, LookupError):
    def __init__(self, task_id: int) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id} not found")


class LeaseLost(KubetasksError):
    """This worker no longer owns the task (or its lease): the write was not applied."""


#: The longest delay ``Retry`` accepts: a year, like an enqueue's delay.
RETRY_DELAY_MAX_S = 365 * 24 * 3600.0


def _message(field: str, value: object) -> str:
    """A handler's message: a string, or an exception (read as "Type: text")."""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    raise ValidationError(field, f"must be a string (or an exception), got {type(value).__name__}: {value!r}")


class Retry(Exception):
    """Raise in a handler to run the task again after ``delay`` seconds (counts an attempt).

    ``delay`` is a number of seconds from 0 to a year (None: the task's backoff);
    ``message`` a string or an exception. Anything else raises ``ValidationError``
    here, in the handler, naming the argument -- so a typo such as
    ``Retry("busy")`` fails the attempt with a clear error instead of reaching
    the worker.
    """

    def __init__(self, delay: float | None = None, message: str | BaseException = "retry requested") -> None:
        if delay is not None:
            if isinstance(delay, bool) or not isinstance(delay, int | float):
                raise ValidationError(
                    "delay",
                    f"Retry(delay=...) must be a number of seconds, got {type(delay).__name__}: {delay!r}",
                )
            if not (math.isfinite(delay) and 0 <= delay <= RETRY_DELAY_MAX_S):
                raise ValidationError(
                    "delay",
                    f"Retry(delay=...) must be between 0 and {RETRY_DELAY_MAX_S:g} seconds, got {delay!r}",
                )
            delay = float(delay)
        self.delay = delay
        self.message = _message("message", message)
        super().__init__(self.message)

    def __reduce__(self) -> tuple[type[Retry], tuple[float | None, str]]:
        # args holds only the message: rebuild from both, or unpickling would read it as the delay.
        return (type(self), (self.delay, self.message))


class Fail(Exception):
    """Raise in a handler to fail the task now, without further attempts.

    ``message`` is a string or an exception (``raise Fail(exc)`` records
    "Type: text"); anything else raises ``ValidationError`` naming the argument.
    """

    def __init__(self, message: str | BaseException = "failed by handler") -> None:
        self.message = _message("message", message)
        super().__init__(self.message)


#: The longest text ``Pause`` keeps (the rest is cut).
PAUSE_MESSAGE_MAX = 1000


class Pause(BaseException):
    """Raise in a handler (or call ``task.pause()``) to end this attempt without charging it
    and leave the task paused until ``resume_task``: typically at a checkpoint, once
    ``task.pause_requested`` is true. ``message`` (a string, at most 1000 characters kept)
    is recorded with the attempt and the ``paused`` event.

    A BaseException, so a handler's ``except Exception`` around the checkpoint does not
    swallow it.
    """

    def __init__(self, message: str | None = None) -> None:
        if message is not None and not isinstance(message, str):
            raise ValidationError("message", f"Pause(message) must be a string, got {type(message).__name__}")
        self.message = None if message is None else message[:PAUSE_MESSAGE_MAX]
        super().__init__(self.message or "paused by its handler")

    def __reduce__(self) -> tuple[type[Pause], tuple[str | None]]:
        return (type(self), (self.message,))
