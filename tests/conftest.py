"""Fixtures shared by every suite: real PostgreSQL and Redis from `kubetasks dev`.

One server pair per test session (the same harness as `make dev`); each test
gets its own database cloned from a migrated template, so tests never see
each other's rows. If a server cannot start, the tests that need it fail with
the reason -- nothing is skipped.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kubetasks import devenv
from kubetasks.app import App
from kubetasks.store import migrate
from tests import support

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("KUBETASKS_RUN_DIR", str(ROOT / ".run"))
for _var in [v for v in os.environ if v.startswith("KUBETASKS_") and v != "KUBETASKS_RUN_DIR"]:
    del os.environ[_var]  # a developer's exported settings must not leak into tests


@pytest.fixture(scope="session")
def dev_state() -> devenv.DevState:
    try:
        return devenv.up()
    except devenv.DevEnvError as exc:
        pytest.fail(f"could not start the local PostgreSQL/Redis: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def template_db(dev_state: devenv.DevState) -> Iterator[str]:
    name = f"kt_template_{os.getpid()}"

    async def make() -> None:
        await support.create_database(dev_state.admin_url(), name, replace=True)
        await migrate(dev_state.admin_url(name))

    asyncio.run(make())
    yield name
    asyncio.run(support.drop_database(dev_state.admin_url(), name))


async def create_db(dev_state: devenv.DevState, template: str | None) -> str:
    name = f"kt_{uuid.uuid4().hex[:12]}"
    # Tests check logic, not durability: skip the WAL flush wait.
    await support.create_database(
        dev_state.admin_url(), name, template=template, settings={"synchronous_commit": "off"}
    )
    return name


async def drop_db(dev_state: devenv.DevState, name: str) -> None:
    await support.drop_database(dev_state.admin_url(), name)


@pytest.fixture
async def db_url(dev_state: devenv.DevState, template_db: str) -> AsyncIterator[str]:
    name = await create_db(dev_state, template_db)
    yield dev_state.admin_url(name)
    await drop_db(dev_state, name)


@pytest.fixture
def redis_url(dev_state: devenv.DevState) -> str:
    return dev_state.redis_url


@pytest.fixture
async def app(db_url: str) -> AsyncIterator[App]:
    a = App(database_url=db_url, pod_id="test-pod", heartbeat_interval=0.5, lease_ttl=2.0)
    await a.open()
    yield a
    await a.close()
