"""Version 1 of the node tests' app: the examples' handlers, node.sleep and node.work."""

from __future__ import annotations

from examples.app import app as examples

from kubetasks import App

from .side import register

app = App()
app.add_tasks_from(examples)  # `kubectl apply -f examples/tasks/` runs in the same pods
register(app)
