"""The app the real-node e2e tests run in pods (image kubetasks.local/kubetasks-apps).

It serves the handlers of examples/app.py (also in the image, at /app/examples)
and the node tests' own, which record what really ran in a side table.

In the image this package is ``/app/nodeapp``; the chart runs ``nodeapp.app:app``.
Image version 1 ships ``app.py``; version 2 ships ``app_v2.py`` in its place,
which adds a handler: what a rolling upgrade of a user's app looks like.
"""
