"""The sidelog app as a later release ships it: the same handlers plus images.rotate.

Tests start it beside pods of the sidelog app to play a rolling upgrade that
adds a handler: a Task for images.rotate waits until a pod of this app runs.
"""

from __future__ import annotations

from kubetasks import TaskContext
from tests.integration.apps.sidelog import _append, app

__all__ = ["app"]


@app.task("images.rotate")
async def rotate(ctx: TaskContext) -> dict[str, bool]:
    _append("start", ctx)
    _append("end", ctx)
    return {"rotated": True}
