"""The Helm chart against the real local kube-apiserver.

`helm install` (no --wait: no kubelet runs) into a fresh namespace, then what
the release created, what its ServiceAccount may and may not do (asked with
`kubectl auth can-i --as=...` and proven with a real token), `helm upgrade`,
and `helm uninstall` leaving the CRDs and the users' Tasks in place.

The tests of TestNamespacedRelease share one release and run in file order
(install -> RBAC -> upgrade -> uninstall). Namespaces are deleted afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from e2e.conftest import Cluster

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kubetasks"
OUR_CRDS = ["tasks.kubetasks.dev", "cronjoblocks.kubetasks.dev"]
KOPF_CRDS = ["kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"]
APP = "examples.app:app"
# The first test may start (and on a fresh machine build) the control plane.
pytestmark = pytest.mark.timeout(1800)


@dataclass
class Release:
    name: str
    namespace: str
    sa: str

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.sa}"


def adopt_crds(cluster: Cluster, release: str, namespace: str) -> None:
    """CRDs applied earlier with kubectl (or left by an uninstalled release,
    crds.keep) are handed to this release, as Helm documents: ownership
    annotations plus the managed-by label."""
    for crd in OUR_CRDS:
        if cluster.run("get", "crd", crd, check=False).returncode != 0:
            continue
        cluster.run(
            "annotate",
            "--overwrite",
            "crd",
            crd,
            f"meta.helm.sh/release-name={release}",
            f"meta.helm.sh/release-namespace={namespace}",
        )
        cluster.run("label", "--overwrite", "crd", crd, "app.kubernetes.io/managed-by=Helm")


def can_i(cluster: Cluster, user: str, verb: str, resource: str, namespace: str | None) -> bool:
    """``resource`` is a plural, ``plural/subresource`` (tasks/status) or ``plural:name``."""
    args = ["auth", "can-i", verb, resource, f"--as={user}"]
    if ":" in resource:  # one object by name
        args = ["auth", "can-i", verb, resource.replace(":", "/", 1), f"--as={user}"]
    elif "/" in resource:  # tasks/status -> --subresource
        res, sub = resource.split("/", 1)
        args = ["auth", "can-i", verb, res, f"--subresource={sub}", f"--as={user}"]
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    out = cluster.run(*args, check=False)
    answer = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert answer in ("yes", "no"), f"kubectl {' '.join(args)}: {out.stdout} {out.stderr}"
    return answer == "yes"


def check_matrix(
    cluster: Cluster, user: str, rows: list[tuple[str, str, str | None, bool]], title: str
) -> None:
    """Ask every (verb, resource, namespace) and print the table; then assert."""
    got = [(v, r, ns, want, can_i(cluster, user, v, r, ns)) for v, r, ns, want in rows]
    print(f"\nkubectl auth can-i --as={user}   ({title})")
    print(f"  {'verb':<8} {'resource':<34} {'namespace':<22} {'want':<5} got")
    for v, r, ns, want, ok in got:
        print(
            f"  {v:<8} {r:<34} {ns or '(all)':<22} {'yes' if want else 'no':<5} "
            f"{'yes' if ok else 'no'}{'' if ok == want else '   <-- WRONG'}"
        )
    wrong = [(v, r, ns) for v, r, ns, want, ok in got if ok != want]
    assert not wrong, f"RBAC differs from the expected matrix: {wrong}"


def token_kubeconfig(cluster: Cluster, rel: Release, path: Path) -> Path:
    """A kubeconfig that authenticates as the release's ServiceAccount (a bound token)."""
    token = cluster.run("create", "token", rel.sa, "-n", rel.namespace, "--duration=10m").stdout.strip()
    raw = cluster.json("config", "view", "--raw", "--minify")
    server = raw["clusters"][0]["cluster"]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": server}],
                "users": [{"name": "sa", "user": {"token": token}}],
                "contexts": [
                    {"name": "sa", "context": {"cluster": "local", "user": "sa", "namespace": rel.namespace}}
                ],
                "current-context": "sa",
            }
        )
    )
    return path


