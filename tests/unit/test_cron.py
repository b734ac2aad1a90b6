"""Cron maths on an injected clock: every instant is an argument, nothing sleeps.

Expected instants are written in UTC next to the local wall time they stand
for, so a reader can check each one against a calendar.
"""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from kubetasks import App, Blueprint, SyncTaskContext, TaskContext, ValidationError, cron
from kubetasks.cron import (
    Due,
    ScheduleSpec,
    due_ticks,
    lock_name,
    next_tick,
    prev_tick,
    run_tags,
    tick_of,
    tick_tag,
    ticks_between,
    validate,
)
from tests.handlers import noop

BERLIN = "Europe/Berlin"
NEW_YORK = "America/New_York"


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, us: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, us, tzinfo=UTC)


def local(tz: str, y: int, mo: int, d: int, h: int = 0, mi: int = 0, *, fold: int = 0) -> datetime:
    """A wall time in ``tz`` (``fold=1``: the second of a repeated time), as UTC."""
    return datetime(y, mo, d, h, mi, tzinfo=ZoneInfo(tz), fold=fold).astimezone(UTC)


def series(expr: str, tz: str, after: datetime, n: int) -> list[datetime]:
    out = []
    t = after
    for _ in range(n):
        t = next_tick(expr, tz, t)
        out.append(t)
    return out


class TestValidate:
    @pytest.mark.parametrize(
        "expr",
        ["* * * * *", "*/5 * * * *", "0 3 * * *", "0 0 29 2 *", "0 12 L * *", "@daily", "* * * * * */10"],
    )
    def test_valid_expressions_pass(self, expr: str) -> None:
        """An expression whose next time can be computed is accepted as written."""
        assert validate(expr, "UTC") == (expr, "UTC")

    @pytest.mark.parametrize("expr", ["0 0 31 2 *", "0 0 30 2 *", "0 0 31 4 *", "0 0 31 11 *"])
    def test_never_fires_is_refused(self, expr: str) -> None:
        """A date that no month has is refused with the expression named."""
        with pytest.raises(ValidationError) as ei:
            validate(expr, "UTC")
        assert ei.value.field == "schedule"
        assert str(ei.value) == f"schedule: {expr!r} never fires"

    @pytest.mark.parametrize(
        "expr", ["61 * * * *", "* 24 * * *", "* * 32 * *", "* * * 13 *", "abc", "* * *", "1-x * * * *"]
    )
    def test_unparsable_or_out_of_range_is_refused(self, expr: str) -> None:
        with pytest.raises(ValidationError, match=r"^schedule: .* is not a valid cron expression") as ei:
            validate(expr, "UTC")
        assert ei.value.field == "schedule"

    @pytest.mark.parametrize("expr", ["", "   ", None, 5, "x" * 256])
    def test_not_an_expression_is_refused(self, expr: object) -> None:
        with pytest.raises(ValidationError) as ei:
            validate(expr, "UTC")
        assert ei.value.field == "schedule"

    def test_unknown_time_zone_is_refused(self) -> None:
        with pytest.raises(ValidationError) as ei:
            validate("* * * * *", "Mars/Base")
        assert str(ei.value) == "timezone: unknown time zone 'Mars/Base'"

    @pytest.mark.parametrize("tz", ["", "../../etc/passwd", "Europe/", None, 3, "x" * 65])
    def test_malformed_time_zone_is_refused(self, tz: object) -> None:
        with pytest.raises(ValidationError) as ei:
            validate("* * * * *", tz)
        assert ei.value.field == "timezone"

    def test_spec_validation_names_each_field(self) -> None:
        base = ScheduleSpec(name="n", cron="* * * * *", handler="h")
        assert base.validated() is base
        cases: dict[str, dict[str, Any]] = {
            "name": {"name": ""},
            "schedule": {"cron": "61 * * * *"},
            "timezone": {"timezone": "Mars/Base"},
            "handler": {"handler": "bad handler"},
            "queue": {"queue": ""},
            "concurrency_policy": {"concurrency_policy": "Replace"},
            "lock_ttl": {"lock_ttl": 0},
            "starting_deadline": {"starting_deadline": -1},
            "source": {"source": "yaml"},
        }
        for field_name, change in cases.items():
            with pytest.raises(ValidationError) as ei:
                dataclasses.replace(base, **change).validated()
            assert ei.value.field == field_name, change


