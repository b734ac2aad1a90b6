"""What every operator handler is given: the ``OperatorContext``, and ``NotLeading``, raised
when this process stopped leading while it worked (the next leader takes over)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubetasks.app import App
    from kubetasks.k8s.kube import Kube
    from kubetasks.store import Store


class NotLeading(Exception):
    """This process no longer leads: the next leader takes over what was in hand."""


@dataclass
class OperatorContext:
    app: App
    store: Store
    kube: Kube
    namespaces: tuple[str, ...] = ()
    #: True while this process may write (it leads and reached the database lately).
    fence: Callable[[], bool] = lambda: True
    ttl_timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    background: set[asyncio.Task[None]] = field(default_factory=set)

    def scope(self) -> list[str] | None:
        """The namespaces for SQL filters; None: every namespace."""
        return list(self.namespaces) if self.namespaces else None
