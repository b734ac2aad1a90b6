"""`make demo`: kubetasks as real pods on a local node, start to finish.

1. PostgreSQL and Redis under .run/ (installed from Debian's packages if missing);
2. a local Kubernetes control plane and the machine's local node
   (`e2e/cluster/up.sh --node`): etcd, kube-apiserver, kube-controller-manager,
   kubelet, kube-scheduler and crictl built once from their Go modules into
   ~/.cache/kubetasks; containerd, runc, the CNI plugins and debootstrap from
   Debian's packages; the kubetasks image built without Docker
   (e2e/cluster/image.py) and imported into the node. The first run builds all
   of it (progress shown as it goes); later runs reuse it;
3. the Helm chart installed into the node (`helm install --wait`), the database
   and Redis URLs in a Secret, two pods running examples/app.py;
4. `kubectl apply -f examples/tasks/`, then `kubectl get tasks -o wide` until
   every Task has ended (the POD column names the pod that ran it);
5. `kubectl get pods -o wide` and each pod's metrics URL, with a few figures;
6. `kubetasks dashboard` on this machine, on the demo's database (its log in
   .run/dashboard.log): its URL, with a one-time login token;
7. how to go on by hand. Everything keeps running until `make down`.

Exit code 0 only if every Task succeeded.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import asyncpg
from rich.console import Console

from kubetasks import devenv
from kubetasks.store import migrate

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "kubetasks-demo"
RELEASE = "kubetasks"
console = Console(soft_wrap=True)  # tables stay whole when the output is a pipe


def step(n: int, text: str) -> None:
    console.print(f"[bold cyan]{n}.[/bold cyan] {text}")


def cluster_env() -> dict[str, str]:
    out = subprocess.run(
        ["bash", "-c", f". {ROOT}/e2e/cluster/env.sh && env -0"], capture_output=True, text=True, check=True
    ).stdout
    return dict(item.split("=", 1) for item in out.split("\0") if item.startswith("KUBETASKS_"))


class Tools:
    def __init__(self, env: dict[str, str]) -> None:
        self.kubectl_bin, self.helm_bin = env["KUBETASKS_KUBECTL"], env["KUBETASKS_HELM"]
        self.kubeconfig = env["KUBETASKS_KUBECONFIG"]

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        res = subprocess.run(
            [self.kubectl_bin, "--kubeconfig", self.kubeconfig, *args],
            capture_output=True,
            text=True,
            input=input,
        )
        if check and res.returncode:
            raise SystemExit(f"kubectl {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout

    def helm(self, *args: str, check: bool = True) -> str:
        res = subprocess.run(
            [self.helm_bin, "--kubeconfig", self.kubeconfig, *args], capture_output=True, text=True
        )
        if check and res.returncode:
            raise SystemExit(f"helm {' '.join(args[:2])} failed: {res.stderr.strip()}")
        return res.stdout


async def fresh_database(state: devenv.DevState, name: str) -> str:
    conn = await asyncpg.connect(state.admin_url())
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    url = state.admin_url(name)
    await migrate(url)
    return url


def previous_demo_removed(t: Tools) -> None:
    """A release from an earlier `make demo`: its Tasks first (its pods drop their finalizers), then it."""
    if RELEASE in t.helm("list", "-n", NAMESPACE, "-q", check=False).split():
        t.kubectl("delete", "tasks", "--all", "-n", NAMESPACE, "--timeout=60s", check=False)
        t.helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout", "2m")
    if t.kubectl("get", "namespace", NAMESPACE, check=False).strip() == "":
        t.kubectl("create", "namespace", NAMESPACE)
    deadline = time.monotonic() + 60  # pods need the namespace's `default` ServiceAccount
    while t.kubectl("get", "serviceaccount", "default", "-n", NAMESPACE, check=False).strip() == "":
        if time.monotonic() > deadline:
            raise SystemExit(f"no ServiceAccount default in {NAMESPACE}")
        time.sleep(0.2)


def secret(t: Tools, db_url: str, redis_url: str) -> None:
    manifest = t.kubectl(
        "create", "secret", "generic", "kubetasks-demo-urls", "-n", NAMESPACE,
        f"--from-literal=database={db_url}", f"--from-literal=redis={redis_url}",
        "--dry-run=client", "-o", "json",
    )  # fmt: skip
    t.kubectl("apply", "-f", "-", input=manifest)


def metrics_lines(url: str) -> list[str]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    wanted = (
        "kubetasks_tasks_succeeded_total",
        "kubetasks_tasks_retried_total",
        "kubetasks_lease_renewals_total",
    )
    return [ln for ln in text.splitlines() if ln.startswith(wanted)][:6]


DASHBOARD_PID = ROOT / ".run" / "dashboard.pid"
DASHBOARD_LOG = ROOT / ".run" / "dashboard.log"


def dashboard_stopped() -> None:
    """The dashboard an earlier `make demo` left running (`make down` does the same)."""
    try:
        pid = int(DASHBOARD_PID.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        DASHBOARD_PID.unlink(missing_ok=True)
        return
    if b"dashboard" in cmdline:  # the pid is ours, not one the system gave out again
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    DASHBOARD_PID.unlink(missing_ok=True)


def dashboard_started(db_url: str) -> str:
    """`kubetasks dashboard` on a free loopback port, detached so it outlives the demo; its URL
    with a login token (the page drops it from the address bar at once)."""
    dashboard_stopped()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_urlsafe(24)
    env = {
        **os.environ, "KUBETASKS_DATABASE_URL": db_url, "KUBETASKS_DASHBOARD_TOKEN": token,
        "KUBETASKS_DASHBOARD_WRITES": "true", "KUBETASKS_POD_ID": "demo-dashboard",
    }  # fmt: skip
    log = DASHBOARD_LOG.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetasks", "dashboard", "--port", str(port)],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    DASHBOARD_PID.write_text(f"{proc.pid}\n")
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "healthz", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the dashboard did not start; see {DASHBOARD_LOG}") from None
            time.sleep(0.2)
    return f"{url}#token={token}"


def main() -> int:
    t_start = time.monotonic()
    step(1, "PostgreSQL and Redis under .run/")
    state = devenv.up()
    url = asyncio.run(fresh_database(state, "kubetasks_demo"))
    console.print(f"   {url}\n   {state.redis_url}")

    step(
        2,
        "a local Kubernetes control plane and this machine's local node (kubelet, containerd, runc),\n"
        "   and the kubetasks image built without Docker; the first run builds them (progress below)",
    )
    t0 = time.monotonic()
    if subprocess.run(["bash", str(ROOT / "e2e/cluster/up.sh"), "--node"]).returncode:
        raise SystemExit("the control plane or the node did not start; see the messages above")
    if subprocess.run(["bash", str(ROOT / "e2e/cluster/build.sh"), "helm"]).returncode:
        raise SystemExit("could not build helm; run e2e/cluster/build.sh helm to see why")
    env = cluster_env()
    t = Tools(env)
    console.print(f"   ready in {time.monotonic() - t0:.0f}s; KUBECONFIG={t.kubeconfig}")

    step(3, f"helm install {RELEASE} charts/kubetasks into namespace {NAMESPACE} (2 pods on the node)")
    t0 = time.monotonic()
    previous_demo_removed(t)
    secret(t, url, state.redis_url)
    t.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    t.kubectl(
        "wait", "--for=condition=Established", "crd/tasks.kubetasks.dev", "crd/cronjoblocks.kubetasks.dev"
    )
    t.helm(
        "install", RELEASE, str(ROOT / "charts/kubetasks"), "-n", NAMESPACE,
        "-f", str(ROOT / ".run/node-values.yaml"), "--set", "app=examples.app:app",
        "--set", "database.existingSecret=kubetasks-demo-urls", "--set", "database.secretKey=database",
        "--set", "redis.existingSecret=kubetasks-demo-urls", "--set", "redis.secretKey=redis",
        "--set", "crds.enabled=false", "--wait", "--timeout", "5m",
    )  # fmt: skip
    t.kubectl(
        "wait", "--for=condition=Ready", "pod", "-l", f"app.kubernetes.io/instance={RELEASE}",
        "-n", NAMESPACE, "--timeout=120s",
    )  # fmt: skip
    console.print(f"   installed, pods ready in {time.monotonic() - t0:.0f}s")

    step(4, f"kubectl apply -n {NAMESPACE} -f examples/tasks/")
    console.print(t.kubectl("apply", "-n", NAMESPACE, "-f", str(ROOT / "examples/tasks")).strip())
    deadline = time.monotonic() + 90
    last = ""
    while True:
        table = t.kubectl("get", "tasks", "-n", NAMESPACE, "-o", "wide")
        if table != last:
            console.print(f"\n$ kubectl get tasks -n {NAMESPACE} -o wide\n{table.rstrip()}", highlight=False)
            last = table
        items = json.loads(t.kubectl("get", "tasks", "-n", NAMESPACE, "-o", "json"))["items"]
        if items and all(
            (i.get("status") or {}).get("phase") in ("Succeeded", "Failed", "Cancelled") for i in items
        ):
            break
        if time.monotonic() > deadline:
            raise SystemExit(
                f"Tasks did not finish within 90 s; see "
                f"`kubectl logs -n {NAMESPACE} -l app.kubernetes.io/instance={RELEASE}`"
            )
        time.sleep(0.5)
    ok = sum((i.get("status") or {}).get("phase") == "Succeeded" for i in items)
    ran_in = sorted({(i.get("status") or {}).get("pod", "") for i in items})

    step(5, "the pods, and where each serves /metrics")
    console.print(
        f"$ kubectl get pods -n {NAMESPACE} -o wide\n"
        + t.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide").rstrip(),
        highlight=False,
    )
    pods = t.kubectl(
        "get", "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name"
    ).split()
    for pod in pods:
        murl = t.kubectl("exec", "-n", NAMESPACE, pod, "--", "cat", "/tmp/kubetasks-metrics").strip()
        console.print(f"   {pod.split('/', 1)[1]}: {murl}/metrics", highlight=False)
        for line in metrics_lines(murl):
            console.print(f"      {line}", highlight=False)

    step(6, "the dashboard (kubetasks dashboard, on this machine; writes enabled)")
    console.print(f"   {dashboard_started(url)}", highlight=False)
    console.print(
        f"   its log: {DASHBOARD_LOG}; its API: /api/v1, described at /api/v1/openapi.json", highlight=False
    )

    step(7, f"summary: {ok} of {len(items)} Tasks Succeeded, run by {', '.join(ran_in)}; "
         f"make demo took {time.monotonic() - t_start:.0f}s")  # fmt: skip
    console.print(
        "\n[bold]Go on by hand[/bold] (everything keeps running until `make down`):\n"
        f"  export KUBECONFIG={t.kubeconfig}\n"
        f"  alias kubectl={t.kubectl_bin} helm={t.helm_bin}\n"
        f"  kubectl -n {NAMESPACE} get pods,tasks\n"
        f"  kubectl -n {NAMESPACE} delete task resize-1 && kubectl -n {NAMESPACE} apply -f examples/tasks/\n"
        f"  kubectl -n {NAMESPACE} logs -l app.kubernetes.io/instance={RELEASE} -f\n"
        f"  kubectl -n {NAMESPACE} delete pod <pod>   # its running tasks are handed back\n"
        "  make down   # stops the dashboard, the node, the control plane, PostgreSQL and Redis",
        highlight=False,
    )
    return 0 if ok == len(items) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
