"""The only code that sends SQL: a pool, the named queries and the migrations."""

from kubetasks.store.migrate import migrate
from kubetasks.store.pg import Store, connect_listener

__all__ = ["Store", "connect_listener", "migrate"]
