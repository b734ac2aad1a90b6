"""The Helm chart, rendered with `helm template` and checked without a cluster.

helm and kubeconform are built once from their Go modules (e2e/cluster/build.sh)
and kubeconform's Kubernetes schemas generated offline (e2e/cluster/schemas.sh);
if that fails the tests fail with the reason.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.support import CLUSTER_DIR, ROOT, ScriptFailed, cluster_env, cluster_script

CHART = ROOT / "charts" / "kubetasks"
REQUIRED = {"app": "examples.app:app", "database.existingSecret": "kt-db"}
NS = "jobs"
SKIPPED_KINDS = ["ServiceMonitor", "ScaledObject"]  # no CRD schemas here; checked field by field below
# The first test may build helm and kubeconform from source (minutes on a fresh machine).
pytestmark = pytest.mark.timeout(1800)

Doc = dict[str, Any]


@cache
def tools() -> dict[str, str]:
    """Paths from env.sh, after building helm/kubeconform and the schemas (idempotent)."""
    try:
        cluster_script("build.sh", "helm", "kubeconform", timeout=3000)
        cluster_script("schemas.sh", timeout=3000)
    except ScriptFailed as exc:
        pytest.fail(str(exc), pytrace=False)
    env = cluster_env()
    return {
        k: env[k] for k in ("KUBETASKS_HELM", "KUBETASKS_KUBECONFORM", "KUBETASKS_SCHEMAS", "K8S_VERSION")
    }


def kube_version() -> str:
    return tools()["K8S_VERSION"].lstrip("v")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tools()["KUBETASKS_HELM"], *args], capture_output=True, text=True, timeout=120)


def set_args(values: dict[str, str]) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def render_text(values: dict[str, str], *, include_crds: bool = False) -> str:
    merged = {**REQUIRED, **{k.replace("__", "."): v for k, v in values.items()}}
    res = helm(
        "template",
        "kt",
        str(CHART),
        "-n",
        NS,
        f"--kube-version={kube_version()}",
        *(["--include-crds"] if include_crds else []),
        *set_args(merged),
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def render(**values: str) -> list[Doc]:
    """Render with REQUIRED plus ``values`` (``a__b`` means ``a.b``); the parsed documents."""
    return [d for d in yaml.safe_load_all(render_text(values)) if d]


def render_fails(**values: str) -> str:
    merged = {**REQUIRED, **{k.replace("__", "."): v for k, v in values.items()}}
    merged = {k: v for k, v in merged.items() if v is not None and v != "<unset>"}
    res = helm("template", "kt", str(CHART), "-n", NS, f"--kube-version={kube_version()}", *set_args(merged))
    assert res.returncode != 0, f"rendered although it should not: {values}"
    return res.stderr


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def kinds(docs: list[Doc]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def container(docs: list[Doc]) -> Doc:
    c: Doc = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return c


def env_of(docs: list[Doc]) -> dict[str, Doc]:
    return {e["name"]: e for e in container(docs)["env"]}


def rbac_rules(docs: list[Doc]) -> list[Doc]:
    return [r for d in docs if d["kind"] in ("Role", "ClusterRole") for r in d["rules"]]


VARIATIONS: dict[str, dict[str, str]] = {
    "default": {},
    "cluster-wide": {"rbac.clusterWide": "true"},
    "crds-disabled": {"crds.enabled": "false"},
    "keda": {"keda.enabled": "true", "keda.minReplicaCount": "2"},
    "servicemonitor": {"serviceMonitor.enabled": "true", "serviceMonitor.labels.release": "prom"},
    "plain-urls": {
        "database.existingSecret": "",
        "database.url": "postgresql://u:p@db:5432/x",
        "redis.url": "redis://r:6379/0",
    },
    "pgbouncer-and-standby": {
        "database.pooling": "transaction",
        "database.directSecretKey": "direct",
        "database.replicaSecretKey": "replica",
    },
    "webhook-single-replica": {"webhook.enabled": "true", "replicaCount": "1"},
    "local-node": {"hostNetwork": "true", "metrics.port": "0"},
    "webhook-url-cluster-wide": {
        "webhook.enabled": "true",
        "webhook.mode": "url",
        "webhook.host": "127.0.0.1",
        "webhook.failurePolicy": "Fail",
        "replicaCount": "1",
        "rbac.clusterWide": "true",
    },
    "dashboard": {
        "dashboard.enabled": "true",
        "dashboard.tokenSecret.name": "kt-dash",
        "dashboard.writes": "true",
        "dashboard.ingress.enabled": "true",
        "dashboard.ingress.host": "tasks.example.com",
        "dashboard.ingress.tlsSecret": "tasks-tls",
    },
}


def render_variation(name: str) -> list[Doc]:
    return render(**{k.replace(".", "__"): v for k, v in VARIATIONS[name].items()})


# --------------------------------------------------------------------------- CRD copies


def load_crd_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chart_crds", CHART / "hack" / "crds.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class TestCrdCopies:
    @pytest.mark.parametrize("name", ["tasks.kubetasks.dev.yaml", "cronjoblocks.kubetasks.dev.yaml"])
    def test_templated_crd_is_the_source_plus_the_wrapper(self, name: str) -> None:
        """templates/crd-*.yaml minus the crds.enabled/keep wrapper lines is byte-identical to crds/."""
        tool = load_crd_tool()
        template = (CHART / "templates" / f"crd-{name}").read_text()
        assert tool.unwrap(template) == (ROOT / "crds" / name).read_text(), (
            f"chart copy of crds/{name} is stale: run python3 charts/kubetasks/hack/crds.py"
        )
        added = set(template.splitlines()) - set((ROOT / "crds" / name).read_text().splitlines())
        assert all(
            "{{" in ln or "annotations:" in ln or "labels:" in ln or "resource-policy" in ln for ln in added
        ), added

    def test_kopf_peering_crds_are_byte_identical(self) -> None:
        """charts/kubetasks/crds/kopf-peering.yaml is crds/kopf-peering.yaml, byte for byte."""
        assert (CHART / "crds" / "kopf-peering.yaml").read_bytes() == (
            ROOT / "crds" / "kopf-peering.yaml"
        ).read_bytes()

    def test_every_source_crd_is_in_the_chart(self) -> None:
        """No CRD in crds/ is missing from the chart."""
        tool = load_crd_tool()
        assert sorted(tool.TEMPLATED + tool.VERBATIM) == sorted(
            p.name for p in (ROOT / "crds").glob("*.yaml")
        )

    def test_keep_policy_follows_crds_keep(self) -> None:
        """CRDs are kept by default not with crds.keep=false; absent with crds.enabled=false."""
        kept = [d for d in render() if d["kind"] == "CustomResourceDefinition"]
        assert {d["metadata"]["name"] for d in kept} == {"tasks.kubetasks.dev", "cronjoblocks.kubetasks.dev"}
        assert all(d["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"} for d in kept)
        loose = [d for d in render(crds__keep="false") if d["kind"] == "CustomResourceDefinition"]
        assert loose and all("annotations" not in d["metadata"] for d in loose)
        assert "CustomResourceDefinition" not in kinds(render(crds__enabled="false"))


# --------------------------------------------------------------------------- lint, required values, schema


class TestLintAndValues:
    def test_helm_lint_strict_passes_without_warnings(self) -> None:
        """`helm lint --strict` with the required values passes with no warning."""
        res = helm("lint", "--strict", f"--kube-version={kube_version()}", str(CHART), *set_args(REQUIRED))
        print(res.stdout)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "[WARNING]" not in res.stdout and "[ERROR]" not in res.stdout, res.stdout
        assert "1 chart(s) linted, 0 chart(s) failed" in res.stdout

    def test_database_secret_is_required_with_a_clear_message(self) -> None:
        """Without database.existingSecret (or database.url) rendering fails and says what to set."""
        err = render_fails(database__existingSecret="<unset>")
        assert "database.existingSecret is required" in err and "kubectl create secret" in err, err

    def test_app_is_required(self) -> None:
        """Without app rendering fails and names the value."""
        assert "app is required" in render_fails(app="<unset>")

    def test_existing_secret_and_plain_url_are_exclusive(self) -> None:
        """database.existingSecret and database.url together are refused."""
        assert "only one of database.existingSecret and database.url" in render_fails(
            database__url="postgresql://h/d"
        )

    @pytest.mark.parametrize(
        ("key", "value", "says"),
        [
            ("replicaCoutn", "3", "replicaCoutn"),  # a typo at the root
            ("database.secretkey", "x", "secretkey"),  # a typo in a group
            ("queues[0]", "x'; DROP TABLE tasks; --", "queues"),  # unsafe in KEDA's SQL
            ("image.pullPolicy", "Sometimes", "pullPolicy"),
            ("concurrency", "0", "concurrency"),
            ("metrics.port", "70000", "port"),
            ("hostNetwork", "yes", "hostNetwork"),
            ("database.pooling", "statement", "pooling"),
        ],
    )
    def test_schema_refuses_bad_values(self, key: str, value: str, says: str) -> None:
        """values.schema.json refuses unknown keys and out-of-range values, naming them."""
        err = render_fails(**{key.replace(".", "__"): value})
        assert says in err, err

    def test_direct_and_replica_urls_come_the_way_the_database_url_does(self) -> None:
        """A key of database.existingSecret needs that Secret; a plain URL needs database.url."""
        err = render_fails(
            database__existingSecret="<unset>",
            database__url="postgresql://h/d",
            database__replicaSecretKey="r",
        )
        assert "database.replicaSecretKey names a key in database.existingSecret" in err, err
        assert "database.replicaUrl" in err, err
        err = render_fails(database__directUrl="postgresql://direct/d")
        assert "database.directUrl goes with database.url" in err and "database.directSecretKey" in err, err

    def test_lease_ttl_must_exceed_heartbeats(self) -> None:
        """leaseTTL <= 1.5 x heartbeatInterval is refused, as the process itself would."""
        assert "leaseTTL" in render_fails(leaseTTL="6", heartbeatInterval="5")

    def test_schema_is_closed_on_every_named_group(self) -> None:
        """additionalProperties is false at the root and on every group with named keys."""
        schema = json.loads((CHART / "values.schema.json").read_text())
        open_groups = []

        def walk(s: Doc, path: str) -> None:
            if s.get("type") == "object" and "properties" in s and s.get("additionalProperties") is not False:
                open_groups.append(path)
            for k, sub in s.get("properties", {}).items():
                walk(sub, f"{path}.{k}")
            if isinstance(s.get("items"), dict):
                walk(s["items"], f"{path}[]")

        walk(schema, "")
        assert open_groups == [], open_groups
        assert schema["additionalProperties"] is False
        values = yaml.safe_load((CHART / "values.yaml").read_text())
        assert set(values) == set(schema["properties"])
        for group, sub in values.items():
            if isinstance(sub, dict) and "properties" in schema["properties"][group]:
                assert set(sub) == set(schema["properties"][group]["properties"]), group


# --------------------------------------------------------------------------- rendered objects


class TestDeployment:
    def test_default_objects(self) -> None:
        """Defaults render one object of each kind; no Secret, ServiceMonitor or ScaledObject."""
        assert kinds(render()) == sorted(
            [
                "CustomResourceDefinition",
                "CustomResourceDefinition",
                "Deployment",
                "KopfPeering",
                "PodDisruptionBudget",
                "Role",
                "Role",
                "RoleBinding",
                "RoleBinding",
                "Service",
                "ServiceAccount",
            ]
        )

    def test_hardened_security_context(self) -> None:
        """Non-root uid 10001, read-only root, no escalation, no capabilities, RuntimeDefault seccomp."""
        docs = render()
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        sc = container(docs)["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert {"name": "tmp", "mountPath": "/tmp"} in container(docs)["volumeMounts"]
        assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])

    def test_env_from_secret_and_downward_api(self) -> None:
        """The database URL comes from the existing Secret; POD_NAME/POD_NAMESPACE from the downward API."""
        env = env_of(render())
        assert env["KUBETASKS_DATABASE_URL"] == {
            "name": "KUBETASKS_DATABASE_URL",
            "valueFrom": {"secretKeyRef": {"name": "kt-db", "key": "url"}},
        }
        assert "value" not in env["KUBETASKS_DATABASE_URL"]
        assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        assert env["KUBETASKS_APP"]["value"] == "examples.app:app"
        # No queues named: each worker serves the queues of its app's handlers (issue 17 item 1).
        assert "KUBETASKS_QUEUES" not in env
        assert env_of(render(queues="{images,*}"))["KUBETASKS_QUEUES"]["value"] == "images,*"
        assert env["KUBETASKS_SHUTDOWN_GRACE"]["value"] == "30"
        assert env["KUBETASKS_METRICS_PORT"]["value"] == "9090"
        assert env["KUBETASKS_WATCH_NAMESPACES"]["value"] == NS
        assert env["KUBETASKS_POD_SELECTOR"]["value"] == (
            "app.kubernetes.io/component=worker,app.kubernetes.io/instance=kt,app.kubernetes.io/name=kubetasks"
        )
        assert "KUBETASKS_REDIS_URL" not in env
        # Session pooling (the default) needs no direct URL; no standby unless one is named.
        assert not {"KUBETASKS_DATABASE_POOLING", "KUBETASKS_DATABASE_DIRECT_URL"} & set(env)
        assert "KUBETASKS_DATABASE_REPLICA_URL" not in env

    def test_pooling_direct_and_replica_urls_from_the_secret(self) -> None:
        """PgBouncer in transaction mode plus a direct URL and a standby, every URL a key of the
        database Secret; the dashboard gets them too (it reads from the standby)."""
        docs = render_variation("pgbouncer-and-standby")
        env = env_of(docs)
        assert env["KUBETASKS_DATABASE_POOLING"]["value"] == "transaction"
        assert env["KUBETASKS_DATABASE_DIRECT_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "kt-db",
            "key": "direct",
        }
        assert env["KUBETASKS_DATABASE_REPLICA_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "kt-db",
            "key": "replica",
        }
        dash = render(
            **{k.replace(".", "__"): v for k, v in VARIATIONS["pgbouncer-and-standby"].items()},
            dashboard__enabled="true",
            dashboard__tokenSecret__name="kt-dash",
        )
        pod = one(dash, "Deployment", "kt-kubetasks-dashboard")["spec"]["template"]["spec"]
        dash_env = {e["name"]: e for e in pod["containers"][0]["env"]}
        for var in ("POOLING", "DIRECT_URL", "REPLICA_URL"):
            assert dash_env[f"KUBETASKS_DATABASE_{var}"] == env[f"KUBETASKS_DATABASE_{var}"], var

    def test_probes_lifecycle_and_grace(self) -> None:
        """Probes /healthz and /readyz on port 9090; preStop sleeps 5 s; grace = shutdownGrace + 10."""
        docs = render()
        c = container(docs)
        assert c["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert c["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
        assert c["args"] == ["run"]
        assert one(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 40
        spec = one(render(shutdownGrace="120"), "Deployment")["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] == 130

    def test_replicas_image_and_spread(self) -> None:
        """Two replicas of kubetasks:<appVersion>, spread by hostname."""
        dep = one(render(), "Deployment")
        app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
        assert dep["spec"]["replicas"] == 2
        assert container([dep])["image"] == f"kubetasks:{app_version}"
        (tsc,) = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert tsc["topologyKey"] == "kubernetes.io/hostname"
        assert tsc["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
        assert container([one(render(image__tag="1.2.3"), "Deployment")])["image"] == "kubetasks:1.2.3"

    def test_pdb_only_with_more_than_one_replica(self) -> None:
        """minAvailable 1 with 2 replicas; no PodDisruptionBudget with 1."""
        assert one(render(), "PodDisruptionBudget")["spec"]["minAvailable"] == 1
        assert "PodDisruptionBudget" not in kinds(render(replicaCount="1"))

    def test_service_and_service_monitor(self) -> None:
        """The Service exposes the metrics port; the ServiceMonitor (opt-in) scrapes it at /metrics."""
        svc = one(render(), "Service")
        assert svc["spec"]["ports"] == [
            {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
        ]
        docs = render_variation("servicemonitor")
        sm = one(docs, "ServiceMonitor")
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
        assert sm["metadata"]["labels"]["release"] == "prom"
        assert (
            sm["spec"]["selector"]["matchLabels"].items()
            <= one(docs, "Service")["metadata"]["labels"].items()
        )

    def test_defaults_keep_the_pod_network(self) -> None:
        """By default: no hostNetwork, the default rollout, metrics on every interface of the pod."""
        dep = one(render(), "Deployment")
        spec = dep["spec"]["template"]["spec"]
        assert "hostNetwork" not in spec and "dnsPolicy" not in spec and "strategy" not in dep["spec"]
        env = env_of([dep])
        assert "KUBETASKS_METRICS_ADDR" not in env and "KUBETASKS_METRICS_ADDR_FILE" not in env

    def test_host_network_for_a_local_node(self) -> None:
        """hostNetwork: ClusterFirstWithHostNet, one pod at a time, metrics bound to the pod's IP."""
        docs = render(hostNetwork="true")
        dep = one(docs, "Deployment")
        spec = dep["spec"]["template"]["spec"]
        assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
        # a surge pod on a one-node cluster could wait for ever for its predecessor's ports
        assert dep["spec"]["strategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
        }
        env = env_of(docs)
        assert env["KUBETASKS_METRICS_ADDR"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert container(docs)["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
        assert env_of(render(hostNetwork="true", metrics__bindAddress="127.0.0.1"))[
            "KUBETASKS_METRICS_ADDR"
        ] == {
            "name": "KUBETASKS_METRICS_ADDR",
            "value": "127.0.0.1",
        }

    def test_metrics_port_zero_means_a_port_per_pod(self) -> None:
        """metrics.port 0: no declared port, no Service port, exec probes reading the address file."""
        docs = render_variation("local-node")
        c = container(docs)
        assert "ports" not in c
        env = env_of(docs)
        assert env["KUBETASKS_METRICS_PORT"]["value"] == "0"
        assert env["KUBETASKS_METRICS_ADDR_FILE"]["value"] == "/tmp/kubetasks-metrics"
        assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp"}  # the file lives on the emptyDir
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            cmd = c[probe]["exec"]["command"]
            assert cmd[:2] == ["python3", "-c"] and "/tmp/kubetasks-metrics" in cmd[2] and path in cmd[2]
            assert "httpGet" not in c[probe]
            compile(cmd[2], probe, "exec")  # the probe is valid Python
        assert "Service" not in kinds(docs)
        svc = one(render(metrics__port="0", webhook__enabled="true", replicaCount="1"), "Service")
        assert [p["name"] for p in svc["spec"]["ports"]] == ["webhook"]
        err = render_fails(metrics__port="0", serviceMonitor__enabled="true")
        assert "serviceMonitor.enabled needs a fixed metrics.port" in err

    def test_plain_urls_make_a_secret(self) -> None:
        """database.url / redis.url (not recommended) go into a Secret the chart creates, never into env."""
        docs = render_variation("plain-urls")
        secret = one(docs, "Secret")
        assert base64.b64decode(secret["data"]["database-url"]).decode() == "postgresql://u:p@db:5432/x"
        assert base64.b64decode(secret["data"]["redis-url"]).decode() == "redis://r:6379/0"
        env = env_of(docs)
        assert env["KUBETASKS_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "kt-kubetasks-urls",
            "key": "database-url",
        }
        assert env["KUBETASKS_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "redis-url"
        assert "postgresql://" not in json.dumps(one(docs, "Deployment"))
        assert "checksum/urls" in one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        assert "KUBETASKS_DATABASE_DIRECT_URL" not in env and "database-direct-url" not in secret["data"]
        docs = render(
            **{k.replace(".", "__"): v for k, v in VARIATIONS["plain-urls"].items()},
            database__directUrl="postgresql://u:p@db-direct:5432/x",
            database__replicaUrl="postgresql://u:p@db-standby:5432/x",
        )
        data = one(docs, "Secret")["data"]
        assert base64.b64decode(data["database-direct-url"]).decode() == "postgresql://u:p@db-direct:5432/x"
        assert base64.b64decode(data["database-replica-url"]).decode() == "postgresql://u:p@db-standby:5432/x"
        env = env_of(docs)
        for var, key in (("DIRECT", "database-direct-url"), ("REPLICA", "database-replica-url")):
            ref = env[f"KUBETASKS_DATABASE_{var}_URL"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "kt-kubetasks-urls", "key": key}
        assert "postgresql://" not in json.dumps(one(docs, "Deployment"))

    def test_redis_from_existing_secret(self) -> None:
        """redis.existingSecret feeds KUBETASKS_REDIS_URL from that Secret."""
        env = env_of(render(redis__existingSecret="kt-redis", redis__secretKey="uri"))
        assert env["KUBETASKS_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "kt-redis", "key": "uri"}

    def test_keda_scaled_object(self) -> None:
        """keda.enabled: a postgresql ScaledObject counting due pending tasks; KEDA owns replicas."""
        docs = render_variation("keda")
        so = one(docs, "ScaledObject")
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        assert so["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
        assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (2, 10)
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "postgresql"
        assert trigger["metadata"]["connectionFromEnv"] == "KUBETASKS_DATABASE_URL"
        assert trigger["metadata"]["targetQueryValue"] == "20"
        # No queues named (the handlers' own, unknown to the chart): every queue counts.
        assert trigger["metadata"]["query"] == (
            "SELECT (SELECT count(*) FROM kubetasks.tasks WHERE status = 'pending' AND NOT parked "
            "AND run_at <= now()) + (SELECT count(*) FROM kubetasks.tasks "
            "WHERE status = 'pending' AND parked AND run_at <= now() "
            "AND handler IN (SELECT name FROM kubetasks.handlers))"
        )
        star = one(render(keda__enabled="true", queues="{a,*}"), "ScaledObject")["spec"]["triggers"][0]
        assert "queue IN" not in star["metadata"]["query"]
        assert "replicas" not in one(docs, "Deployment")["spec"]
        assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
        q = one(render(keda__enabled="true", queues="{a,b.c}"), "ScaledObject")["spec"]["triggers"][0]
        assert q["metadata"]["query"].count("queue IN ('a', 'b.c')") == 2
        assert "PodDisruptionBudget" not in kinds(render(keda__enabled="true"))  # minReplicaCount 1

    def test_webhook(self) -> None:
        """webhook.enabled: KUBETASKS_WEBHOOK_* env, a webhook port on pod and Service, certs mounted."""
        docs = render(replicaCount="3", webhook__enabled="true", webhook__certSecret="kt-webhook")
        env = env_of(docs)
        assert env["KUBETASKS_WEBHOOK_PORT"]["value"] == "9443"
        assert env["KUBETASKS_WEBHOOK_HOST"]["value"] == f"kt-kubetasks.{NS}.svc"
        assert env["KUBETASKS_WEBHOOK_CERT_DIR"]["value"] == "/etc/kubetasks/webhook"
        assert {"name": "webhook", "containerPort": 9443, "protocol": "TCP"} in container(docs)["ports"]
        assert {"name": "webhook", "port": 9443, "targetPort": "webhook", "protocol": "TCP"} in one(
            docs, "Service"
        )["spec"]["ports"]
        volumes = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
        assert {"name": "webhook-certs", "secret": {"secretName": "kt-webhook"}} in volumes
        assert not any(k.startswith("KUBETASKS_WEBHOOK") for k in env_of(render()))
        assert "needs webhook.certSecret" in render_fails(webhook__enabled="true")  # 2 replicas, no certs


class TestDashboard:
    """`kubetasks dashboard` as its own Deployment, Service and Ingress, off by default."""

    def test_off_by_default(self) -> None:
        docs = render()
        assert not [d for d in docs if "dashboard" in d["metadata"]["name"]]

    def test_its_pods_are_never_the_workers(self) -> None:
        docs = render_variation("dashboard")
        worker = one(docs, "Deployment", "kt-kubetasks")
        dash = one(docs, "Deployment", "kt-kubetasks-dashboard")
        pod_labels = dash["spec"]["template"]["metadata"]["labels"]
        # the workers' Deployment, Service, PDB and pod watcher all select by these labels
        assert not set(worker["spec"]["selector"]["matchLabels"].items()) <= set(pod_labels.items())
        assert (
            one(docs, "Service", "kt-kubetasks")["spec"]["selector"]
            == worker["spec"]["selector"]["matchLabels"]
        )
        assert one(docs, "Service", "kt-kubetasks-dashboard")["spec"]["selector"] == pod_labels
        assert dash["spec"]["template"]["spec"]["automountServiceAccountToken"] is False

    def test_container_settings(self) -> None:
        docs = render_variation("dashboard")
        dash = one(docs, "Deployment", "kt-kubetasks-dashboard")
        c = dash["spec"]["template"]["spec"]["containers"][0]
        assert c["args"] == ["dashboard"]
        env = {e["name"]: e for e in c["env"]}
        assert env["KUBETASKS_DASHBOARD_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "kt-dash",
            "key": "token",
        }
        assert env["KUBETASKS_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "kt-db"
        assert env["KUBETASKS_DASHBOARD_ADDR"]["value"] == "0.0.0.0"
        assert env["KUBETASKS_DASHBOARD_WRITES"]["value"] == "true"
        assert env["KUBETASKS_DASHBOARD_HIDE_PAYLOADS"]["value"] == "false"
        assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
        assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        ing = one(docs, "Ingress", "kt-kubetasks-dashboard")
        assert ing["spec"]["tls"] == [{"hosts": ["tasks.example.com"], "secretName": "tasks-tls"}]
        backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert backend == {"name": "kt-kubetasks-dashboard", "port": {"name": "http"}}

    def test_proxy_auth_has_no_token_and_names_the_header(self) -> None:
        docs = render(dashboard__enabled="true", dashboard__auth="proxy", dashboard__userHeader="X-Auth-User")
        c = one(docs, "Deployment", "kt-kubetasks-dashboard")["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in c["env"]}
        assert "KUBETASKS_DASHBOARD_TOKEN" not in env
        assert env["KUBETASKS_DASHBOARD_USER_HEADER"]["value"] == "X-Auth-User"
        assert not [d for d in docs if d["kind"] == "Ingress"]

    def test_bad_values_are_refused_naming_the_field(self) -> None:
        assert "dashboard.tokenSecret.name is required" in render_fails(dashboard__enabled="true")
        assert "/dashboard/auth" in render_fails(dashboard__enabled="true", dashboard__auth="basic")
        assert "dashboard.ingress.host is required" in render_fails(
            dashboard__enabled="true", dashboard__tokenSecret__name="t", dashboard__ingress__enabled="true"
        )


class TestRbac:
    @pytest.mark.parametrize("variation", sorted(VARIATIONS))
    def test_no_secrets_no_pod_writes_no_wildcards(self, variation: str) -> None:
        """In every variation: no rule touches Secrets, Pods are only listed and watched (in the
        release namespace), nothing is deleted but Tasks, no '*' anywhere, no RBAC escalation."""
        docs = render_variation(variation)
        rules = rbac_rules(docs)
        assert rules
        for r in rules:
            assert "secrets" not in r["resources"], r
            assert "*" not in r["verbs"] and "*" not in r["resources"] and "*" not in r["apiGroups"], r
            assert not {"deletecollection", "escalate", "bind", "impersonate", "update"} & set(r["verbs"]), r
            if "delete" in r["verbs"]:
                assert r["resources"] == ["tasks"], r
        pod_rules = [
            (d["kind"], d["metadata"].get("namespace"), r)
            for d in docs
            if d["kind"] in ("Role", "ClusterRole")
            for r in d["rules"]
            if "pods" in r["resources"]
        ]
        assert pod_rules == [
            ("Role", NS, {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]})
        ]

    def test_namespaced_role(self) -> None:
        """By default a Role in the release namespace has exactly the rules kubetasks uses."""
        docs = render()
        role = one(docs, "Role", "kt-kubetasks")
        assert role["metadata"]["namespace"] == NS
        got = {(tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"])) for r in role["rules"]}
        assert got == {
            (("kubetasks.dev",), ("tasks", "cronjoblocks"), ("get", "list", "watch")),
            (("kubetasks.dev",), ("tasks",), ("patch", "delete")),
            (("kubetasks.dev",), ("tasks/status", "cronjoblocks/status"), ("patch",)),
            (("",), ("events",), ("create",)),
            (("kopf.dev",), ("kopfpeerings",), ("get", "list", "watch", "patch")),
        }
        binding = one(docs, "RoleBinding", "kt-kubetasks")
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "kt-kubetasks",
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kt-kubetasks", "namespace": NS}]
        pods = one(docs, "RoleBinding", "kt-kubetasks-pods")
        assert pods["roleRef"]["name"] == "kt-kubetasks-pods" and pods["subjects"] == binding["subjects"]
        peering = one(docs, "KopfPeering")["metadata"]
        assert (peering["name"], peering["namespace"]) == ("default", NS)

    def test_nothing_cluster_wide_by_default(self) -> None:
        """kopf runs with cluster scanning off: no ClusterRole at all unless asked for."""
        docs = render()
        assert "ClusterRole" not in kinds(docs) and "ClusterRoleBinding" not in kinds(docs)

    def test_webhook_configuration_and_its_one_permission(self) -> None:
        """The chart creates the configuration; the operator may only get/patch that one object."""
        docs = render_variation("webhook-single-replica")
        cfg = one(docs, "ValidatingWebhookConfiguration")
        name = f"kt-kubetasks-{NS}-webhook"
        assert cfg["metadata"]["name"] == name
        (wh,) = cfg["webhooks"]
        assert wh["failurePolicy"] == "Ignore" and wh["sideEffects"] == "None"
        assert wh["rules"] == [
            {
                "apiGroups": ["kubetasks.dev"],
                "apiVersions": ["*"],
                "operations": ["CREATE", "UPDATE"],
                "resources": ["tasks", "cronjoblocks"],
                "scope": "Namespaced",
            }
        ]
        assert wh["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NS}}
        assert wh["matchConditions"] == [
            {
                "name": "creation-or-spec-change",
                "expression": "request.operation == 'CREATE' || object.spec != oldObject.spec",
            }
        ]
        assert wh["clientConfig"] == {
            "service": {"name": "kt-kubetasks", "namespace": NS, "port": 9443, "path": "/validate"}
        }
        role = one(docs, "ClusterRole", name)
        assert role["rules"] == [
            {
                "apiGroups": ["admissionregistration.k8s.io"],
                "resources": ["validatingwebhookconfigurations"],
                "resourceNames": [name],
                "verbs": ["get", "patch"],
            }
        ]
        assert env_of(docs)["KUBETASKS_WEBHOOK_CONFIGURATION"]["value"] == name

    def test_webhook_url_mode(self) -> None:
        """url mode: https://<host>:<port>/validate, served on that address; no namespaceSelector
        cluster-wide; the chosen failurePolicy."""
        docs = render_variation("webhook-url-cluster-wide")
        (wh,) = one(docs, "ValidatingWebhookConfiguration")["webhooks"]
        assert wh["clientConfig"] == {"url": "https://127.0.0.1:9443/validate"}
        assert wh["failurePolicy"] == "Fail" and "namespaceSelector" not in wh
        env = env_of(docs)
        assert env["KUBETASKS_WEBHOOK_ADDR"]["value"] == "127.0.0.1"
        assert env["KUBETASKS_WEBHOOK_HOST"]["value"] == "127.0.0.1"
        assert "needs webhook.host" in render_fails(
            webhook__enabled="true", webhook__mode="url", replicaCount="1"
        )

    def test_cluster_wide(self) -> None:
        """rbac.clusterWide: ClusterRole/Binding (per-namespace name), ClusterKopfPeering; a Role for pods."""
        docs = render_variation("cluster-wide")
        assert [d["metadata"]["name"] for d in docs if d["kind"] == "Role"] == ["kt-kubetasks-pods"]
        assert "KopfPeering" not in kinds(docs)
        main = one(docs, "ClusterRole", f"kt-kubetasks-{NS}")
        assert {"clusterkopfpeerings"} in [set(r["resources"]) for r in main["rules"]]
        assert all("kopfpeerings" not in r["resources"] for r in main["rules"])
        assert one(docs, "ClusterRoleBinding", f"kt-kubetasks-{NS}")["roleRef"]["kind"] == "ClusterRole"
        assert "namespace" not in one(docs, "ClusterKopfPeering")["metadata"]
        assert "KUBETASKS_WATCH_NAMESPACES" not in env_of(docs)


# --------------------------------------------------------------------------- kubeconform


@pytest.fixture(scope="module")
def crd_schemas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kubeconform schemas for our custom resources, from crds/ (Task, CronJobLock, kopf peering)."""
    out = tmp_path_factory.mktemp("crd-schemas")
    res = subprocess.run(
        [
            sys.executable,
            str(CLUSTER_DIR / "openapi2jsonschema.py"),
            "crd",
            str(out),
            kube_version(),
            *map(str, sorted((ROOT / "crds").glob("*.yaml"))),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.parametrize("variation", sorted(VARIATIONS))
def test_kubeconform_strict(variation: str, crd_schemas: Path, tmp_path: Path) -> None:
    """Every rendered object (CRDs included) is valid for Kubernetes 1.34 under kubeconform -strict."""
    values = {k.replace(".", "__"): v for k, v in VARIATIONS[variation].items()}
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(render_text(values, include_crds=True))
    n_docs = len([d for d in yaml.safe_load_all(manifest.read_text()) if d])
    n_skipped = len([d for d in yaml.safe_load_all(manifest.read_text()) if d and d["kind"] in SKIPPED_KINDS])
    t = tools()
    res = subprocess.run(
        [
            t["KUBETASKS_KUBECONFORM"],
            "-strict",
            "-summary",
            "-output",
            "text",
            "-kubernetes-version",
            kube_version(),
            "-schema-location",
            t["KUBETASKS_SCHEMAS"],
            "-schema-location",
            str(crd_schemas),
            "-skip",
            ",".join(SKIPPED_KINDS),
            str(manifest),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    m = re.search(
        r"(\d+) resources found.*Valid: (\d+), Invalid: (\d+), Errors: (\d+), Skipped: (\d+)", res.stdout
    )
    assert m, res.stdout
    found, valid, invalid, errors, skipped = map(int, m.groups())
    assert (found, invalid, errors, skipped) == (n_docs, 0, 0, n_skipped)
    assert valid == n_docs - n_skipped


def test_kubeconform_catches_a_bad_manifest(crd_schemas: Path, tmp_path: Path) -> None:
    """The generated schemas really validate: an unknown field and a wrong type are reported."""
    docs = render()
    dep = one(docs, "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True
    dep["spec"]["replicas"] = "two"
    peering = one(docs, "KopfPeering")
    peering["spec"] = {"x": 1}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all([dep, peering]))
    t = tools()
    res = subprocess.run(
        [
            t["KUBETASKS_KUBECONFORM"],
            "-strict",
            "-kubernetes-version",
            kube_version(),
            "-schema-location",
            t["KUBETASKS_SCHEMAS"],
            "-schema-location",
            str(crd_schemas),
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0
    assert "runAsNonroot" in res.stdout and "replicas" in res.stdout and "KopfPeering" in res.stdout, (
        res.stdout
    )
