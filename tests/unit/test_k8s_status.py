"""A task row becomes the status a Task object shows (pure mapping, no cluster)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubetasks.k8s.status import RESULT_SUMMARY_MAX, status_of
from kubetasks.k8s.webhook import cr_payload_bytes, payload_error

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
T1 = datetime(2026, 11, 23, 12, 0, 5, tzinfo=UTC)


def row(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": 7, "queue": "default", "status": "pending", "attempt": 0, "pod_id": None, "error": None,
        "progress": None, "progress_message": None, "result": None, "started_at": None,
        "finished_at": None, "updated_at": T0,
    }  # fmt: skip
    base.update(kw)
    return base


def conditions(st: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in st["conditions"]}


def test_succeeded_sets_the_condition_kubectl_wait_reads() -> None:
    st = status_of(
        row(status="succeeded", attempt=1, pod_id="p-1", started_at=T0, finished_at=T1, result={"ok": 1})
    )
    assert st["phase"] == "Succeeded" and st["attempts"] == 1 and st["pod"] == "p-1"
    assert conditions(st) == {"Accepted": "True", "Running": "False", "Succeeded": "True", "Failed": "False"}
    assert st["finishedAt"] == "2026-11-23T12:00:05Z" and st["result"] == {"ok": 1}


def test_refused_task_is_failed_and_not_accepted_with_reason() -> None:
    st = status_of(
        row(status="failed", error="spec.payload: is 204811 bytes as JSON; the limit ...", finished_at=T0)
    )
    assert st["phase"] == "Failed" and st["message"].startswith("spec.payload: is 204811 bytes")
    assert conditions(st)["Accepted"] == "False" and conditions(st)["Failed"] == "True"


def test_retrying_message_and_scalar_result_wrapped() -> None:
    st = status_of(row(status="pending", attempt=2, error="ConnectionError: refused"))
    assert st["message"] == "retrying after attempt 2: ConnectionError: refused"
    assert status_of(row(status="succeeded", attempt=1, finished_at=T1, result="done"))["result"] == {
        "value": "done"
    }


def test_large_result_is_summarised() -> None:
    big = {"blob": "x" * (RESULT_SUMMARY_MAX + 10)}
    st = status_of(row(status="succeeded", attempt=1, finished_at=T1, result=big))
    assert st["result"] == {
        "truncated": True,
        "bytes": len('{"blob":""}') + RESULT_SUMMARY_MAX + 10,
        "taskId": "7",
    }


def test_payload_rule_counts_compact_utf8_json() -> None:
    assert cr_payload_bytes({"a": "é"}) == len('{"a":"é"}'.encode())
    assert payload_error({"payload": {"b": "x" * 1000}}) is None
    msg = payload_error({"payload": {"b": "x" * (128 * 1024)}})
    assert msg is not None and msg.startswith(
        "spec.payload: is 131080 bytes as JSON; the limit for a Task object is 131072"
    )


def test_waiting_workflow_root_shows_its_children() -> None:
    st = status_of(row(status="suspended", attempt=0), {"succeeded": 3, "running": 2})
    assert st["phase"] == "Waiting"
    assert st["children"] == {"succeeded": 3, "running": 2}, "the whole status is replaced: only counts"
    assert "children" not in status_of(row())


def test_a_task_no_worker_serves_is_pending_not_runnable_and_says_why() -> None:
    from kubetasks.serving import Serving

    served = Serving.from_rows([{"queue": "default", "handler": "side.work"}])
    st = status_of(row(handler="images.rotate", parked=True), None, served)
    why = "no active worker serves handler 'images.rotate' in queue 'default'; served: side.work"
    assert st["phase"] == "Pending" and st["message"] == why
    runnable = next(c for c in st["conditions"] if c["type"] == "Runnable")
    assert (runnable["status"], runnable["reason"], runnable["message"]) == ("False", "NoWorker", why)
    served_row = status_of(row(handler="side.work", parked=False), None, served)
    runnable = next(c for c in served_row["conditions"] if c["type"] == "Runnable")
    assert (runnable["status"], runnable["reason"]) == ("True", "Queued")
    assert served_row["message"] == ""


def paused_condition(st: dict[str, Any]) -> tuple[str, str, str] | None:
    c = next((c for c in st["conditions"] if c["type"] == "Paused"), None)
    return None if c is None else (c["status"], c["reason"], c["message"])


def test_every_pause_of_a_running_task_says_which_happened() -> None:
    """Asked while running, paused at a checkpoint, paused after the attempt, or moot: the status
    says each, in its message and a Paused condition; a task never asked has no such condition."""
    asked = status_of(row(status="running", attempt=2, pod_id="p", started_at=T0, pause_requested_at=T1))
    assert asked["phase"] == "Running"
    assert asked["message"].startswith(
        "pause requested at 2026-11-23T12:00:05Z: attempt 2 pauses at a checkpoint"
    )
    assert paused_condition(asked) == ("False", "PauseRequested", asked["message"])

    at_checkpoint = status_of(row(status="paused", attempt=2, pause_outcome="checkpoint"))
    assert at_checkpoint["phase"] == "Paused"
    assert at_checkpoint["message"] == "paused at a checkpoint of attempt 2 (not counted); resume to go on"
    assert paused_condition(at_checkpoint)[:2] == ("True", "PausedAtCheckpoint")  # type: ignore[index]

    after = status_of(row(status="paused", attempt=2, pause_outcome="after_attempt", error="boom"))
    assert after["message"].startswith("paused after attempt 2 ended (its handler did not pause")
    assert paused_condition(after)[:2] == ("True", "PausedAfterAttempt")  # type: ignore[index]

    moot = status_of(row(status="succeeded", attempt=2, finished_at=T1, pause_outcome="moot"))
    assert moot["phase"] == "Succeeded"
    assert moot["message"] == "a pause was requested, but attempt 2 ended the task (succeeded) first"
    assert paused_condition(moot)[:2] == ("False", "PauseMoot")  # type: ignore[index]
    failed = status_of(row(status="failed", attempt=1, finished_at=T1, error="boom", pause_outcome="moot"))
    assert failed["message"] == "a pause was requested, but attempt 1 ended the task (failed) first; boom"

    held = status_of(row(status="paused"))
    assert paused_condition(held)[:2] == ("True", "Paused")  # type: ignore[index]
    assert paused_condition(status_of(row(status="running", attempt=1, started_at=T0))) is None
    assert paused_condition(status_of(row(status="succeeded", attempt=1, finished_at=T1))) is None


def test_progress_stage_and_metadata_are_in_the_status() -> None:
    st = status_of(
        row(status="running", attempt=1, started_at=T0, progress=40, progress_message="resizing",
            progress_stage="resize", progress_metadata={"done": 4, "of": 10})
    )  # fmt: skip
    assert (st["progress"], st["progressMessage"], st["progressStage"], st["progressMetadata"]) == (
        40, "resizing", "resize", {"done": 4, "of": 10}
    )  # fmt: skip
    plain = status_of(row(status="running", attempt=1, started_at=T0, progress=40))
    assert "progressStage" not in plain and "progressMetadata" not in plain, "the whole status is replaced"
