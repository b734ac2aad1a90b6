"""Retry delays grow exponentially, stay within +-10 % jitter and respect the cap."""

from __future__ import annotations

import pytest

from kubetasks.worker import retry_delay


@pytest.mark.parametrize(("attempt", "expected"), [(1, 2.0), (2, 6.0), (3, 18.0), (4, 54.0)])
def test_exponential(attempt: int, expected: float) -> None:
    for _ in range(50):
        d = retry_delay(attempt, base=2.0, backoff=3.0, cap=1000.0)
        assert expected * 0.9 <= d <= expected * 1.1


def test_capped() -> None:
    for _ in range(50):
        assert retry_delay(30, base=1.0, backoff=2.0, cap=60.0) <= 66.0