def free(ctx: SyncTaskContext) -> None: ...


class TestPeriodicDecorator:
    def test_registers_schedule_and_handler(self) -> None:
        """``@app.periodic`` declares the schedule and registers a handler of the same name."""
        app = App(database_url="postgresql://x@localhost/db")

        @app.periodic("*/5 * * * *", name="cleanup", timezone=BERLIN, payload={"a": 1}, timeout=10)
        async def cleanup(ctx: TaskContext) -> None: ...

        pd = app.periodics["cleanup"]
        assert (pd.cron, pd.timezone, pd.concurrency_policy) == ("*/5 * * * *", BERLIN, "Forbid")
        assert pd.payload == {"a": 1}
        td = app.handlers["cleanup"]
        assert td.is_async and td.timeout == 10
        assert td.func is not cleanup  # wrapped in the job lock under Forbid

    def test_allow_registers_the_function_itself(self) -> None:
        bp = Blueprint()

        bp.periodic("* * * * *", name="free", concurrency_policy="Allow")(free)
        assert bp.handlers["free"].func is free
        assert not bp.handlers["free"].is_async

    @pytest.mark.parametrize(
        ("kwargs", "field_name"),
        [
            ({"cron": "0 0 31 2 *"}, "schedule"),
            ({"cron": "61 * * * *"}, "schedule"),
            ({"timezone": "Mars/Base"}, "timezone"),
            ({"concurrency_policy": "Replace"}, "concurrency_policy"),
            ({"lock_ttl": 0}, "lock_ttl"),
            ({"starting_deadline": -5}, "starting_deadline"),
            ({"name": "has space"}, "name"),
        ],
    )
    def test_refuses_bad_arguments_at_declaration(self, kwargs: dict[str, object], field_name: str) -> None:
        """A schedule that cannot be computed is refused before anything is registered."""
        bp = Blueprint()
        args: dict[str, object] = {"cron": "* * * * *", "name": "job"} | kwargs
        cron = args.pop("cron")
        with pytest.raises(ValidationError) as ei:
            bp.periodic(cron, **args)(noop)  # type: ignore[arg-type]
        assert ei.value.field == field_name
        assert not bp.periodics and not bp.handlers

    def test_duplicate_name_is_refused(self) -> None:
        bp = Blueprint()
        bp.periodic("* * * * *", name="job")(noop)
        with pytest.raises(ValidationError, match="already declared"):
            bp.periodic("*/2 * * * *", name="job")(noop)

    def test_blueprint_periodics_merge_into_the_app(self) -> None:
        """Merged Forbid periodics take their lock through the App they were merged into."""
        bp = Blueprint()
        bp.periodic("* * * * *", name="job")(noop)
        app = App(database_url="postgresql://x@localhost/db")
        app.add_tasks_from(bp)
        assert app.periodics["job"] is bp.periodics["job"]
        assert app.handlers["job"].func is not bp.handlers["job"].func
        assert app.handlers["job"].is_async
        with pytest.raises(ValidationError):
            app.add_tasks_from(bp)


