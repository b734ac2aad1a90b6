"""The web dashboard and its JSON HTTP API (``kubetasks dashboard``).

What this package owns, module by module:

* ``api``: the endpoints under ``/api/v1`` (tasks, bulk actions, workflows,
  events and attempts, queues, schedules, workers and pods, the overview,
  the live stream), built on the public ``App`` verbs.
* ``auth``: bearer token / trusted proxy header / none, session cookie,
  CSRF, read-only unless ``KUBETASKS_DASHBOARD_WRITES``.
* ``live``: PostgreSQL notifications fanned out to every open page as
  server-sent events.
* ``rollups``: the per-minute rollups of finished tasks and queue depth that
  the overview reads instead of counting the tasks table.
* ``server``: the ASGI app (FastAPI), the built page (``static/``, made by
  Vite from ``dashboard-ui/`` at package build time), and ``serve``.

Only the CLI imports this package (``kubetasks dashboard``, and ``kubetasks
run`` when ``KUBETASKS_DASHBOARD_PORT`` is set); the engine never does.
"""
