"""Operators as the chart deploys them, without a kubelet.

A test installs the chart (``helm install``, replicaCount=0, CRDs applied
once beforehand) into its namespace, then starts `kubetasks run` processes
that pose as the Deployment's pods (on this machine, outside any node):

* each gets the environment of the Deployment's container as the chart
  rendered it (literal values; the database URL resolved from the Secret the
  chart points at; POD_NAME/POD_NAMESPACE/POD_ID as the downward API would);
* each authenticates with a token of the release's ServiceAccount -- never
  the admin certificate -- so every feature runs under the chart's RBAC;
* a Pod object carrying the Deployment's pod labels is created for each.

``mode`` is ``namespaced`` (a Role, KUBETASKS_WATCH_NAMESPACES) or
``clusterwide`` (a ClusterRole, a ClusterKopfPeering of its own name).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import yaml
from tests.support import until

from e2e.conftest import NO_NODE, Cluster, wait_default_service_account
from kubetasks import devenv

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kubetasks"
APP = "tests.integration.apps.sidelog:app"
#: What every test operator runs with, beside the chart's own environment:
#: short windows so outages and takeovers fit in seconds.
FAST = {
    "KUBETASKS_PEERING_LIFETIME": "6",
    "KUBETASKS_HEARTBEAT_INTERVAL": "1",
    "KUBETASKS_LEASE_TTL": "10",
    "KUBETASKS_STATUS_RESYNC_INTERVAL": "2",
    "KUBETASKS_RECONCILE_INTERVAL": "10",
    "KUBETASKS_SHUTDOWN_GRACE": "5",
}


def apiserver_port(cluster: Cluster) -> int:
    env = Path(cluster.env["KUBETASKS_RUN"]) / "cluster.env"
    values = dict(line.split("=", 1) for line in env.read_text().splitlines() if "=" in line)
    return int(values["KUBETASKS_APISERVER_PORT"])


@dataclass
class Release:
    cluster: Cluster
    name: str
    namespace: str
    mode: str
    db_url: str
    peering: str
    sets: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def fullname(self) -> str:
        return self.name if "kubetasks" in self.name else f"{self.name}-kubetasks"

    @property
    def sa(self) -> str:
        return self.fullname

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.sa}"

    @property
    def webhook_configuration(self) -> str:
        return f"{self.fullname}-{self.namespace}-webhook"

    def install(self) -> None:
        c = self.cluster
        wait_default_service_account(c, self.namespace)
        secret = f"{self.name}-db"
        c.run(
            "create", "secret", "generic", secret, "-n", self.namespace, f"--from-literal=url={self.db_url}"
        )
        sets = [
            f"app={APP}",
            f"database.existingSecret={secret}",
            "replicaCount=0",
            "crds.enabled=false",
            f"peering.name={self.peering}",
            f"rbac.clusterWide={'true' if self.mode == 'clusterwide' else 'false'}",
            *self.sets,
        ]
        args = ["install", self.name, str(CHART), "-n", self.namespace]
        for s in sets:
            args += ["--set", s]
        c.helm_run(*args)
        dep = c.json("get", "deployment", self.fullname, "-n", self.namespace)
        tpl = dep["spec"]["template"]
        self.labels = dict(tpl["metadata"]["labels"])
        self.env = {}
        for e in tpl["spec"]["containers"][0]["env"]:
            if "value" in e:
                self.env[e["name"]] = e["value"]
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                data = c.json("get", "secret", ref["name"], "-n", self.namespace)["data"]
                self.env[e["name"]] = base64.b64decode(data[ref["key"]]).decode()

    def uninstall(self) -> None:
        self.cluster.helm_run("uninstall", self.name, "-n", self.namespace, check=False)

    def kubeconfig(self, path: Path, server_port: int | None = None) -> Path:
        """A kubeconfig with a token of the release's ServiceAccount (optionally via a proxy)."""
        c = self.cluster
        token = c.run("create", "token", self.sa, "-n", self.namespace, "--duration=2h").stdout.strip()
        raw = c.json("config", "view", "--raw", "--minify")
        server = dict(raw["clusters"][0]["cluster"])
        if server_port is not None:
            server["server"] = f"https://127.0.0.1:{server_port}"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "local", "cluster": server}],
                    "users": [{"name": "sa", "user": {"token": token}}],
                    "contexts": [{"name": "sa", "context": {"cluster": "local", "user": "sa"}}],
                    "current-context": "sa",
                }
            )
        )
        return path


def install(
    cluster: Cluster, namespace: str, db_url: str, mode: str, *, name: str = "kt", sets: tuple[str, ...] = ()
) -> Release:
    peering = "default" if mode == "namespaced" else f"kt-e2e-{uuid.uuid4().hex[:8]}"
    rel = Release(cluster, name, namespace, mode, db_url, peering, sets)
    rel.install()
    return rel