class TestNextTick:
    def test_strictly_after(self) -> None:
        assert next_tick("*/30 * * * *", "UTC", utc(2025, 1, 1, 0, 30)) == utc(2025, 1, 1, 1, 0)
        assert next_tick("*/30 * * * *", "UTC", utc(2025, 1, 1, 0, 29, 59, 999999)) == utc(2025, 1, 1, 0, 30)
        assert next_tick("* * * * * */5", "UTC", utc(2025, 1, 1, 0, 0, 0, 500000)) == utc(2025, 1, 1, 0, 0, 5)

    def test_prev_is_at_or_before(self) -> None:
        assert prev_tick("*/30 * * * *", "UTC", utc(2025, 1, 1, 1, 0)) == utc(2025, 1, 1, 1, 0)
        assert prev_tick("*/30 * * * *", "UTC", utc(2025, 1, 1, 0, 59, 59)) == utc(2025, 1, 1, 0, 30)

    def test_naive_instants_are_refused(self) -> None:
        with pytest.raises(ValueError, match="timezone-aware"):
            next_tick("* * * * *", "UTC", datetime(2025, 1, 1))

    def test_the_31st_skips_short_months(self) -> None:
        assert series("0 0 31 * *", "UTC", utc(2025, 1, 1), 4) == [
            utc(2025, 1, 31), utc(2025, 3, 31), utc(2025, 5, 31), utc(2025, 7, 31),
        ]  # fmt: skip

    def test_last_day_of_month(self) -> None:
        """``L`` is the last day of each month, February of leap years included."""
        assert series("0 12 L * *", "UTC", utc(2023, 12, 31, 13), 4) == [
            utc(2024, 1, 31, 12), utc(2024, 2, 29, 12), utc(2024, 3, 31, 12), utc(2024, 4, 30, 12),
        ]  # fmt: skip
        assert next_tick("0 12 L 2 *", "UTC", utc(2025, 1, 1)) == utc(2025, 2, 28, 12)

    def test_february_29th_waits_for_a_leap_year(self) -> None:
        assert next_tick("0 0 29 2 *", "UTC", utc(2024, 3, 1)) == utc(2028, 2, 29)

    def test_month_end_in_a_time_zone(self) -> None:
        """Midnight on the 1st in Berlin is still the 31st (or 30th) in UTC."""
        assert series("0 0 1 * *", BERLIN, utc(2025, 1, 15), 3) == [
            utc(2025, 1, 31, 23), utc(2025, 2, 28, 23), utc(2025, 3, 31, 22),  # CET, CET, CEST
        ]  # fmt: skip
        assert next_tick("59 23 31 12 *", NEW_YORK, utc(2025, 6, 1)) == utc(2026, 1, 1, 4, 59)


