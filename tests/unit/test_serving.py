"""What the active workers serve, and how a task nobody serves is worded (pure, no database)."""

from __future__ import annotations

from kubetasks.serving import Serving


def test_serves_by_queue_and_handler_and_a_wildcard_for_earlier_versions() -> None:
    s = Serving.from_rows(
        [
            {"queue": "default", "handler": "a"},
            {"queue": "default", "handler": "b"},
            {"queue": "images", "handler": "resize"},
            {"queue": "legacy", "handler": None},  # a worker of an earlier version: every handler
            {"queue": "legacy", "handler": "a"},
        ]
    )
    assert s.serves("a", "default") and s.serves("b", "default")
    assert not s.serves("resize", "default") and not s.serves("a", "images")
    assert s.serves("anything", "legacy")
    assert not s.serves("a", "nowhere")


def test_message_names_what_is_served_instead() -> None:
    s = Serving.from_rows([{"queue": "default", "handler": "b"}, {"queue": "default", "handler": "a"}])
    assert s.message("x", "default") == "no active worker serves handler 'x' in queue 'default'; served: a, b"
    assert s.message("a", "images") == (
        "no active worker serves handler 'a' in queue 'images'; served: nothing in queue 'images' "
        "(queues served: default)"
    )
    assert Serving().message("a", "default") == (
        "no active worker serves handler 'a' in queue 'default'; served: nothing (no worker is active)"
    )
