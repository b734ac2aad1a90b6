"""A task's statuses, named once: every module (and the SQL's CHECK constraint) uses these."""

STATUSES = ("pending", "running", "succeeded", "failed", "cancelled", "paused", "suspended")
FINISHED = ("succeeded", "failed", "cancelled")
#: suspended: a workflow waiting for its children.
UNFINISHED = ("pending", "running", "paused", "suspended")