class TestDaylightSaving:
    """Spring: 02:00-03:00 local does not exist. Autumn: 02:00-03:00 (Berlin) or
    01:00-02:00 (New York) happens twice. Every tick is a distinct UTC instant."""

    def test_berlin_spring_daily_time_in_the_gap_runs_at_the_gap_end(self) -> None:
        """2025-03-30: a 02:30 job runs once, at 03:00 CEST (01:00 UTC)."""
        assert series("30 2 * * *", BERLIN, utc(2025, 3, 29, 12), 3) == [
            utc(2025, 3, 30, 1, 0),  # 03:00 CEST
            utc(2025, 3, 31, 0, 30),  # 02:30 CEST
            utc(2025, 4, 1, 0, 30),
        ]

    def test_berlin_spring_hourly_skips_the_missing_hour(self) -> None:
        assert series("0 * * * *", BERLIN, local(BERLIN, 2025, 3, 30, 0, 30), 3) == [
            local(BERLIN, 2025, 3, 30, 1),  # 00:00 UTC
            local(BERLIN, 2025, 3, 30, 3),  # 01:00 UTC: no 02:00 that day
            local(BERLIN, 2025, 3, 30, 4),
        ]

    def test_berlin_autumn_daily_time_in_the_repeat_runs_twice(self) -> None:
        """2025-10-26: 02:30 happens at 00:30 UTC (CEST) and again at 01:30 UTC (CET); croniter runs both."""
        assert series("30 2 * * *", BERLIN, utc(2025, 10, 25, 12), 3) == [
            utc(2025, 10, 26, 0, 30),
            utc(2025, 10, 26, 1, 30),
            utc(2025, 10, 27, 1, 30),
        ]

    def test_berlin_autumn_hourly_runs_every_utc_hour_once(self) -> None:
        """The day has 25 hours, so an hourly job runs 25 times, one per UTC hour."""
        day = ticks_between("0 * * * *", BERLIN, local(BERLIN, 2025, 10, 26) - timedelta(seconds=1),
                            local(BERLIN, 2025, 10, 27) - timedelta(seconds=1))  # fmt: skip
        assert len(day) == 25
        assert [b - a for a, b in itertools.pairwise(day)] == [timedelta(hours=1)] * 24

    def test_berlin_outside_the_change_is_unaffected(self) -> None:
        assert series("0 3 * * *", BERLIN, utc(2025, 10, 25, 12), 2) == [
            utc(2025, 10, 26, 2),  # 03:00 CET
            utc(2025, 10, 27, 2),
        ]

    def test_new_york_spring(self) -> None:
        """2025-03-09: 02:30 EST does not exist; the job runs at 03:00 EDT (07:00 UTC)."""
        assert series("30 2 * * *", NEW_YORK, utc(2025, 3, 8, 12), 2) == [
            utc(2025, 3, 9, 7, 0),
            utc(2025, 3, 10, 6, 30),
        ]
        assert series("0 * * * *", NEW_YORK, local(NEW_YORK, 2025, 3, 9, 0, 30), 3) == [
            utc(2025, 3, 9, 6), utc(2025, 3, 9, 7), utc(2025, 3, 9, 8),  # 01:00 EST, 03:00 EDT, 04:00 EDT
        ]  # fmt: skip

    def test_new_york_autumn(self) -> None:
        """2025-11-02: 01:30 happens at 05:30 UTC (EDT) and at 06:30 UTC (EST)."""
        assert series("30 1 * * *", NEW_YORK, utc(2025, 11, 1, 12), 3) == [
            utc(2025, 11, 2, 5, 30),
            utc(2025, 11, 2, 6, 30),
            utc(2025, 11, 3, 6, 30),
        ]
        second_0145 = local(NEW_YORK, 2025, 11, 2, 1, 45, fold=1)
        assert next_tick("30 1 * * *", NEW_YORK, second_0145) == utc(2025, 11, 3, 6, 30)

    @pytest.mark.parametrize("day", [(3, 8), (3, 29), (10, 25), (11, 1)])  # both changes of both zones
    def test_the_remembered_next_tick_is_next_tick(self, day: tuple[int, int]) -> None:
        """What the status list shows as the next run (remembered until it passes) is next_tick's
        answer at every instant: expressions and zones sharing the memory, through DST changes,
        and with the clock stepping back (another database's now())."""
        cron._NEXT.clear()
        exprs = [("*/30 * * * *", BERLIN), ("30 1 * * *", NEW_YORK), ("30 2 * * *", NEW_YORK),
                 ("0 * * * *", BERLIN), ("* * * * * */20", "UTC"), ("0 0 L * *", NEW_YORK)]  # fmt: skip
        t = utc(2025, *day)
        step = timedelta(minutes=11, seconds=13, microseconds=500)
        for i in range(3 * 24 * 6):  # three days around the change, in uneven steps
            t += step if i % 50 else -13 * step
            for expr, tz in exprs:
                assert cron._next_tick_cached(expr, tz, t) == next_tick(expr, tz, t), (expr, tz, t)
        assert len(cron._NEXT) == len(exprs)

    @pytest.mark.parametrize("tz", [BERLIN, NEW_YORK])
    @pytest.mark.parametrize("expr", ["*/30 * * * *", "0 * * * *", "30 2 * * *", "15 1 * * *", "0 0 L * *"])
    @pytest.mark.parametrize("window", [(2025, 3), (2025, 10)])  # both changes of both zones
    def test_walking_back_finds_the_same_ticks(self, tz: str, expr: str, window: tuple[int, int]) -> None:
        """due_ticks walks back from now; it must see exactly the ticks a forward walk sees."""
        start = utc(window[0], window[1], 1)
        end = start + timedelta(days=40)
        forward = ticks_between(expr, tz, start, end)
        back = []
        t = prev_tick(expr, tz, end)
        while t > start:
            back.append(t)
            t = prev_tick(expr, tz, t - timedelta(microseconds=1))
        assert list(reversed(back)) == forward
        assert len(set(forward)) == len(forward)


