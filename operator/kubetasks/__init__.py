"""kubetasks: a distributed task runner for Kubernetes, with PostgreSQL as the source of truth.

The public surface is what this module exports; everything else may change.
"""

from kubetasks.app import App, Blueprint, EnqueueRequest, Input, TaskPage, TaskRecord
from kubetasks.config import Settings
from kubetasks.context import TaskContext
from kubetasks.errors import (
    ConfigError,
    Fail,
    KubetasksError,
    LeaseLost,
    Pause,
    Retry,
    TaskNotFound,
    UnknownHandler,
    ValidationError,
)
from kubetasks.locks import JobLock, LockBackendError, LockLost, LockNotAcquired
from kubetasks.subprocs import SyncTaskContext
from kubetasks.workflows import ChildFailed, WorkflowSummary

__all__ = [
    "App",
    "Blueprint",
    "ChildFailed",
    "ConfigError",
    "EnqueueRequest",
    "Fail",
    "Input",
    "JobLock",
    "KubetasksError",
    "LeaseLost",
    "LockBackendError",
    "LockLost",
    "LockNotAcquired",
    "Pause",
    "Retry",
    "Settings",
    "SyncTaskContext",
    "TaskContext",
    "TaskNotFound",
    "TaskPage",
    "TaskRecord",
    "UnknownHandler",
    "ValidationError",
    "WorkflowSummary",
]
