"""Task-object throughput through the operator (issue 8 item 6, the Kubernetes issue).

This module owns the ``k8s`` measurement: the local control plane of
e2e/cluster (``up.sh``: etcd + kube-apiserver from ~/.cache/kubetasks; no
kubelet), the CRDs of crds/, one `kubetasks run` process (operator + worker,
concurrency C, the bench app) posing as a Pod of a fresh namespace, as
e2e/test_operator.py runs it. N Task manifests (handler ``noop``) go in one
``kubectl apply -f -``; we time from the start of the apply until every Task
object's ``.status.phase`` reads Succeeded, read from the API server every
0.1 s in-process (aiohttp with the admin certificate, so polling costs no
kubectl processes). Also: how long the apply itself took, and when the
database had them all succeeded (so the status write-back lag is visible).

When the cluster cannot be started the result is n/a with the reason. A
cluster this measurement started is stopped afterwards (``down.sh``); one that
was already running is left as it was (only our namespace is deleted).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from tests.support import CLUSTER_DIR, cluster_env

from bench import systems
from bench.harness import ROOT, Databases, Workers, launcher, running

SELECTOR = "app.kubernetes.io/name=kubetasks-bench"


class Kube:
    """kubectl and a direct API reader for the local control plane."""

    def __init__(self, env: dict[str, str]) -> None:
        self.kubectl = env["KUBETASKS_KUBECTL"]
        self.kubeconfig = env["KUBETASKS_KUBECONFIG"]
        run = Path(env["KUBETASKS_RUN"])
        cenv = dict(
            line.split("=", 1) for line in (run / "cluster.env").read_text().splitlines() if "=" in line
        )
        self.server = cenv["KUBETASKS_APISERVER_URL"]
        pki = run / "pki"
        self.ssl = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.ssl.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

    async def run(self, *args: str, input: str | None = None, timeout: float = 120) -> str:
        proc = await asyncio.create_subprocess_exec(
            self.kubectl,
            "--kubeconfig",
            self.kubeconfig,
            *args,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(input.encode() if input else None), timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {err.decode()[-2000:]}")
        return out.decode()

    async def apply(self, ns: str, items: list[dict[str, Any]]) -> str:
        doc = {"apiVersion": "v1", "kind": "List", "items": items}
        return await self.run("apply", "-n", ns, "-f", "-", input=json.dumps(doc))


def task_manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetasks.dev/v1alpha1",
        "kind": "Task",
        "metadata": {"name": name},
        "spec": {"handler": "noop"},
    }


async def _cluster_up(timeout: float) -> tuple[bool, str, bool]:
    """(ok, output tail, started here)."""
    try:
        up = await asyncio.to_thread(
            subprocess.run,
            ["bash", str(CLUSTER_DIR / "up.sh")],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"e2e/cluster/up.sh: {exc}", True
    tail = (up.stdout[-1500:] + "\n" + up.stderr[-1500:]).strip()
    return up.returncode == 0, tail, "already running" not in up.stdout


async def _cluster_down() -> None:
    await asyncio.to_thread(
        subprocess.run, ["bash", str(CLUSTER_DIR / "down.sh")], capture_output=True, timeout=120
    )


async def measure(
    dbs: Databases, n: int, concurrency: int, log: Any, up_timeout: float = 600
) -> dict[str, Any]:
    """The ``k8s`` section of the results; ``error`` (and ``na``) when the cluster cannot start."""
    out: dict[str, Any] = {"tasks": n, "concurrency": concurrency}
    t = time.monotonic()
    log("k8s: starting the local control plane (e2e/cluster/up.sh)")
    ok, tail, started_here = await _cluster_up(up_timeout)
    out["cluster_up_s"] = round(time.monotonic() - t, 1)
    out["cluster_started_here"] = started_here
    if not ok:
        if started_here:
            await _cluster_down()
        out["na"] = True
        out["error"] = f"the local control plane did not start (e2e/cluster/up.sh): {tail[-1500:]}"
        return out
    try:
        out.update(await _measure(dbs, n, concurrency, log))
    finally:
        if started_here:
            await _cluster_down()
            log("k8s: local control plane stopped")
    return out


async def _measure(dbs: Databases, n: int, concurrency: int, log: Any) -> dict[str, Any]:
    import aiohttp

    out: dict[str, Any] = {}
    env = cluster_env()
    kube = Kube(env)
    await kube.run("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    await kube.run(
        "wait", "--for=condition=Established", "crd/tasks.kubetasks.dev", "crd/kopfpeerings.kopf.dev"
    )
    ns = f"kbench-{uuid.uuid4().hex[:8]}"
    pod = "kbench-op-0"
    await kube.run("create", "namespace", ns)
    try:
        peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "default"}}
        await kube.apply(ns, [peering])
        pod_obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod, "labels": {"app.kubernetes.io/name": "kubetasks-bench"}},
            "spec": {"containers": [{"name": "kubetasks", "image": "kubetasks:bench"}]},
        }
        await kube.apply(ns, [pod_obj])
        async with dbs.fresh("k8s") as (_name, url):
            await systems.Kubetasks().setup(url)
            op_env = {
                "KUBECONFIG": kube.kubeconfig,
                "KUBETASKS_DATABASE_URL": url,
                "KUBETASKS_POD_ID": pod,
                "POD_NAME": pod,
                "POD_ID": pod,  # kopf's peering identity
                "POD_NAMESPACE": ns,
                "KUBETASKS_WATCH_NAMESPACES": ns,
                "KUBETASKS_POD_SELECTOR": SELECTOR,
                "KUBETASKS_PEERING_LIFETIME": "6",
                "KUBETASKS_HEARTBEAT_INTERVAL": "1",
                "KUBETASKS_LEASE_TTL": "10",
                "KUBETASKS_CONCURRENCY": str(concurrency),
                "KUBETASKS_SHUTDOWN_GRACE": "5",
            }
            argv = launcher("kubetasks", "run", "--app", "bench.apps.kt_app:app", "--log-level", "warning")
            op = Workers([argv], [op_env], "k8s-operator")
            out["operator_argv"] = argv[2:]
            conn = await asyncpg.connect(url)
            try:
                async with running(op), aiohttp.ClientSession() as http:
                    op.go()
                    end = time.monotonic() + 60
                    while not await conn.fetchval(
                        "SELECT count(*) FROM kubetasks.workers WHERE status = 'active' AND pod_id = $1", pod
                    ):
                        op.check_alive()
                        if time.monotonic() > end:
                            raise RuntimeError("the operator did not register within 60 s")
                        await asyncio.sleep(0.1)
                    await asyncio.sleep(2.0)  # its watch is open
                    items = [task_manifest(f"t-{i:05d}") for i in range(n)]
                    url_tasks = f"{kube.server}/apis/kubetasks.dev/v1alpha1/namespaces/{ns}/tasks"

                    async def phases() -> list[str]:
                        async with http.get(url_tasks, ssl=kube.ssl) as resp:
                            body = await resp.json()
                        return [(i.get("status") or {}).get("phase", "") for i in body.get("items", [])]

                    log(f"k8s: applying {n} Task manifests in one kubectl apply")
                    t0_wall = time.time()
                    t0 = time.monotonic()
                    apply_task = asyncio.create_task(
                        kube.apply(
                            ns,
                            items,
                        )
                    )
                    timeout = 120 + n / 5
                    seen_all = None
                    while True:
                        await asyncio.sleep(0.1)
                        if apply_task.done() and "apply_s" not in out:
                            apply_task.result()
                            out["apply_s"] = round(time.monotonic() - t0, 3)
                        ph = await phases()
                        if seen_all is None and len(ph) == n:
                            seen_all = round(time.monotonic() - t0, 3)
                        if ph.count("Succeeded") == n:
                            break
                        op.check_alive()
                        if time.monotonic() - t0 > timeout:
                            counts = {p: ph.count(p) for p in set(ph)}
                            raise RuntimeError(f"not all Succeeded after {timeout:.0f}s: {counts}")
                    took = time.monotonic() - t0
                    await apply_task
                    out["apply_s"] = out.get("apply_s", round(time.monotonic() - t0, 3))
                    out["all_objects_listed_s"] = seen_all
                    r = await conn.fetchrow(
                        "SELECT count(*) FILTER (WHERE status = 'succeeded') AS done,"
                        " min(created_at) AS first_in,"
                        " max(finished_at) AS last_done, count(*) FILTER (WHERE attempt > 1) AS reruns"
                        " FROM kubetasks.tasks WHERE cr_uid IS NOT NULL"
                    )
                    errors = op.errors_in_logs()
            finally:
                await conn.close()
    finally:
        try:
            await kube.run("delete", "tasks", "--all", "-n", ns, "--wait=false")
            await kube.run("delete", "namespace", ns, "--wait=false")
        except Exception as exc:  # the cluster may be stopped right after anyway
            out["cleanup_error"] = str(exc)[:500]
    assert r is not None
    out["apply_to_all_succeeded_s"] = round(took, 3)
    out["tasks_per_s"] = round(n / took, 1)
    out["db_rows_succeeded"] = int(r["done"])
    out["reruns"] = int(r["reruns"])
    if r["first_in"] is not None:
        out["apply_to_first_row_s"] = round(r["first_in"].timestamp() - t0_wall, 3)
    if r["last_done"] is not None:
        out["apply_to_all_succeeded_in_db_s"] = round(r["last_done"].timestamp() - t0_wall, 3)
        out["status_lag_after_db_s"] = round(took - out["apply_to_all_succeeded_in_db_s"], 3)
    if errors:
        out["log_errors"] = errors
    log(
        f"k8s: {n} Task objects, apply -> all Succeeded {took:.2f} s = {out['tasks_per_s']:,.0f} Tasks/s "
        f"(kubectl apply {out['apply_s']:.2f} s; all succeeded in the database after "
        f"{out.get('apply_to_all_succeeded_in_db_s')} s)"
    )
    return out