class Operators:
    """`kubetasks run` processes, each posing as a pod of one release's Deployment."""

    def __init__(self, release: Release, tmp: Path) -> None:
        self.release = release
        self.cluster = release.cluster
        self.namespace = release.namespace
        self.db = release.db_url
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.sidelog = tmp / "side.log"
        self._kubeconfig = release.kubeconfig(tmp / f"{release.name}-sa.kubeconfig")

    def pod(self, name: str) -> None:
        self.cluster.run(
            "apply", "-n", self.namespace, "-f", "-",
            input=json.dumps({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "labels": self.release.labels},
                "spec": {
                    "containers": [{"name": "kubetasks", "image": "kubetasks:e2e"}],
                    "nodeSelector": NO_NODE,  # a stand-in: the local node must never run it
                },
            }),
        )  # fmt: skip

    def env(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETASKS_")}
        env.update(self.release.env)
        env.update(
            KUBECONFIG=str(self._kubeconfig),
            POD_NAME=name,
            POD_ID=name,  # kopf's peering identity, as the chart sets it
            POD_NAMESPACE=self.namespace,
            SIDELOG=str(self.sidelog),
            PYTHONPATH=str(ROOT),
            **FAST,
        )
        env.update(extra or {})
        return env

    def start(
        self,
        name: str,
        concurrency: int = 20,
        priority: int | None = None,
        extra: dict[str, str] | None = None,
        *,
        db_url: str | None = None,
        api_port: int | None = None,
        app: str = APP,
    ) -> subprocess.Popen[bytes]:
        self.pod(name)
        # Every process binds its own metrics port (pods would each have their own IP).
        more = {
            "KUBETASKS_CONCURRENCY": str(concurrency),
            "KUBETASKS_METRICS_PORT": str(devenv.free_port()),
            **(extra or {}),
        }
        if priority is not None:
            more["KUBETASKS_PEERING_PRIORITY"] = str(priority)
        if db_url is not None:
            more["KUBETASKS_DATABASE_URL"] = db_url
        if api_port is not None:
            more["KUBECONFIG"] = str(
                self.release.kubeconfig(self.tmp / f"{name}-proxied.kubeconfig", api_port)
            )
        with open(self.tmp / f"{name}.log", "ab") as log:
            p = subprocess.Popen(
                [sys.executable, "-m", "kubetasks", "run", "--app", app],
                cwd=ROOT,
                env=self.env(name, more),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    async def leader(self) -> str | None:
        """The pod holding this scope's operator lease (from the database), if live."""
        conn = await asyncpg.connect(self.db)
        try:
            row = await conn.fetchrow(
                "SELECT holder FROM kubetasks.operator_leases WHERE expires_at > now() "
                "ORDER BY renewed_at DESC LIMIT 1"
            )
        finally:
            await conn.close()
        return None if row is None else str(row["holder"])

    def kill(self, name: str) -> None:
        p = self.procs[name]
        p.kill()
        p.wait()

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)  # a test may have frozen it
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(40)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def task_manifest(name: str, handler: str = "side.work", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetasks.dev/v1alpha1",
        "kind": "Task",
        "metadata": {"name": name},
        "spec": {"handler": handler, **spec},
    }


def cronjoblock(name: str, schedule: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetasks.dev/v1alpha1",
        "kind": "CronJobLock",
        "metadata": {"name": name},
        "spec": {"schedule": schedule, "handler": "side.work", "payload": {"ms": [1, 5]}, **spec},
    }


def apply(
    cluster: Cluster, ns: str, manifests: list[dict[str, Any]], *extra: str
) -> subprocess.CompletedProcess[str]:
    doc = {"apiVersion": "v1", "kind": "List", "items": manifests}
    return cluster.run("apply", "-n", ns, *extra, "-f", "-", input=json.dumps(doc), check=False)


def objects(cluster: Cluster, ns: str, kind: str = "tasks") -> dict[str, dict[str, Any]]:
    return {i["metadata"]["name"]: i for i in cluster.json("get", kind, "-n", ns)["items"]}


def phases(cluster: Cluster, ns: str) -> dict[str, str]:
    return {n: (o.get("status") or {}).get("phase", "") for n, o in objects(cluster, ns).items()}


async def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> float:
    """``tests.support.until``; returns the seconds it took."""
    t0 = time.monotonic()
    await until(cond, timeout, what, interval)
    return time.monotonic() - t0


async def db_rows(db: str, namespace: str | None = None) -> list[asyncpg.Record]:
    """Task rows (of one namespace's Task objects, when given), by id."""
    conn = await asyncpg.connect(db)
    try:
        if namespace is None:
            return await conn.fetch("SELECT * FROM kubetasks.tasks ORDER BY id")
        return await conn.fetch(
            "SELECT * FROM kubetasks.tasks WHERE cr_namespace = $1 ORDER BY id", namespace
        )
    finally:
        await conn.close()


async def wait_ready(ops: Operators, names: list[str], timeout: float = 60) -> None:
    async def up() -> bool:
        for n in names:
            assert ops.procs[n].poll() is None, ops.log(n)[-3000:]
        conn = await asyncpg.connect(ops.db)
        try:
            n = await conn.fetchval(
                "SELECT count(*) FROM kubetasks.workers WHERE status='active' AND pod_id = ANY($1)", names
            )
        finally:
            await conn.close()
        return int(n) == len(names)

    await wait_until(up, timeout, f"operators {names} to register", interval=0.2)


async def wait_leading(ops: Operators, timeout: float = 30) -> str:
    """Until some operator holds the lease of this scope; returns its pod."""
    await wait_until(ops.leader, timeout, "an operator leader", interval=0.2)
    leader = await ops.leader()
    assert leader is not None
    return leader
