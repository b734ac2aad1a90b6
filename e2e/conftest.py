"""Fixtures for the e2e suites: the local control plane of e2e/cluster/.

``cluster`` (session) runs ``e2e/cluster/up.sh`` -- idempotent: it reuses a
healthy cluster -- and gives the kubeconfig and the tool paths (kubectl,
helm, kubeconform) from ``e2e/cluster/env.sh``. If the cluster cannot start
the tests fail with up.sh's own output; nothing is skipped. A cluster this
session started is stopped at the end (set KUBETASKS_KEEP_CLUSTER=1 to keep
it); one that was already running is left alone.

``crds`` applies crds/ once; ``namespace`` gives a test a fresh namespace and
deletes its Tasks, CronJobLocks and itself afterwards; ``db`` a fresh
database migrated from the session's template (PostgreSQL from `kubetasks dev`).

``scenarios`` records what a fault scenario measured (time to converge after
the outage, objects lost, statuses wrong); the session ends with a table of
them (also written to .run/e2e-scenarios.json).

The ServiceAccount admission plugin is on, so no Pod is admitted in a
namespace before the controller manager has made its ``default``
ServiceAccount: ``wait_default_service_account`` waits for it.

Pods the suites create by hand carry ``NO_NODE`` (a nodeSelector that no node
matches): when the machine's local node runs, it never tries to run them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from tests.conftest import create_db, dev_state, drop_db, template_db  # noqa: F401 - fixtures
from tests.support import ROOT, ScriptFailed, cluster_env, cluster_script

from kubetasks import devenv


@dataclass(frozen=True)
class Cluster:
    kubeconfig: str
    kubectl: str
    helm: str
    kubeconform: str
    env: dict[str, str]

    def run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """kubectl against the local cluster (as its admin)."""
        return _run([self.kubectl, "--kubeconfig", self.kubeconfig, *args], input, check, timeout)

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)

    def helm_run(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return _run([self.helm, "--kubeconfig", self.kubeconfig, *args], None, check, timeout)


# Timings and findings of the local-node tests, printed at the end of the session.
NODE_REPORT: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    print_scenarios(terminalreporter)
    if NODE_REPORT:
        terminalreporter.section("local node: timings and findings")
        for line in NODE_REPORT:
            terminalreporter.write_line(line)


# A nodeSelector no node has: hand-made Pods stay Pending even when the local node runs.
NO_NODE = {"kubetasks.dev/no-node": "hand-made-pod"}


def wait_default_service_account(cluster: Cluster, namespace: str, timeout: float = 60) -> None:
    """Wait until the token controller has made the namespace's `default` ServiceAccount."""
    end = time.monotonic() + timeout
    while cluster.run("get", "serviceaccount", "default", "-n", namespace, check=False).returncode != 0:
        if time.monotonic() > end:
            raise AssertionError(f"no ServiceAccount default in {namespace} after {timeout:.0f}s")
        time.sleep(0.1)


def _run(cmd: list[str], input: str | None, check: bool, timeout: float) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    try:
        up = cluster_script("up.sh")
        cluster_script("build.sh", "helm", "kubeconform")
    except ScriptFailed as exc:
        pytest.fail(f"the local control plane or its tools did not start: {exc}", pytrace=False)
    started_here = "already running" not in up.stdout
    env = cluster_env()
    yield Cluster(
        kubeconfig=env["KUBETASKS_KUBECONFIG"],
        kubectl=env["KUBETASKS_KUBECTL"],
        helm=env["KUBETASKS_HELM"],
        kubeconform=env["KUBETASKS_KUBECONFORM"],
        env=env,
    )
    if started_here and os.environ.get("KUBETASKS_KEEP_CLUSTER") != "1":
        cluster_script("down.sh", timeout=120, check=False)


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> Cluster:
    cluster.run("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.run("wait", "--for=condition=Established", "crd/tasks.kubetasks.dev", "crd/kopfpeerings.kopf.dev")
    return cluster


@pytest.fixture
def namespace(crds: Cluster) -> Iterator[str]:
    """A fresh namespace; its objects and itself deleted afterwards."""
    cluster = crds
    ns = f"e2e-{uuid.uuid4().hex[:8]}"
    cluster.run("create", "namespace", ns)
    wait_default_service_account(cluster, ns)
    yield ns
    # No finalizers are held: nothing can hang here. A cluster-wide operator of a
    # later test must not find this test's objects.
    cluster.run("delete", "tasks,cronjoblocks", "--all", "-n", ns, "--wait=false", check=False)
    deadline = time.monotonic() + 30
    while cluster.run("get", "tasks,cronjoblocks", "-n", ns, "-o", "name", check=False).stdout.strip():
        assert time.monotonic() < deadline, f"objects of {ns} were not deleted within 30 s"
        time.sleep(0.2)
    cluster.run("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture
async def db(dev_state: devenv.DevState, template_db: str) -> AsyncIterator[str]:  # noqa: F811
    name = await create_db(dev_state, template_db)
    yield dev_state.admin_url(name)
    await drop_db(dev_state, name)


SCENARIOS: list[dict[str, Any]] = []


@pytest.fixture
def scenarios() -> list[dict[str, Any]]:
    """Append a dict per measured scenario: scenario, converge_s, lost, wrong, note."""
    return SCENARIOS


def print_scenarios(terminalreporter: Any) -> None:
    if not SCENARIOS:
        return
    out = ROOT / ".run" / "e2e-scenarios.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(SCENARIOS, indent=2))
    w = terminalreporter
    w.section("Kubernetes fault scenarios (measured)")
    w.write_line(f"{'scenario':<60} {'converged':>10} {'lost':>5} {'wrong':>6}  note")
    for r in SCENARIOS:
        conv = "-" if r.get("converge_s") is None else f"{r['converge_s']:.1f}s"
        lost, wrong, note = r.get("lost", 0), r.get("wrong", 0), r.get("note", "")
        w.write_line(f"{r['scenario']:<60} {conv:>10} {lost:>5} {wrong:>6}  {note}")
    w.write_line(f"(also in {out})")
