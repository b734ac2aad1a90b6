"""Bad input is refused with a message naming the field and the limit."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import pytest

from kubetasks import App, ConfigError, EnqueueRequest, Settings, UnknownHandler, ValidationError, enqueue
from tests.handlers import noop

URL = "postgresql://u@127.0.0.1:1/db"


@pytest.fixture
def app() -> App:
    a = App(database_url=URL)

    @a.task("images.resize")
    async def resize(ctx: object) -> None: ...

    @a.task("reports.nightly")
    async def nightly(ctx: object) -> None: ...

    return a


def prepare(app: App, **kw: object) -> None:
    req = EnqueueRequest(**{"handler": "images.resize", **kw})  # type: ignore[arg-type]
    enqueue.prepare(app, req)


class TestEnqueueRefusals:
    def test_unknown_handler_lists_known(self, app: App) -> None:
        with pytest.raises(UnknownHandler) as err:
            prepare(app, handler="images.rotate")
        assert str(err.value) == (
            "handler: unknown handler 'images.rotate'; known handlers: images.resize, reports.nightly"
        )

    def test_payload_not_json_serialisable(self, app: App) -> None:
        with pytest.raises(ValidationError, match=r"^payload: is not JSON-serialisable: .*set"):
            prepare(app, payload={"ids": {1, 2}})

    def test_payload_nan_refused(self, app: App) -> None:
        with pytest.raises(ValidationError, match=r"^payload: is not JSON-serialisable"):
            prepare(app, payload={"x": math.nan})

    def test_payload_must_be_object(self, app: App) -> None:
        with pytest.raises(ValidationError, match=r"^payload: must be a JSON object \(a dict\), got list"):
            prepare(app, payload=[1, 2])

    @pytest.mark.parametrize(
        ("payload", "where"),
        [
            ({"name": "a\x00b"}, "payload.name"),
            ({"deep": {"list": ["ok", "n\x00l"]}}, r"payload.deep.list\[1\]"),
            ({"k\x00": 1}, r"payload \(a key\)"),
        ],
    )
    def test_payload_with_nul(self, app: App, payload: dict[str, object], where: str) -> None:
        with pytest.raises(ValidationError, match=rf"^{where}: contains the NUL character"):
            prepare(app, payload=payload)

    @pytest.mark.parametrize(
        ("payload", "where"),
        [
            ({"name": b"report-\xff.csv".decode("utf-8", "surrogateescape")}, "payload.name"),
            ({"deep": {"list": ["ok", "\udcff"]}}, r"payload.deep.list\[1\]"),
            ({"\ud800": 1}, r"payload \(a key\)"),
        ],
    )
    def test_payload_with_a_lone_surrogate(self, app: App, payload: dict[str, object], where: str) -> None:
        """Text decoded with surrogateescape is not UTF-8: refused naming where it is, not a
        UnicodeEncodeError from deep inside."""
        with pytest.raises(ValidationError, match=rf"^{where}: contains a lone surrogate"):
            prepare(app, payload=payload)

    def test_escaped_backslash_u0000_text_is_fine(self, app: App) -> None:
        prepare(app, payload={"literal": "\\u0000"})

    def test_payload_over_cap(self) -> None:
        a = App(database_url=URL, max_payload_bytes=2048, strict_handlers=False)
        with pytest.raises(
            ValidationError, match=r"^payload: is \d+ bytes as JSON; the limit is 2048 bytes$"
        ):
            enqueue.prepare(a, EnqueueRequest("x", {"blob": "y" * 3000}))

    @pytest.mark.parametrize(
        ("kw", "message"),
        [
            ({"delay": -1}, r"^delay: must be between 0 and 3.1536e\+07 seconds, got -1$"),
            ({"delay": 10**9}, r"^delay: must be between 0 and 3.1536e\+07 seconds"),
            ({"timeout": 0}, r"^timeout: must be between 1 and 604800 seconds, got 0$"),
            ({"timeout": 10**7}, r"^timeout: must be between 1 and 604800 seconds"),
            ({"priority": 1001}, r"^priority: must be between -1000 and 1000, got 1001$"),
            ({"priority": -5000}, r"^priority: must be between -1000 and 1000, got -5000$"),
            ({"max_attempts": 0}, r"^max_attempts: must be between 1 and 100, got 0$"),
            ({"max_attempts": 101}, r"^max_attempts: must be between 1 and 100, got 101$"),
            ({"priority": True}, r"^priority: must be an integer"),
            ({"queue": "q" * 64}, r"^queue: must be at most 63 characters, got 64$"),
            ({"queue": "has space"}, r"^queue: 'has space' has forbidden characters"),
            ({"queue": ""}, r"^queue: must not be empty$"),
            ({"tags": "one"}, r"^tags: must be a list of strings"),
            ({"tags": ["ok", "bad tag"]}, r"^tags: 'bad tag' has forbidden characters"),
            ({"dedupe_key": "k" * 256}, r"^dedupe_key: must be at most 255 characters, got 256$"),
            ({"run_at": datetime(2030, 1, 1)}, r"^run_at: must be timezone-aware"),
            ({"delay": 5, "run_at": datetime(2030, 1, 1)}, r"^delay: give delay or run_at, not both$"),
        ],
    )
    def test_out_of_range(self, app: App, kw: dict[str, object], message: str) -> None:
        with pytest.raises(ValidationError, match=message):
            prepare(app, **kw)

    def test_handler_name_too_long_or_forbidden(self, app: App) -> None:
        with pytest.raises(ValidationError, match=r"^handler: must be at most 63 characters, got 64$"):
            app.register("h" * 64, noop)
        with pytest.raises(ValidationError, match=r"^handler: 'a/b' has forbidden characters"):
            app.register("a/b", noop)
        with pytest.raises(ValidationError, match=r"^handler: 'images.resize' is already registered$"):
            app.register("images.resize", noop)

    def test_task_options_checked_at_registration(self, app: App) -> None:
        with pytest.raises(ValidationError, match=r"^timeout: must be between 1 and 604800"):
            app.register("t", noop, timeout=-3)
        with pytest.raises(ValidationError, match=r"^concurrency: must be between 1 and 10000, got 0$"):
            app.register("t", noop, concurrency=0)

    def test_unregister(self, app: App) -> None:
        app.unregister("reports.nightly")
        with pytest.raises(UnknownHandler):
            prepare(app, handler="reports.nightly")
        with pytest.raises(UnknownHandler, match=r"known handlers: images\.resize"):
            app.unregister("reports.nightly")


class TestPrecedence:
    def test_enqueue_argument_then_task_option_then_app_default(self) -> None:
        a = App(database_url=URL, default_timeout=50, default_max_attempts=4)
        a.register("opt", noop, queue="q1", timeout=20, priority=3)
        a.register("bare", noop)
        p = enqueue.prepare(a, EnqueueRequest("opt"))
        assert (p.queue, p.timeout, p.priority, p.max_attempts) == ("q1", 20, 3, 4)
        p = enqueue.prepare(a, EnqueueRequest("opt", queue="q2", timeout=5, priority=-1, max_attempts=9))
        assert (p.queue, p.timeout, p.priority, p.max_attempts) == ("q2", 5, -1, 9)
        p = enqueue.prepare(a, EnqueueRequest("bare"))
        assert (p.queue, p.timeout, p.priority, p.max_attempts) == ("default", 50, 0, 4)


class TestSettings:
    @pytest.mark.parametrize(
        ("url", "message"),
        [
            ("mysql://u@h/db", r"KUBETASKS_DATABASE_URL: must be a postgresql:// URL"),
            ("postgresql://u@h:notaport/db", r"KUBETASKS_DATABASE_URL: malformed database URL"),
            ("postgresql:///db", r"KUBETASKS_DATABASE_URL: names no host"),
            ("not a url", r"KUBETASKS_DATABASE_URL: must be a postgresql:// URL"),
            ("postgresql://u@h1:5432,h2:x/db", r"KUBETASKS_DATABASE_URL: malformed database URL"),
            ("postgresql://u@h1:5432,:5433/db", r"KUBETASKS_DATABASE_URL: names no host"),
        ],
    )
    def test_malformed_database_url(self, url: str, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            Settings.load(env={}, database_url=url)

    @pytest.mark.parametrize(
        "url",
        [
            "postgresql://u@127.0.0.1:5432,127.0.0.2:5433/db?target_session_attrs=read-write",
            "postgresql://u:p@a,b:5433/db",
            "postgresql://u@[::1]:5432,h2/db",
        ],
    )
    def test_multi_host_database_url(self, url: str) -> None:
        """libpq's failover syntax: every host is checked, and the URL reaches asyncpg as given."""
        assert Settings.load(env={}, database_url=url).database_url == url

    def test_missing_database_url(self) -> None:
        with pytest.raises(ConfigError, match=r"^KUBETASKS_DATABASE_URL: is not set"):
            Settings.load(env={})

    def test_env_parsing_and_bounds(self) -> None:
        s = Settings.load(
            env={
                "KUBETASKS_DATABASE_URL": URL,
                "KUBETASKS_QUEUES": "high, low",
                "KUBETASKS_CONCURRENCY": "25",
                "POD_NAME": "web-7d9f-x2k",
            }
        )
        assert s.queues == ("high", "low") and s.concurrency == 25 and s.pod_id == "web-7d9f-x2k"
        with pytest.raises(ConfigError, match=r"^KUBETASKS_CONCURRENCY: must be a number, got 'lots'$"):
            Settings.load(env={"KUBETASKS_DATABASE_URL": URL, "KUBETASKS_CONCURRENCY": "lots"})
        with pytest.raises(ConfigError, match=r"^KUBETASKS_LEASE_TTL: must exceed 1.5 x"):
            Settings.load(env={"KUBETASKS_DATABASE_URL": URL, "KUBETASKS_LEASE_TTL": "6"})
        with pytest.raises(ValidationError, match=r"^KUBETASKS_QUEUES: 'a b' has forbidden characters"):
            Settings.load(env={"KUBETASKS_DATABASE_URL": URL, "KUBETASKS_QUEUES": "a b"})
        assert Settings.load(env={"KUBETASKS_DATABASE_URL": URL}).claim_linger == 0.005
        off = Settings.load(env={"KUBETASKS_DATABASE_URL": URL, "KUBETASKS_CLAIM_LINGER": "0"})
        assert off.claim_linger == 0
        with pytest.raises(ConfigError, match=r"^KUBETASKS_CLAIM_LINGER: must be between 0 and 1, got 2$"):
            Settings.load(env={"KUBETASKS_DATABASE_URL": URL, "KUBETASKS_CLAIM_LINGER": "2"})

    def test_kubernetes_settings_come_from_the_settings_object(self, tmp_path: Path) -> None:
        kc = tmp_path / "config"
        env = {"KUBETASKS_DATABASE_URL": URL, "KUBECONFIG": f"{tmp_path / 'absent'}:{kc}"}
        s = Settings.load(env=env)
        assert s.operator and s.kubeconfig == env["KUBECONFIG"] and not s.kubernetes_service_host
        assert not s.kubernetes_reachable()  # neither file exists
        kc.write_text("{}")
        assert s.kubernetes_reachable()
        assert not Settings.load(env={**env, "KUBETASKS_OPERATOR": "off"}).kubernetes_reachable()
        assert Settings.load(
            env={"KUBETASKS_DATABASE_URL": URL, "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
        ).kubernetes_reachable()
        # A KUBETASKS_ prefix is not a second name for the Kubernetes variables.
        assert (
            Settings.load(env={"KUBETASKS_DATABASE_URL": URL, "KUBETASKS_KUBECONFIG": "x"}).kubeconfig == ""
        )
        with pytest.raises(ConfigError, match=r"^KUBETASKS_OPERATOR: must be true or false, got 'maybe'$"):
            Settings.load(env={"KUBETASKS_DATABASE_URL": URL, "KUBETASKS_OPERATOR": "maybe"})

    def test_metrics_server_settings(self) -> None:
        """Off by default; on with a port, or with an address file (then port 0 is any free port)."""
        base = {"KUBETASKS_DATABASE_URL": URL}
        assert not Settings.load(env=base).metrics_enabled
        s = Settings.load(env={**base, "KUBETASKS_METRICS_PORT": "9090"})
        assert s.metrics_enabled and s.metrics_addr == "0.0.0.0"
        s = Settings.load(
            env={**base, "KUBETASKS_METRICS_ADDR_FILE": "/tmp/m", "KUBETASKS_METRICS_ADDR": "127.0.0.1"}
        )
        assert s.metrics_enabled and s.metrics_port == 0 and s.metrics_addr == "127.0.0.1"
        with pytest.raises(
            ConfigError, match=r"^KUBETASKS_METRICS_PORT: must be between 0 and 65535, got 70000$"
        ):
            Settings.load(env={**base, "KUBETASKS_METRICS_PORT": "70000"})
        with pytest.raises(ConfigError, match=r"^KUBETASKS_METRICS_ADDR: must be an address to bind"):
            Settings.load(env={**base, "KUBETASKS_METRICS_ADDR": "127.0.0.1 9090"})

    def test_arguments_beat_environment(self) -> None:
        s = Settings.load(
            env={"KUBETASKS_DATABASE_URL": "mysql://bad", "KUBETASKS_CONCURRENCY": "3"},
            database_url=URL,
            concurrency=7,
        )
        assert s.database_url == URL and s.concurrency == 7


class TestCleanText:
    def test_nul_and_lone_surrogates_become_visible_escapes(self) -> None:
        from kubetasks.validation import clean_text

        out = clean_text("a\x00b " + b"\xff".decode("utf-8", "surrogateescape"), 100)
        assert out == "a\\x00b \\udcff"
        out.encode("utf-8")

    def test_capped_at_the_start_or_the_end(self) -> None:
        from kubetasks.validation import clean_text

        assert clean_text("x" * 10 + "\x00", 5) == "xxxxx"
        assert clean_text("\x00" + "y" * 10, 5, keep="tail") == "yyyyy"
        assert len(clean_text("\x00" * 100, 50)) == 50