def as_sa(
    cluster: Cluster, kubeconfig: Path, *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [cluster.kubectl, "--kubeconfig", str(kubeconfig), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )


def operator_call(kubeconfig: Path, code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run one call of the operator's own client (kubetasks.k8s.kube) with ``kubeconfig``."""
    prog = f"import asyncio, sys\nfrom kubetasks.k8s.kube import Kube\n{code}\nprint('ok')"
    return subprocess.run(
        [sys.executable, "-c", prog, *argv],
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def task(name: str) -> str:
    return json.dumps(
        {
            "apiVersion": "kubetasks.dev/v1alpha1",
            "kind": "Task",
            "metadata": {"name": name},
            "spec": {"handler": "hello", "payload": {"n": 1}},
        }
    )


def install(cluster: Cluster, rel: Release, *sets: str) -> subprocess.CompletedProcess[str]:
    args = ["install", rel.name, str(CHART), "-n", rel.namespace, "--set", f"app={APP}"]
    for s in sets:
        args += ["--set", s]
    return cluster.helm_run(*args)


@pytest.fixture(scope="module")
def ns_release(cluster: Cluster) -> Iterator[Release]:
    """A release with default values (namespaced RBAC) and its database URL in an existing Secret."""
    ns = f"e2e-chart-{uuid.uuid4().hex[:6]}"
    rel = Release(name="kt", namespace=ns, sa="kt-kubetasks")
    cluster.run("create", "namespace", ns)
    # Pods of the Deployment must pass the `restricted` Pod Security Standard.
    cluster.run(
        "label",
        "namespace",
        ns,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/warn=restricted",
    )
    cluster.run(
        "create",
        "secret",
        "generic",
        "kt-db",
        "-n",
        ns,
        "--from-literal=url=postgresql://kubetasks:pw@db.example:5432/kubetasks",
    )
    adopt_crds(cluster, rel.name, ns)
    try:
        out = install(cluster, rel, "database.existingSecret=kt-db")
        assert "kubectl apply" in out.stdout and "get tasks" in out.stdout, out.stdout  # NOTES.txt
        yield rel
    finally:
        cluster.helm_run("uninstall", rel.name, "-n", ns, check=False)
        cluster.run("delete", "tasks", "--all", "-n", ns, "--wait=false", check=False)
        cluster.run("delete", "namespace", ns, "--wait=false", check=False)


class TestNamespacedRelease:
    def test_install_creates_the_expected_objects(self, cluster: Cluster, ns_release: Release) -> None:
        """The release holds the Deployment, ServiceAccount, RBAC, Service, PDB, peering object and CRDs."""
        ns, name = ns_release.namespace, "kt-kubetasks"
        manifest = cluster.helm_run("get", "manifest", ns_release.name, "-n", ns).stdout
        kinds = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(manifest) if d)
        print("\nrelease objects:", *(f"{k}/{n}" for k, n in kinds), sep="\n  ")
        assert kinds == sorted(
            [
                ("CustomResourceDefinition", "cronjoblocks.kubetasks.dev"),
                ("CustomResourceDefinition", "tasks.kubetasks.dev"),
                ("Deployment", name),
                ("KopfPeering", "default"),
                ("PodDisruptionBudget", name),
                ("Role", name),
                ("Role", f"{name}-pods"),
                ("RoleBinding", name),
                ("RoleBinding", f"{name}-pods"),
                ("Service", name),
                ("ServiceAccount", name),
            ]
        )
        for kind, obj in kinds:  # every one of them exists in the cluster
            cluster.run(
                "get", kind.lower(), obj, *([] if kind.startswith(("Cluster", "Custom")) else ["-n", ns])
            )
        for crd in OUR_CRDS + KOPF_CRDS:
            cluster.run("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=30s")
        dep = cluster.json("get", "deployment", name, "-n", ns)
        assert dep["spec"]["replicas"] == 2
        pod = dep["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == name
        assert pod["terminationGracePeriodSeconds"] == 40
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["KUBETASKS_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "kt-db", "key": "url"}
        assert env["KUBETASKS_WATCH_NAMESPACES"]["value"] == ns
        assert cluster.json("get", "pdb", name, "-n", ns)["spec"]["minAvailable"] == 1

    def test_pod_template_is_admitted_under_restricted_pod_security(
        self, cluster: Cluster, ns_release: Release
    ) -> None:
        """A Pod from the Deployment's template passes `restricted` Pod Security (server dry run)."""
        ns = ns_release.namespace
        tpl = cluster.json("get", "deployment", "kt-kubetasks", "-n", ns)["spec"]["template"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "kt-template-check", "labels": tpl["metadata"]["labels"]},
            "spec": tpl["spec"],
        }
        out = cluster.run("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(pod))
        assert "Warning" not in out.stderr, out.stderr

    def test_service_account_rbac_matrix(self, cluster: Cluster, ns_release: Release) -> None:
        """The ServiceAccount can do what kubetasks needs in its namespace, and nothing around it."""
        ns = ns_release.namespace
        check_matrix(
            cluster,
            ns_release.user,
            [
                # what the code does: kopf watches, the leader's listings, TTL deletes,
                # the old finalizer's removal, status, Events, peering, pod recovery
                ("list", "tasks", ns, True),
                ("watch", "tasks", ns, True),
                ("list", "cronjoblocks", ns, True),
                ("patch", "tasks", ns, True),
                ("delete", "tasks", ns, True),
                ("patch", "tasks/status", ns, True),
                ("patch", "cronjoblocks/status", ns, True),
                ("create", "events", ns, True),
                ("watch", "pods", ns, True),
                ("list", "pods", ns, True),
                ("patch", "kopfpeerings", ns, True),
                # and nothing else
                ("get", "pods", ns, False),
                ("list", "pods", "default", False),
                ("watch", "pods", None, False),
                ("watch", "customresourcedefinitions", None, False),
                ("list", "namespaces", None, False),
                ("get", "secrets", ns, False),
                ("list", "secrets", ns, False),
                ("delete", "pods", ns, False),
                ("patch", "pods", ns, False),
                ("patch", "events", ns, False),
                ("create", "deployments", ns, False),
                ("create", "tasks", ns, False),
                ("update", "tasks", ns, False),
                ("delete", "cronjoblocks", ns, False),
                ("patch", "cronjoblocks", ns, False),
                ("list", "tasks", "default", False),
                ("list", "tasks", None, False),
                ("patch", "clusterkopfpeerings", None, False),
                ("create", "validatingwebhookconfigurations", None, False),
                ("patch", "validatingwebhookconfigurations", None, False),
            ],
            "namespaced release",
        )

    def test_a_token_of_the_service_account_suffices(
        self, cluster: Cluster, ns_release: Release, tmp_path: Path
    ) -> None:
        """With the ServiceAccount's own token: list/patch Tasks, post Events, patch peering; no Secrets."""
        ns = ns_release.namespace
        cluster.run("apply", "-n", ns, "-f", "-", input=task("rbac-probe"))  # as the admin
        kc = token_kubeconfig(cluster, ns_release, tmp_path / "sa.kubeconfig")
        who = as_sa(cluster, kc, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
        assert who.stdout == ns_release.user, who.stderr
        steps = {
            "list tasks": as_sa(cluster, kc, "get", "tasks", "-o", "name"),
            # as the status writer does it (kubectl would GET the status first, which it never does)
            "patch task status": operator_call(
                kc,
                "asyncio.run(Kube().patch_status('tasks', sys.argv[1], 'rbac-probe', sys.argv[2],"
                " {'phase': 'Running', 'attempts': 1}))",
                ns,
                cluster.json("get", "task", "rbac-probe", "-n", ns)["metadata"]["uid"],
            ),
            "patch task metadata": as_sa(
                cluster,
                kc,
                "patch",
                "task",
                "rbac-probe",
                "--type=merge",
                "-p",
                '{"metadata":{"annotations":{"kubetasks.dev/probe":"1"}}}',
            ),
            "list pods": as_sa(cluster, kc, "get", "pods", "-o", "name"),
            "watch pods": as_sa(
                cluster, kc, "get", "--raw", f"/api/v1/namespaces/{ns}/pods?watch=1&timeoutSeconds=1"
            ),
            "patch kopfpeering": as_sa(
                cluster,
                kc,
                "patch",
                "kopfpeering",
                "default",
                "--type=merge",
                "-p",
                '{"status":{"probe":{"priority":1,"lifetime":10}}}',
            ),
            "create event": as_sa(
                cluster,
                kc,
                "create",
                "-f",
                "-",
                input=json.dumps(
                    {
                        "apiVersion": "v1",
                        "kind": "Event",
                        "metadata": {"name": "rbac-probe.1"},
                        "involvedObject": {
                            "apiVersion": "kubetasks.dev/v1alpha1",
                            "kind": "Task",
                            "name": "rbac-probe",
                            "namespace": ns,
                        },
                        "reason": "Probe",
                        "message": "e2e",
                        "type": "Normal",
                    }
                ),
            ),
        }
        print()
        for what, res in steps.items():
            said = " ".join((res.stdout + res.stderr).split())
            print(f"  as SA: {what:<22} rc={res.returncode} {said[:90]}")
        assert all(r.returncode == 0 for r in steps.values()), {k: r.stderr for k, r in steps.items()}
        assert "task.kubetasks.dev/rbac-probe" in steps["list tasks"].stdout
        phase = cluster.json("get", "task", "rbac-probe", "-n", ns)["status"]["phase"]
        assert phase == "Running"
        for forbidden in (
            ["get", "secret", "kt-db"],
            ["delete", "pod", "anything"],
            ["create", "deployment", "x", "--image=x"],
            ["get", "tasks", "-n", "default"],
        ):
            res = as_sa(cluster, kc, *forbidden)
            print(
                f"  as SA: {' '.join(forbidden):<22} rc={res.returncode} {' '.join(res.stderr.split())[:90]}"
            )
            assert res.returncode != 0 and "forbidden" in res.stderr.lower(), (forbidden, res.stderr)

    def test_upgrade_changes_values(self, cluster: Cluster, ns_release: Release) -> None:
        """`helm upgrade --reuse-values` with new values applies them (webhook.enabled grants its rule)."""
        ns = ns_release.namespace
        cluster.helm_run(
            "upgrade",
            ns_release.name,
            str(CHART),
            "-n",
            ns,
            "--reuse-values",
            "--set",
            "replicaCount=3",
            "--set",
            "concurrency=25",
            "--set",
            "webhook.enabled=true",
            "--set",
            "webhook.certSecret=kt-webhook-certs",
        )
        status = json.loads(cluster.helm_run("status", ns_release.name, "-n", ns, "-o", "json").stdout)
        assert status["version"] == 2 and status["info"]["status"] == "deployed"
        dep = cluster.json("get", "deployment", "kt-kubetasks", "-n", ns)
        assert dep["spec"]["replicas"] == 3
        env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["KUBETASKS_CONCURRENCY"] == "25"
        hook = f"kt-kubetasks-{ns}-webhook"
        cfg = cluster.json("get", "validatingwebhookconfiguration", hook)
        assert [w["name"] for w in cfg["webhooks"]] == ["validate.kubetasks.dev"]
        check_matrix(
            cluster,
            ns_release.user,
            [
                ("get", f"validatingwebhookconfigurations:{hook}", None, True),
                ("patch", f"validatingwebhookconfigurations:{hook}", None, True),
                ("delete", f"validatingwebhookconfigurations:{hook}", None, False),
                ("update", f"validatingwebhookconfigurations:{hook}", None, False),
                ("patch", "validatingwebhookconfigurations:someone-elses-webhook", None, False),
                ("create", "validatingwebhookconfigurations", None, False),
                ("list", "validatingwebhookconfigurations", None, False),
                ("patch", "mutatingwebhookconfigurations", None, False),
            ],
            "webhook: its own configuration only",
        )

    def test_uninstall_keeps_crds_and_tasks(self, cluster: Cluster, ns_release: Release) -> None:
        """`helm uninstall` removes the release's objects but keeps the CRDs and existing Task objects."""
        ns = ns_release.namespace
        cluster.run("apply", "-n", ns, "-f", "-", input=task("survivor"))
        out = cluster.helm_run("uninstall", ns_release.name, "-n", ns)
        print("\n" + out.stdout)
        assert "kept due to the resource policy" in out.stdout, out.stdout
        for crd in OUR_CRDS + KOPF_CRDS:
            cluster.run("get", "crd", crd)
        assert cluster.run("get", "task", "survivor", "-n", ns, "-o", "name").stdout.strip() == (
            "task.kubetasks.dev/survivor"
        )
        for gone in (
            ["deployment", "kt-kubetasks"],
            ["role", "kt-kubetasks"],
            ["serviceaccount", "kt-kubetasks"],
            ["kopfpeering", "default"],
        ):
            res = cluster.run("get", *gone, "-n", ns, check=False)
            assert res.returncode != 0 and "NotFound" in res.stderr, (gone, res.stdout)
        for cluster_scoped in (
            ["clusterrole", f"kt-kubetasks-{ns}-webhook"],
            ["validatingwebhookconfiguration", f"kt-kubetasks-{ns}-webhook"],
        ):
            res = cluster.run("get", *cluster_scoped, check=False)
            assert res.returncode != 0 and "NotFound" in res.stderr, (cluster_scoped, res.stdout)


def test_cluster_wide_release(cluster: Cluster) -> None:
    """rbac.clusterWide: a ClusterRole and a ClusterKopfPeering; Tasks everywhere, still no Secrets."""
    ns = f"e2e-chartcw-{uuid.uuid4().hex[:6]}"
    peering = f"kubetasks-e2e-{uuid.uuid4().hex[:6]}"
    rel = Release(name="ktcw", namespace=ns, sa="ktcw-kubetasks")
    cluster.run("create", "namespace", ns)
    try:
        install(
            cluster,
            rel,
            "rbac.clusterWide=true",
            "crds.enabled=false",
            f"peering.name={peering}",
            "database.url=postgresql://kubetasks:pw@db.example:5432/kubetasks",
        )
        cluster.run("get", "clusterkopfpeering", peering)
        cluster.run("get", "clusterrole", f"ktcw-kubetasks-{ns}")
        secret = cluster.json("get", "secret", "ktcw-kubetasks-urls", "-n", ns)
        assert set(secret["data"]) == {"database-url"}
        env = {
            e["name"]
            for e in cluster.json("get", "deployment", "ktcw-kubetasks", "-n", ns)["spec"]["template"][
                "spec"
            ]["containers"][0]["env"]
        }
        assert "KUBETASKS_WATCH_NAMESPACES" not in env
        check_matrix(
            cluster,
            rel.user,
            [
                ("list", "tasks", None, True),
                ("watch", "cronjoblocks", None, True),
                ("list", "cronjoblocks", "default", True),
                ("patch", "tasks/status", "default", True),
                ("delete", "tasks", "default", True),
                ("create", "events", "default", True),
                ("patch", "clusterkopfpeerings", None, True),
                # pods: this release's namespace only, even cluster-wide
                ("watch", "pods", ns, True),
                ("list", "pods", ns, True),
                ("watch", "pods", None, False),
                ("list", "pods", "default", False),
                ("get", "pods", ns, False),
                ("patch", "kopfpeerings", ns, False),
                ("get", "secrets", ns, False),
                ("get", "secrets", None, False),
                ("delete", "pods", None, False),
                ("create", "deployments", ns, False),
                ("create", "tasks", "default", False),
                ("list", "namespaces", None, False),
                ("create", "validatingwebhookconfigurations", None, False),
            ],
            "cluster-wide release",
        )
    finally:
        cluster.helm_run("uninstall", rel.name, "-n", ns, check=False)
        cluster.run("delete", "namespace", ns, "--wait=false", check=False)
    assert cluster.run("get", "clusterkopfpeering", peering, check=False).returncode != 0


def test_rendered_chart_validates_against_the_live_api_server(cluster: Cluster, tmp_path: Path) -> None:
    """kubeconform -strict with schemas from this apiserver's /openapi/v2 (with enums and installed CRDs)."""
    swagger = tmp_path / "openapi-v2.json"
    swagger.write_text(cluster.run("get", "--raw", "/openapi/v2").stdout)
    schemas = tmp_path / "schemas"
    version = cluster.env["K8S_VERSION"].lstrip("v")
    tool = str(ROOT / "e2e/cluster/openapi2jsonschema.py")
    subprocess.run([sys.executable, tool, "swagger", str(swagger), str(schemas), version], check=True)
    for extra in ([], ["--set", "rbac.clusterWide=true"]):
        manifest = tmp_path / "manifest.yaml"
        rendered = cluster.helm_run(
            "template",
            "kt",
            str(CHART),
            "-n",
            "jobs",
            "--include-crds",
            f"--kube-version={version}",
            "--set",
            f"app={APP}",
            "--set",
            "database.existingSecret=kt-db",
            *extra,
        )
        manifest.write_text(rendered.stdout)
        res = subprocess.run(
            [
                cluster.kubeconform,
                "-strict",
                "-summary",
                "-kubernetes-version",
                version,
                "-schema-location",
                str(schemas),
                str(manifest),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        print(res.stdout)
        assert res.returncode == 0 and "Invalid: 0, Errors: 0, Skipped: 0" in res.stdout, (
            res.stdout + res.stderr
        )
