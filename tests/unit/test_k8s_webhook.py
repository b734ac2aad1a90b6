"""The admission webhook's verdicts and the operator's settings (pure functions, no cluster)."""

from __future__ import annotations

from typing import Any

import pytest

from kubetasks import ConfigError, Settings
from kubetasks.k8s.leadership import scope_of
from kubetasks.k8s.webhook import review

DB = "postgresql://u@h:5432/d"


def request(
    kind: str, spec: dict[str, Any], op: str = "CREATE", old: dict[str, Any] | None = None
) -> dict[str, Any]:
    req: dict[str, Any] = {
        "uid": "u-1",
        "kind": {"group": "kubetasks.dev", "version": "v1alpha1", "kind": kind},
        "operation": op,
        "namespace": "jobs",
        "object": {"metadata": {"name": "x", "namespace": "jobs"}, "spec": spec},
    }
    if old is not None:
        req["oldObject"] = {"metadata": {"name": "x", "namespace": "jobs"}, "spec": old}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req}


def verdict(body: dict[str, Any]) -> tuple[bool, str]:
    resp = review(body, "default")["response"]
    assert resp["uid"] == "u-1"
    return resp["allowed"], (resp.get("status") or {}).get("message", "")


CRON = {"schedule": "0 3 * * *", "handler": "side.work"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({**CRON, "schedule": "0 0 31 2 *"}, "spec.schedule: '0 0 31 2 *' never fires"),
        ({**CRON, "timeZone": "Mars/Base"}, "spec.timeZone: unknown time zone 'Mars/Base'"),
        ({**CRON, "schedule": "61 * * * *"}, "spec.schedule:"),
    ],
)
def test_cronjoblock_refused_on_create_naming_the_field(spec: dict[str, Any], message: str) -> None:
    allowed, said = verdict(request("CronJobLock", spec))
    assert not allowed and said.startswith(message), said


def test_cronjoblock_update_checked_only_when_the_spec_changes() -> None:
    bad = {**CRON, "schedule": "0 0 30 2 *"}
    assert verdict(request("CronJobLock", bad, "UPDATE", old=CRON))[0] is False
    # A spec that was already bad (created while no webhook ran) does not block metadata updates.
    assert verdict(request("CronJobLock", bad, "UPDATE", old=bad)) == (True, "")
    assert verdict(request("CronJobLock", CRON)) == (True, "")


def test_task_payload_size_on_create_and_update() -> None:
    big = {"handler": "h", "payload": {"blob": "x" * (200 * 1024)}}
    allowed, said = verdict(request("Task", big))
    assert not allowed and said.startswith("spec.payload: is 204811 bytes as JSON"), said
    assert verdict(request("Task", {**big, "suspend": True}, "UPDATE", old=big))[0] is False
    assert verdict(request("Task", {"handler": "h", "payload": {"n": 1}})) == (True, "")


def test_operator_settings_from_the_environment() -> None:
    s = Settings.load(
        env={
            "KUBETASKS_WATCH_NAMESPACES": "b, a",
            "POD_NAMESPACE": "jobs",
            "KUBETASKS_LEADER_TIMEOUT": "4",
            "KUBETASKS_PEERING_LIFETIME": "6",
        },
        database_url=DB,
    )
    assert s.watch_namespaces == ("b", "a") and s.pod_namespace == "jobs"
    assert s.leader_timeout == 4.0 and s.peering_lifetime == 6
    assert scope_of(s.watch_namespaces) == "namespaces:a,b" and scope_of(()) == "cluster"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"KUBETASKS_WATCH_NAMESPACES": "Bad_NS"},
            "KUBETASKS_WATCH_NAMESPACES: 'Bad_NS' is not a namespace name",
        ),
        ({"KUBETASKS_LEADER_TIMEOUT": "0.5"}, "KUBETASKS_LEADER_TIMEOUT: must be between 1 and 300"),
        ({"KUBETASKS_PEERING_LIFETIME": "1"}, "KUBETASKS_PEERING_LIFETIME: must be between 2 and 3600"),
        ({"KUBETASKS_WEBHOOK_PORT": "70000"}, "KUBETASKS_WEBHOOK_PORT: must be between 0"),
        ({"KUBETASKS_KOPF_LOG_LEVEL": "loud"}, "KUBETASKS_KOPF_LOG_LEVEL: must be debug"),
    ],
)
def test_operator_settings_refused_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.load(env=env, database_url=DB)
    assert str(err.value).startswith(message), str(err.value)