class TestDueTicks:
    EVERY_MIN = "* * * * *"

    def test_nothing_due_before_the_next_tick(self) -> None:
        d = due_ticks(self.EVERY_MIN, "UTC", utc(2025, 1, 1, 0, 0), utc(2025, 1, 1, 0, 0, 59), None)
        assert d == Due(None)
        assert not due_ticks(self.EVERY_MIN, "UTC", utc(2025, 1, 1, 0, 1), utc(2025, 1, 1, 0, 0), None)

    def test_a_tick_at_exactly_now_is_due_once(self) -> None:
        d = due_ticks(self.EVERY_MIN, "UTC", utc(2025, 1, 1, 0, 0), utc(2025, 1, 1, 0, 1), 0)
        assert d == Due(utc(2025, 1, 1, 0, 1))
        assert d.newest == utc(2025, 1, 1, 0, 1)
        # With the cursor moved to it, the same instant owes nothing.
        assert not due_ticks(self.EVERY_MIN, "UTC", utc(2025, 1, 1, 0, 1), utc(2025, 1, 1, 0, 1), 0)

    def test_on_time_tick_runs(self) -> None:
        d = due_ticks(self.EVERY_MIN, "UTC", utc(2025, 1, 1, 0, 0), utc(2025, 1, 1, 0, 1, 0, 3000), 5)
        assert d.run == utc(2025, 1, 1, 0, 1) and d.missed == ()

    def test_after_downtime_only_the_newest_runs(self) -> None:
        """Ten minutes down, no deadline: one catch-up run, nine missed, none flooded."""
        d = due_ticks(self.EVERY_MIN, "UTC", utc(2025, 1, 1, 0, 0), utc(2025, 1, 1, 0, 10, 30), None)
        assert d.run == utc(2025, 1, 1, 0, 10)
        assert d.missed == tuple(utc(2025, 1, 1, 0, m) for m in range(1, 10))
        assert d.missed_count == 9 and d.newest == d.run

    def test_deadline_lets_a_late_tick_run(self) -> None:
        d = due_ticks(self.EVERY_MIN, "UTC", utc(2025, 1, 1, 0, 0), utc(2025, 1, 1, 0, 10, 30), 30)
        assert d.run == utc(2025, 1, 1, 0, 10) and d.missed_count == 9

    def test_ticks_older_than_the_deadline_are_missed(self) -> None:
        d = due_ticks(self.EVERY_MIN, "UTC", utc(2025, 1, 1, 0, 0), utc(2025, 1, 1, 0, 10, 31), 30)
        assert d.run is None
        assert d.missed == tuple(utc(2025, 1, 1, 0, m) for m in range(1, 11))
        assert d.newest == utc(2025, 1, 1, 0, 10)

    def test_deadline_boundary_is_inclusive(self) -> None:
        now = utc(2025, 1, 1, 0, 1, 30)
        assert due_ticks(self.EVERY_MIN, "UTC", utc(2025, 1, 1), now, 30).run == utc(2025, 1, 1, 0, 1)
        later = now + timedelta(microseconds=1)
        assert due_ticks(self.EVERY_MIN, "UTC", utc(2025, 1, 1), later, 30).run is None

    def test_zero_deadline_runs_only_a_tick_at_exactly_now(self) -> None:
        assert due_ticks(self.EVERY_MIN, "UTC", utc(2025, 1, 1), utc(2025, 1, 1, 0, 1), 0).run is not None
        late = due_ticks(self.EVERY_MIN, "UTC", utc(2025, 1, 1), utc(2025, 1, 1, 0, 1, 0, 1), 0)
        assert late.run is None and late.missed_count == 1

    def test_long_outage_lists_the_newest_and_counts_the_rest(self) -> None:
        """An hour of a per-second schedule: one run, the newest missed listed, all counted."""
        last, now = utc(2025, 1, 1), utc(2025, 1, 1, 1)
        d = due_ticks("* * * * * *", "UTC", last, now, None, limit=100)
        assert d.run == now
        assert len(d.missed) == 100 and d.missed[-1] == now - timedelta(seconds=1)
        assert d.missed[0] == now - timedelta(seconds=100)
        assert d.missed_count == 3600 - 1

    def test_counting_a_very_long_outage_is_bounded(self) -> None:
        """Past count_limit the older missed ticks are a lower bound, not a minute of CPU."""
        d = due_ticks("* * * * * *", "UTC", utc(2025, 1, 1), utc(2025, 2, 1), None, limit=10, count_limit=500)
        assert d.run == utc(2025, 2, 1)
        assert len(d.missed) == 10
        assert 500 <= d.missed_count <= 520

    def test_outage_across_the_autumn_change(self) -> None:
        """Down from 01:30 to 03:30 Berlin on 2025-10-26: three hours of ticks (02:00 twice), newest runs."""
        down, up = local(BERLIN, 2025, 10, 26, 1, 30), local(BERLIN, 2025, 10, 26, 3, 30)
        d = due_ticks("0 * * * *", BERLIN, down, up, 600)
        assert d.run is None
        assert d.missed == (utc(2025, 10, 26, 0), utc(2025, 10, 26, 1), utc(2025, 10, 26, 2))

    def test_due_across_the_spring_change(self) -> None:
        """The 02:30 Berlin job, due at 03:00 CEST, runs if the scheduler gets there by the deadline."""
        last = utc(2025, 3, 29, 12)
        assert due_ticks("30 2 * * *", BERLIN, last, utc(2025, 3, 30, 1, 0, 5), 10).run == utc(2025, 3, 30, 1)
        assert due_ticks("30 2 * * *", BERLIN, last, utc(2025, 3, 30, 0, 59, 59), 10).run is None

    def test_monthly_after_a_long_outage(self) -> None:
        d = due_ticks("0 0 31 * *", "UTC", utc(2025, 1, 1), utc(2025, 8, 1), None)
        assert d.run == utc(2025, 7, 31)
        assert d.missed == (utc(2025, 1, 31), utc(2025, 3, 31), utc(2025, 5, 31))


