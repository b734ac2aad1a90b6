"""`make demo`: the main job on a local environment, start to finish.

1. PostgreSQL and Redis under .run/ (installed from Debian's packages if missing);
2. a local Kubernetes control plane (etcd + kube-apiserver, built once from
   their Go modules into ~/.cache/kubetasks -- minutes the first time);
3. the CRDs applied, and `kubetasks run --app examples.app:app` started in the
   background, as a pod would run it;
4. `kubectl apply -f examples/tasks/`, then `kubectl get tasks` until every
   Task has ended;
5. a summary, a graceful stop (SIGTERM), and how to go on by hand.

Exit code 0 only if every Task succeeded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
from rich.console import Console

from kubetasks import devenv
from kubetasks.store import migrate

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "kubetasks-demo"
console = Console()


def step(n: int, text: str) -> None:
    console.print(f"[bold cyan]{n}.[/bold cyan] {text}")


def cluster_env() -> tuple[str, str]:
    out = subprocess.run(
        [
            "bash",
            "-c",
            f". {ROOT}/e2e/cluster/env.sh && echo $KUBETASKS_KUBECTL && echo $KUBETASKS_KUBECONFIG",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], out[1]


def kubectl(kubectl_bin: str, kubeconfig: str, *args: str, check: bool = True) -> str:
    res = subprocess.run([kubectl_bin, "--kubeconfig", kubeconfig, *args], capture_output=True, text=True)
    if check and res.returncode:
        raise SystemExit(f"kubectl {' '.join(args)} failed: {res.stderr.strip()}")
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


def main() -> int:
    step(1, "PostgreSQL and Redis under .run/")
    state = devenv.up()
    url = asyncio.run(fresh_database(state, "kubetasks_demo"))
    console.print(f"   {url}\n   {state.redis_url}")

    step(2, "a local Kubernetes control plane (built from Go modules on first use; progress below)")
    t0 = time.monotonic()
    if subprocess.run(["bash", str(ROOT / "e2e/cluster/up.sh")]).returncode:
        raise SystemExit("the control plane did not start; see .run/cluster/*.log")
    kc, kubeconfig = cluster_env()
    console.print(f"   ready in {time.monotonic() - t0:.0f}s; KUBECONFIG={kubeconfig}")

    step(3, "CRDs, a namespace, and `kubetasks run --app examples.app:app` in the background")
    kubectl(kc, kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl(kc, kubeconfig, "wait", "--for=condition=Established", "crd/tasks.kubetasks.dev")
    kubectl(
        kc, kubeconfig, "delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true", "--timeout=60s"
    )
    kubectl(kc, kubeconfig, "create", "namespace", NAMESPACE)
    log_path = ROOT / ".run" / "demo-kubetasks.log"
    env = dict(
        os.environ,
        KUBECONFIG=kubeconfig,
        KUBETASKS_DATABASE_URL=url,
        KUBETASKS_REDIS_URL=state.redis_url,
        KUBETASKS_POD_ID="demo-pod",
        KUBETASKS_WATCH_NAMESPACES=NAMESPACE,
        PYTHONPATH=str(ROOT),
    )
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetasks", "run", "--app", "examples.app:app", "--concurrency", "8"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        time.sleep(2.0)
        if proc.poll() is not None:
            raise SystemExit(f"kubetasks run exited (code {proc.returncode}); see {log_path}")
        step(4, f"kubectl apply -n {NAMESPACE} -f examples/tasks/")
        console.print(
            kubectl(kc, kubeconfig, "apply", "-n", NAMESPACE, "-f", str(ROOT / "examples/tasks")).strip()
        )
        deadline = time.monotonic() + 90
        last = ""
        while True:
            table = kubectl(kc, kubeconfig, "get", "tasks", "-n", NAMESPACE, "-o", "wide")
            if table != last:
                console.print(
                    f"\n$ kubectl get tasks -n {NAMESPACE} -o wide\n{table.rstrip()}", highlight=False
                )
                last = table
            items = json.loads(kubectl(kc, kubeconfig, "get", "tasks", "-n", NAMESPACE, "-o", "json"))[
                "items"
            ]
            done = [
                (i.get("status") or {}).get("phase") in ("Succeeded", "Failed", "Cancelled") for i in items
            ]
            if items and all(done):
                break
            if proc.poll() is not None:
                raise SystemExit(f"kubetasks run exited (code {proc.returncode}); see {log_path}")
            if time.monotonic() > deadline:
                raise SystemExit(f"Tasks did not finish within 90 s; see {log_path}")
            time.sleep(0.5)
        ok = sum((i.get("status") or {}).get("phase") == "Succeeded" for i in items)
        retries = sum(max(0, ((i.get("status") or {}).get("attempts") or 1) - 1) for i in items)
        step(5, f"summary: {ok} of {len(items)} Tasks Succeeded ({retries} retries along the way)")
        console.print(
            kubectl(kc, kubeconfig, "wait", "--for=condition=Succeeded", "task", "--all", "-n", NAMESPACE)
        )
        return 0 if ok == len(items) else 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        console.print(f"   kubetasks run stopped gracefully (exit code {code}); its log: {log_path}")
        console.print(
            "\n[bold]Go on by hand:[/bold]\n"
            f"  export KUBECONFIG={kubeconfig}\n"
            f"  eval $(.venv/bin/kubetasks dev env)   # KUBETASKS_DATABASE_URL for the default database\n"
            f"  alias kubectl={kc}\n"
            "  .venv/bin/kubetasks run --app examples.app:app &\n"
            "  kubectl apply -f examples/tasks/ && kubectl get tasks -w\n"
            "  make down   # stops PostgreSQL, Redis and the control plane",
            highlight=False,
        )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
