"""Settings: one object, built once from arguments and KUBETASKS_* variables.

Precedence is argument > environment > default. Everything is validated here,
at start-up, so a typo in a Helm value fails the pod at once with the name of
the variable instead of minutes later inside a worker.
"""

from __future__ import annotations

import inspect
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubetasks import validation
from kubetasks.errors import ConfigError

ENV_PREFIX = "KUBETASKS_"


def validate_database_url(url: str, var: str = "KUBETASKS_DATABASE_URL") -> str:
    """A postgresql:// URL, with one host or several (``host1:5432,host2:5432``, libpq's
    syntax for failover, usually with ``?target_session_attrs=read-write``)."""
    try:
        parts = urlsplit(url)
        hosts = parts.netloc.rpartition("@")[2].split(",")
        for host in hosts:
            # each host:port on its own: urlsplit reads only one, and would refuse "5432,host2"
            _ = urlsplit(f"//{host}").port  # raises ValueError on a non-numeric port
    except ValueError as exc:
        raise ConfigError(var, f"malformed database URL: {exc}") from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigError(
            var,
            f"must be a postgresql:// URL (postgresql://user:password@host:5432/db), "
            f"got scheme {parts.scheme or '(none)'!r}",
        )
    if not all(urlsplit(f"//{h}").hostname for h in hosts) and "host=" not in parts.query:
        raise ConfigError(var, "names no host (postgresql://user@host:5432/db)")
    return url


def validate_redis_url(url: str, var: str = "KUBETASKS_REDIS_URL") -> str:
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as exc:
        raise ConfigError(var, f"malformed Redis URL: {exc}") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(var, f"must be a redis:// URL, got scheme {parts.scheme or '(none)'!r}")
    return url


#: In KUBETASKS_QUEUES: every queue the worker's handlers have tasks in.
ALL_QUEUES = "*"


def validate_queues(var: str, queues: tuple[str, ...]) -> tuple[str, ...]:
    """Queue names, or ``*`` once and last (the named queues before it are served first)."""
    for i, q in enumerate(queues):
        if q == ALL_QUEUES:
            if i != len(queues) - 1:
                raise ConfigError(var, f"'*' (every queue) must come last, got {','.join(queues)!r}")
            continue
        validation.name(var, q)
    if len(set(queues)) != len(queues):
        raise ConfigError(var, f"names a queue twice: {','.join(queues)!r}")
    return queues