class TestTags:
    def test_tick_tag_round_trip(self) -> None:
        for t in (utc(2025, 1, 1, 3, 4, 5), utc(2025, 1, 1, 3, 4, 5, 123456)):
            assert tick_of([tick_tag(t), "other"]) == t
        assert tick_of(["cron:x"]) is None

    def test_tags_name_the_schedule_when_they_can(self) -> None:
        t = utc(2025, 1, 1)
        assert run_tags("nightly", t) == ["cron:nightly", "tick:2025-01-01T00:00:00Z"]
        assert run_tags("ns/nightly", t) == ["tick:2025-01-01T00:00:00Z"]
        assert run_tags("x" * 100, t) == ["tick:2025-01-01T00:00:00Z"]

    def test_lock_name_fits_the_lock_limit(self) -> None:
        assert lock_name("nightly") == "cron:nightly"
        long_a, long_b = "a" * 253, "a" * 252 + "b"
        assert len(lock_name(long_a)) <= 255
        assert lock_name(long_a) != lock_name(long_b)


def test_the_installed_croniter_is_one_these_tests_passed_on() -> None:
    """pyproject pins croniter to versions whose DST maths this file passed on (6.1.0 to
    7.0.0; 3.0.0 busy-loops, 3.0.1-6.0.0 put DST-crossing ticks an hour off): these tests
    must be running on one of them, not on a version that slipped past the pin."""
    from importlib.metadata import version

    major, minor = (int(p) for p in version("croniter").split(".")[:2])
    assert (6, 1) <= (major, minor) < (7, 1), version("croniter")
