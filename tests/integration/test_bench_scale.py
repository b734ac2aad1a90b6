"""bench/scale.py seeds what it says: the counts, rows shaped like App.enqueue_many's, an index-scan claim."""

from __future__ import annotations

from bench import scale
from bench.apps.kt_app import app as bench_app

from kubetasks import App, EnqueueRequest

# Columns that differ between any two tasks by nature (identity, clocks).
VOLATILE = {"id", "created_at", "updated_at", "run_at"}


async def test_seeding_counts_row_shape_and_claim_plan(db_url: str) -> None:
    conn = await scale.connect(db_url)
    app = App(database_url=db_url)
    app.add_tasks_from(bench_app)
    try:
        await scale.seed_finished(conn, 3000)
        assert await scale.set_pending(conn, 1200) == 1200
        c = await scale.counts(conn)
        assert (c["succeeded"], c["pending"]) == (3000, 1200)
        assert c["task_attempts"] == 0  # a success lives in its task row (0007)
        assert await scale.set_pending(conn, 500) == -700
        assert (await scale.counts(conn))["pending"] == 500

        [tid] = await app.enqueue_many([EnqueueRequest("noop")])
        real = dict(await conn.fetchrow("SELECT * FROM tasks WHERE id = $1", tid))
        seeded = dict(
            await conn.fetchrow("SELECT * FROM tasks WHERE status = 'pending' AND id <> $1 LIMIT 1", tid)
        )
        assert {k: v for k, v in seeded.items() if k not in VOLATILE} == {
            k: v for k, v in real.items() if k not in VOLATILE
        }

        plan = await scale.explain_claim(db_url, 50)
        assert plan["plan_ok"], plan["scans"]
        assert plan["claimed_rows"] == 50 and plan["plan_text"]
        assert (await scale.counts(conn))["pending"] == 501, "the EXPLAIN ANALYZE claim is rolled back"
    finally:
        await app.close()
        await conn.close()


def test_summary_keys() -> None:
    res = {
        "sizes": [10_000, 100_000, 1_000_000],
        "by_size": {
            "10k": {"jobs_per_s": 1000.0},
            "100k": {"jobs_per_s": 950.0},
            "1m": {"jobs_per_s": 900.0},
        },
    }
    assert scale.summary(res) == {
        "jobs_per_s_10k_pending": 1000.0,
        "jobs_per_s_100k_pending": 950.0,
        "jobs_per_s_1m_pending": 900.0,
        "scale_ratio_1m_vs_10k": 0.9,
    }
