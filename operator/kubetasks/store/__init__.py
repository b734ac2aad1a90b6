"""The only code that sends SQL: a pool, the named queries and the migrations."""

from kubetasks.store.migrate import migrate
from kubetasks.store.pg import DB_ERRORS, Store, connect_listener, retry_connection_errors

__all__ = ["DB_ERRORS", "Store", "connect_listener", "migrate", "retry_connection_errors"]
