"""The exceptions kubetasks raises, and the two a handler raises to steer its task.

Every input error names the field and the limit it broke, because the person
reading it is usually looking at a manifest or a call site, not our code.
"""

from __future__ import annotations


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


class Retry(Exception):
    """Raise in a handler to run the task again after ``delay`` seconds (counts an attempt)."""

    def __init__(self, delay: float | None = None, message: str = "retry requested") -> None:
        self.delay = delay
        self.message = message
        super().__init__(message)


class Fail(Exception):
    """Raise in a handler to fail the task now, without further attempts."""

    def __init__(self, message: str = "failed by handler") -> None:
        self.message = message
        super().__init__(message)