def dev_run_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where ``kubetasks dev`` keeps its servers: ``KUBETASKS_RUN_DIR``, else ./.run. Read apart
    from ``Settings``: the local servers start before there is a database to name."""
    env = os.environ if env is None else env
    return Path(env.get("KUBETASKS_RUN_DIR", ".run")).resolve()


def default_pod_id() -> str:
    return os.environ.get("POD_NAME") or socket.gethostname()


def default_pod_namespace() -> str:
    return os.environ.get("POD_NAMESPACE", "")


#: Variables the Kubernetes downward API sets under their conventional names.
_DOWNWARD = {"pod_id": "POD_NAME", "pod_namespace": "POD_NAMESPACE"}
#: Settings read only under the name Kubernetes and its clients give them (no KUBETASKS_ one).
_EXTERNAL = {"kubernetes_service_host": "KUBERNETES_SERVICE_HOST", "kubeconfig": "KUBECONFIG"}


@dataclass(frozen=True)
class Settings:
    """Everything a process needs; field names match the KUBETASKS_* variables."""

    #: postgresql:// URL of the database (several hosts for failover: host1:5432,host2:5432).
    database_url: str = ""
    #: session: database_url reaches PostgreSQL itself (or a session-pooling proxy);
    #: transaction: it goes through a transaction-pooling proxy such as PgBouncer, so
    #: no statement cache, no session state, and LISTEN and the lease's slot lock need
    #: database_direct_url (without it: polling, with a warning at start-up).
    database_pooling: str = "session"
    #: A direct connection to the primary for what a transaction-pooling proxy cannot
    #: carry (LISTEN, session advisory locks, migrations); empty: database_url.
    database_direct_url: str = ""
    #: A streaming standby for read-only queries (stats, listings, dashboard reads,
    #: metrics); empty: everything goes to database_url.
    database_replica_url: str = ""
    #: Seconds between looks when there is no LISTEN connection (transaction pooling
    #: without database_direct_url).
    poll_interval: float = 1.0
    #: Seconds a worker that keeps finding work goes on looking on its own before it
    #: asks enqueues to wake it again (a notifying commit takes a cluster-wide lock,
    #: so while it is asked, busy enqueuers commit one at a time); 0: always ask.
    claim_linger: float = 0.005
    #: Seconds a transaction elsewhere in the database may stay open before workers warn
    #: that it holds back vacuum (and name it); 0: never look.
    long_transaction_warn: float = 60.0
    #: redis:// URL for job locks; unset: locks live in PostgreSQL.
    redis_url: str | None = None
    #: This process's pod (the Downward API's POD_NAME in a pod).
    pod_id: str = field(default_factory=default_pod_id)
    #: Queues served, in priority order. Empty: the queues of the handlers the app has (each
    #: handler's ``queue``, else default_queue). ``*`` serves every queue its handlers' tasks are
    #: in (the named queues before it come first).
    queues: tuple[str, ...] = ()
    #: Tasks one process runs at once.
    concurrency: int = 10
    #: Seconds between heartbeats (lease renewals, cancellation checks).
    heartbeat_interval: float = 5.0
    #: Seconds a worker's lease lasts without a heartbeat before peers recover its tasks.
    lease_ttl: float = 15.0
    #: Seconds running tasks may finish after SIGTERM before they are handed back.
    shutdown_grace: float = 30.0
    #: Largest payload accepted, in bytes of JSON.
    max_payload_bytes: int = validation.DEFAULT_MAX_PAYLOAD_BYTES
    #: Queue of a task whose handler names none.
    default_queue: str = "default"
    #: Seconds an attempt may run, unless the handler or the task says otherwise.
    default_timeout: float = 300.0
    #: Attempts a task gets, unless the handler or the task says otherwise.
    default_max_attempts: int = 3
    #: Seconds before the first retry, unless the handler or the task says otherwise.
    default_retry_delay: float = 1.0
    #: Factor each later retry's delay grows by, unless the handler or the task says otherwise.
    default_backoff: float = 2.0
    #: Longest delay between retries in seconds, unless the handler or the task says otherwise.
    default_max_retry_delay: float = 3600.0
    #: Connections in this process's pool.
    pool_size: int = 10
    #: Seconds a succeeded task is kept after it finished; 0: for ever (all three 0: no
    #: retention at all, see kubetasks.retention).
    retention_succeeded: float = 7 * 86400.0
    #: Seconds a failed task is kept after it finished; 0: for ever.
    retention_failed: float = 30 * 86400.0
    #: Seconds a cancelled task is kept after it finished; 0: for ever.
    retention_cancelled: float = 7 * 86400.0
    #: Seconds between retention passes across the cluster (one pod runs each).
    retention_interval: float = 300.0
    #: Workflow roots (each with its tree) one retention statement deletes at most.
    retention_batch: int = 500
    # The probe and metrics server (health.py): on when metrics_port is set, or
    # when metrics_addr_file is (then port 0 means any free port, e.g. several
    # hostNetwork pods on one node, and the file says where it listens).
    metrics_port: int = 0
    #: Address the probe and metrics server binds.
    metrics_addr: str = "0.0.0.0"
    #: File the metrics server writes its address to (then port 0 means any free port).
    metrics_addr_file: str = ""
    # The Kubernetes side (k8s/). Unset pod_namespace: not in a pod, no pod recovery.
    pod_namespace: str = field(default_factory=default_pod_namespace)
    #: Namespaces whose Tasks and CronJobLocks this release handles; empty: every namespace.
    watch_namespaces: tuple[str, ...] = ()
    #: Label selector of this release's pods (its workers are recovered when they go).
    pod_selector: str = ""
    #: kopf peering object name.
    peering_name: str = "default"
    #: kopf peering priority; 0 draws one per process (equal priorities freeze every replica).
    peering_priority: int = 0
    #: Seconds a kopf peering record lives without renewal.
    peering_lifetime: int = 10
    #: Seconds a leader goes on without reaching PostgreSQL before it gives up leadership.
    leader_timeout: float = 10.0
    #: Seconds between rewrites of Task statuses still owed to their objects.
    status_resync_interval: float = 30.0
    #: Seconds between full comparisons of Task objects with their rows.
    reconcile_interval: float = 60.0
    #: kopf's log level (debug, info, warning, error, critical).
    kopf_log_level: str = "WARNING"
    #: KUBETASKS_OPERATOR=false: never run the operator, even where a cluster can be reached.
    operator: bool = True
    #: Set by Kubernetes in every pod: the operator then uses the in-cluster configuration.
    kubernetes_service_host: str = ""
    #: $KUBECONFIG (a path list): a cluster to reach from outside it (else ~/.kube/config).
    kubeconfig: str = ""
    #: Port of the validating admission webhook; 0: no webhook.
    webhook_port: int = 0
    #: Address the admission webhook binds.
    webhook_addr: str = "127.0.0.1"
    #: Host name or IP in the serving certificate (default: webhook_addr).
    webhook_host: str = ""
    #: Directory with tls.crt, tls.key and ca.crt; empty: a throwaway CA is made.
    webhook_cert_dir: str = ""
    #: ValidatingWebhookConfiguration whose caBundle the operator keeps current.
    webhook_configuration: str = ""
    # The dashboard and HTTP API (kubetasks.dashboard). `kubetasks dashboard` serves
    # it (on 8080 when this is 0); `kubetasks run` serves it too when this is set.
    dashboard_port: int = 0
    #: Address the dashboard binds: loopback unless told otherwise (the chart sets it).
    dashboard_addr: str = "127.0.0.1"
    #: token: a bearer token (dashboard_token, from a Secret), also exchanged for a
    #: session cookie by the page's login; proxy: trust dashboard_user_header, set by an
    #: authenticating proxy that alone can reach the dashboard; none: no authentication.
    dashboard_auth: str = "token"
    #: The dashboard's bearer token (from a Secret; at least 16 characters).
    dashboard_token: str = field(default="", repr=False)
    #: Header naming the user, set by the authenticating proxy (dashboard_auth=proxy).
    dashboard_user_header: str = "X-Forwarded-User"
    #: Allow retry, cancel, pause, resume, delete and schedule actions (read-only otherwise).
    dashboard_writes: bool = False
    #: Never show payloads, results or tracebacks of tasks.
    dashboard_hide_payloads: bool = False
    #: Seconds between the rollup passes that feed the overview and live updates.
    dashboard_rollup_interval: float = 2.0

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build from ``overrides`` first, then KUBETASKS_* in ``env``, then defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            if overrides.get(f.name) is not None:
                values[f.name] = overrides[f.name]
                continue
            var = _EXTERNAL.get(f.name) or ENV_PREFIX + f.name.upper()
            raw = env.get(var)
            if raw is None and f.name in _DOWNWARD:
                raw = env.get(_DOWNWARD[f.name])
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(var, f.type, raw)
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(sorted(unknown)[0], "is not a kubetasks setting")
        return cls(**values).validated()

    def validated(self) -> Settings:
        if not self.database_url:
            raise ConfigError(
                "KUBETASKS_DATABASE_URL",
                "is not set: pass database_url= or export KUBETASKS_DATABASE_URL=postgresql://...",
            )
        validate_database_url(self.database_url)
        if self.database_pooling not in DATABASE_POOLING:
            raise ConfigError(
                "KUBETASKS_DATABASE_POOLING",
                f"must be one of {', '.join(DATABASE_POOLING)}, got {self.database_pooling!r}",
            )
        if self.database_direct_url:
            validate_database_url(self.database_direct_url, "KUBETASKS_DATABASE_DIRECT_URL")
        if self.database_replica_url:
            validate_database_url(self.database_replica_url, "KUBETASKS_DATABASE_REPLICA_URL")
        _positive("KUBETASKS_POLL_INTERVAL", self.poll_interval, 0.05, 60)
        _positive("KUBETASKS_CLAIM_LINGER", self.claim_linger, 0, 1)
        if self.long_transaction_warn:
            _positive("KUBETASKS_LONG_TRANSACTION_WARN", self.long_transaction_warn, 1, 86400)
        if self.redis_url:
            validate_redis_url(self.redis_url)
        validate_queues("KUBETASKS_QUEUES", self.queues)
        validation.name("KUBETASKS_DEFAULT_QUEUE", self.default_queue)
        if not 1 <= len(self.pod_id) <= 253:
            raise ConfigError("KUBETASKS_POD_ID", "must be 1 to 253 characters")
        validation.concurrency("KUBETASKS_CONCURRENCY", self.concurrency)
        _positive("KUBETASKS_HEARTBEAT_INTERVAL", self.heartbeat_interval, 0.05, 300)
        _positive("KUBETASKS_LEASE_TTL", self.lease_ttl, 0.2, 3600)
        if self.lease_ttl <= self.heartbeat_interval * 1.5:
            raise ConfigError(
                "KUBETASKS_LEASE_TTL",
                f"must exceed 1.5 x KUBETASKS_HEARTBEAT_INTERVAL ({self.heartbeat_interval:g}s), "
                f"got {self.lease_ttl:g}s",
            )
        _positive("KUBETASKS_SHUTDOWN_GRACE", self.shutdown_grace, 0, 86400)
        if not 1024 <= self.max_payload_bytes <= 64 * 1024 * 1024:
            raise ConfigError("KUBETASKS_MAX_PAYLOAD_BYTES", "must be between 1024 and 67108864")
        validation.timeout(self.default_timeout)
        validation.max_attempts(self.default_max_attempts)
        validation.retry_delay(self.default_retry_delay)
        validation.backoff(self.default_backoff)
        validation.max_retry_delay(self.default_max_retry_delay)
        for var, keep in (
            ("KUBETASKS_RETENTION_SUCCEEDED", self.retention_succeeded),
            ("KUBETASKS_RETENTION_FAILED", self.retention_failed),
            ("KUBETASKS_RETENTION_CANCELLED", self.retention_cancelled),
        ):
            if keep != 0:
                _positive(var, keep, 60, 10 * 365 * 86400.0)  # 0 (keep for ever) or a minute..10 years
        _positive("KUBETASKS_RETENTION_INTERVAL", self.retention_interval, 1, 86400)
        if not 1 <= self.retention_batch <= 10_000:
            raise ConfigError(
                "KUBETASKS_RETENTION_BATCH", f"must be between 1 and 10000, got {self.retention_batch}"
            )
        if not 1 <= self.pool_size <= 200:
            raise ConfigError("KUBETASKS_POOL_SIZE", "must be between 1 and 200")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(
                "KUBETASKS_METRICS_PORT", f"must be between 0 and 65535, got {self.metrics_port}"
            )
        if not self.metrics_addr.strip() or any(c.isspace() for c in self.metrics_addr):
            raise ConfigError(
                "KUBETASKS_METRICS_ADDR",
                f"must be an address to bind (0.0.0.0, an IP), got {self.metrics_addr!r}",
            )
        for ns in self.watch_namespaces:
            if not _DNS_LABEL.match(ns):
                raise ConfigError("KUBETASKS_WATCH_NAMESPACES", f"{ns!r} is not a namespace name")
        if not 0 <= self.peering_priority < 2**31:
            raise ConfigError("KUBETASKS_PEERING_PRIORITY", "must be between 0 and 2147483647")
        _positive("KUBETASKS_PEERING_LIFETIME", self.peering_lifetime, 2, 3600)
        _positive("KUBETASKS_LEADER_TIMEOUT", self.leader_timeout, 1, 300)
        _positive("KUBETASKS_STATUS_RESYNC_INTERVAL", self.status_resync_interval, 0.5, 3600)
        _positive("KUBETASKS_RECONCILE_INTERVAL", self.reconcile_interval, 1, 86400)
        if self.kopf_log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError("KUBETASKS_KOPF_LOG_LEVEL", "must be debug, info, warning, error or critical")
        if not 0 <= self.webhook_port <= 65535:
            raise ConfigError("KUBETASKS_WEBHOOK_PORT", "must be between 0 (off) and 65535")
        self._validate_dashboard()
        return self

    def _validate_dashboard(self) -> None:
        if not 0 <= self.dashboard_port <= 65535:
            raise ConfigError(
                "KUBETASKS_DASHBOARD_PORT", f"must be between 0 and 65535, got {self.dashboard_port}"
            )
        if not self.dashboard_addr.strip() or any(c.isspace() for c in self.dashboard_addr):
            raise ConfigError(
                "KUBETASKS_DASHBOARD_ADDR", "must be an address to bind (127.0.0.1, 0.0.0.0, an IP)"
            )
        if self.dashboard_auth not in DASHBOARD_AUTH:
            raise ConfigError(
                "KUBETASKS_DASHBOARD_AUTH",
                f"must be one of {', '.join(DASHBOARD_AUTH)}, got {self.dashboard_auth!r}",
            )
        if self.dashboard_token and len(self.dashboard_token) < DASHBOARD_TOKEN_MIN:
            raise ConfigError(
                "KUBETASKS_DASHBOARD_TOKEN",
                f"must be at least {DASHBOARD_TOKEN_MIN} characters (a random secret)",
            )
        if not _HEADER.match(self.dashboard_user_header):
            raise ConfigError("KUBETASKS_DASHBOARD_USER_HEADER", "must be an HTTP header name")
        _positive("KUBETASKS_DASHBOARD_ROLLUP_INTERVAL", self.dashboard_rollup_interval, 0.2, 300)

    def dashboard_ready(self) -> Settings:
        """These settings, checked for serving the dashboard: token mode needs a token."""
        if self.dashboard_auth == "token" and not self.dashboard_token:
            raise ConfigError(
                "KUBETASKS_DASHBOARD_TOKEN",
                "is not set: the dashboard authenticates with a bearer token by default "
                "(set one from a Secret, or KUBETASKS_DASHBOARD_AUTH=proxy behind an authenticating "
                "proxy, or =none on a trusted loopback address)",
            )
        return self

    @property
    def transaction_pooled(self) -> bool:
        """database_url goes through a transaction-pooling proxy."""
        return self.database_pooling == "transaction"

    @property
    def direct_url(self) -> str:
        """A URL whose sessions are PostgreSQL's own: LISTEN, session locks, migrations.
        Empty when there is none (transaction pooling without database_direct_url)."""
        if self.database_direct_url:
            return self.database_direct_url
        return "" if self.transaction_pooled else self.database_url

    @property
    def read_url(self) -> str:
        """Where read-only queries go: the replica when there is one."""
        return self.database_replica_url or self.database_url

    @property
    def metrics_enabled(self) -> bool:
        return bool(self.metrics_port or self.metrics_addr_file)

    def kubernetes_reachable(self) -> bool:
        """Should this process run the operator: is there a cluster to talk to (in-cluster,
        $KUBECONFIG or ~/.kube/config) and is the operator not turned off?"""
        if not self.operator:
            return False
        if self.kubernetes_service_host:
            return True
        if self.kubeconfig:
            return any(Path(p).exists() for p in self.kubeconfig.split(os.pathsep) if p)
        return (Path.home() / ".kube" / "config").exists()

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes).validated()


@dataclass(frozen=True)
class SettingDoc:
    """One setting as ``--help`` shows it: its variable, default and the comment above it."""

    name: str
    var: str
    default: str
    doc: str


_SECRET = {"dashboard_token"}


def describe() -> list[SettingDoc]:
    """Every setting of ``Settings``, read from the class itself: field, type, default, and the
    comments written above the field (so ``--help`` needs no second list to keep true)."""
    docs = _field_comments()
    out = []
    for f in fields(Settings):
        if f.default is not MISSING:
            value: Any = f.default
            if isinstance(value, bool):
                shown = "true" if value else "false"
            elif value in ("", None, ()):
                shown = "(unset)"
            else:
                shown = ",".join(value) if isinstance(value, tuple) else _number(value)
        else:
            shown = f"${_DOWNWARD[f.name]}, else computed" if f.name in _DOWNWARD else "computed"
        if f.name == "database_url":
            shown = "(required)"
        if f.name in _SECRET:
            shown = "(unset; a secret)"
        var = _EXTERNAL.get(f.name) or ENV_PREFIX + f.name.upper()
        out.append(SettingDoc(f.name, var, shown, docs.get(f.name, "")))
    return out


def _number(value: object) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _field_comments() -> dict[str, str]:
    try:
        lines = inspect.getsource(Settings).splitlines()
    except (OSError, TypeError):  # no source shipped: names and defaults only
        return {}
    out: dict[str, str] = {}
    pending: list[str] = []
    for raw in lines[1:]:
        line = raw.strip()
        if line.startswith("#"):
            pending.append(line.lstrip("#:").strip())
            continue
        m = re.match(r"^([a-z_][a-z0-9_]*)\s*:", line)
        if m and pending:
            out[m.group(1)] = " ".join(pending)
        if line.startswith(("def ", "@")):
            break
        pending = []
    return out


def settings_help() -> str:
    """The text ``kubetasks run --help`` ends with: every KUBETASKS_* variable, its default, what it is."""
    rows = ["Every setting is a KUBETASKS_* variable (an option above wins over it):", ""]
    for d in describe():
        rows.append(f"{d.var} = {d.default}" + (f"  -- {d.doc}" if d.doc else ""))
    return "\n\n".join(rows)


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_HEADER = re.compile(r"^[A-Za-z0-9-]{1,64}$")
DASHBOARD_AUTH = ("token", "proxy", "none")
DATABASE_POOLING = ("session", "transaction")
DASHBOARD_TOKEN_MIN = 16
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _positive(var: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(var, f"must be between {lo:g} and {hi:g}, got {value:g}")


def _parse(var: str, typ: Any, raw: str) -> Any:
    t = str(typ)
    if t == "bool":
        if raw.strip().lower() in _TRUE:
            return True
        if raw.strip().lower() in _FALSE:
            return False
        raise ConfigError(var, f"must be true or false, got {raw!r}")
    try:
        if "tuple" in t:
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        if t == "int":
            return int(raw)
        if t == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(var, f"must be a number, got {raw!r}") from None
    return raw
