"""The validating admission webhook: bad Tasks and CronJobLocks refused at apply time.

What no schema keyword can check is checked here, on CREATE and on UPDATE,
with the field named in the refusal:

* a Task's payload size (no schema keyword or CEL rule can bound the
  serialised size of a free-form object): compact JSON, UTF-8, at most
  128 KiB (the README's "Limits you can rely on");
* a CronJobLock's schedule (an expression that never fires, such as
  ``0 0 31 2 *``) and time zone (one the tz database does not know).

The same rules apply again when the operator ingests an object (a Task is
recorded failed, a CronJobLock shows Ready=False), because a webhook is
absent while no operator runs.

The chart creates the ValidatingWebhookConfiguration -- this process may only
read and patch that one object (RBAC resourceNames), to keep its caBundle
equal to the CA of the certificate it serves (``webhook_configuration``). Its
failurePolicy is the chart's ``webhook.failurePolicy`` (Ignore by default: an
operator that is down must not stop every `kubectl apply`); its
matchConditions send only creations and spec changes here, so a webhook that
is down never blocks an update of metadata -- labels, annotations,
finalizers -- whatever the policy.

Every replica serves (``webhook_port``), in this process's operator thread,
with its own aiohttp server: kopf's admission server serves only where kopf
runs, which is the leader alone. The serving certificate comes from
``webhook_cert_dir`` (tls.crt, tls.key, ca.crt, e.g. a cert-manager Secret);
without one, a throwaway CA and leaf for ``webhook_host`` are made with
openssl. The API server reaches it through the chart's Service, or by URL
(``https://127.0.0.1:<port>`` on a node without Service IPs or cluster DNS).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import ssl
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from kubetasks import validation
from kubetasks.config import Settings
from kubetasks.k8s import cronjoblocks
from kubetasks.k8s.kube import Kube

log = logging.getLogger("kubetasks.k8s.webhook")
PATH = "/validate"
#: AdmissionReviews of UPDATEs carry the object twice; the API server's own
#: request limit is 3 MiB, so nothing it sends is refused for size here.
MAX_REVIEW_BYTES = 8 * 1024 * 1024


def cr_payload_bytes(payload: Any) -> int:
    """The size rule for Task objects: compact JSON, UTF-8, as the README's limits define it."""
    return len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())


def payload_error(spec: dict[str, Any] | Any) -> str | None:
    """The refusal message for a Task spec, or None when it is acceptable."""
    size = cr_payload_bytes((spec or {}).get("payload") or {})
    if size > validation.CR_PAYLOAD_MAX_BYTES:
        return (
            f"spec.payload: is {size} bytes as JSON; the limit for a Task object is "
            f"{validation.CR_PAYLOAD_MAX_BYTES} bytes (larger payloads go through the Python API)"
        )
    return None


def review(request: dict[str, Any], default_queue: str) -> dict[str, Any]:
    """The AdmissionReview response for one AdmissionReview request."""
    req = request.get("request") or {}
    uid = req.get("uid", "")
    kind = (req.get("kind") or {}).get("kind")
    obj = req.get("object") or {}
    old = req.get("oldObject") or {}
    spec = obj.get("spec") or {}
    error: str | None = None
    changed = req.get("operation") == "CREATE" or spec != (old.get("spec") or {})
    if changed and kind == "Task":
        error = payload_error(spec)
    elif changed and kind == "CronJobLock":
        meta = obj.get("metadata") or {}
        error = cronjoblocks.spec_error(
            req.get("namespace") or meta.get("namespace") or "", meta.get("name") or "x", spec, default_queue
        )
    response: dict[str, Any] = {"uid": uid, "allowed": error is None}
    if error is not None:
        response["status"] = {"code": 422, "reason": "Invalid", "message": error}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def make_certs(directory: Path, host: str) -> tuple[Path, Path, Path]:
    """A CA and a serving certificate for ``host`` (an IP or DNS name), made with openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "tls.key", directory / "tls.csr", directory / "tls.crt"
    try:
        ipaddress.ip_address(host)
        san = f"IP:{host}"
    except ValueError:
        san = f"DNS:{host}"
    ext = directory / "san.cnf"
    ext.write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
    )

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca_crt),
            "-days", "365", "-subj", "/CN=kubetasks-webhook-ca")  # fmt: skip
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={host}"
    )
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(crt), "-days", "365", "-extfile", str(ext))  # fmt: skip
    return crt, key, ca_crt


#: Given an admitted Task's spec, a warning for kubectl to print (None: nothing to say).
Advice = Callable[[dict[str, Any]], Awaitable[str | None]]


class WebhookServer:
    """Serves the webhook and keeps the configuration's caBundle equal to our CA."""

    def __init__(self, settings: Settings, kube: Kube | None, advise: Advice | None = None) -> None:
        self.settings = settings
        self.kube = kube
        self.advise = advise
        self.reviews = 0
        cert_dir = Path(settings.webhook_cert_dir) if settings.webhook_cert_dir else None
        if cert_dir is not None and (cert_dir / "tls.crt").exists():
            self.crt, self.key, self.ca = cert_dir / "tls.crt", cert_dir / "tls.key", cert_dir / "ca.crt"
        else:
            host = settings.webhook_host or settings.webhook_addr
            self.crt, self.key, self.ca = make_certs(
                Path(tempfile.mkdtemp(prefix="kubetasks-webhook-")), host
            )
        self._loaded: tuple[float, float] | None = None
        self.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._load()

    def _load(self) -> bool:
        """(Re)load the serving certificate when its files changed (cert-manager rotates them)."""
        stamp = (self.crt.stat().st_mtime, self.key.stat().st_mtime)
        if stamp == self._loaded:
            return False
        self.ssl.load_cert_chain(str(self.crt), str(self.key))
        self._loaded = stamp
        return True

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return web.json_response({"error": f"not an AdmissionReview: {exc}"}, status=400)
        self.reviews += 1
        out = review(body, self.settings.default_queue)
        req = body.get("request") or {}
        if (
            self.advise is not None
            and out["response"]["allowed"]
            and (req.get("kind") or {}).get("kind") == "Task"
        ):
            try:
                warning = await self.advise((req.get("object") or {}).get("spec") or {})
            except Exception as exc:  # advice must never turn into a refusal
                log.debug("no admission warning: %r", exc)
                warning = None
            if warning:
                out["response"]["warnings"] = [warning]
        return web.json_response(out)

    async def run(self, stop: asyncio.Event) -> None:
        app = web.Application(client_max_size=MAX_REVIEW_BYTES)
        app.router.add_post(PATH, self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(
            runner, self.settings.webhook_addr, self.settings.webhook_port, ssl_context=self.ssl
        )
        await site.start()
        log.info(
            "admission webhook on https://%s:%d%s",
            self.settings.webhook_addr,
            self.settings.webhook_port,
            PATH,
        )
        try:
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    self._load()
                if self.kube is not None and self.settings.webhook_configuration:
                    try:
                        await inject_ca(self.kube, self.settings.webhook_configuration, self.ca.read_bytes())
                    except Exception as exc:
                        log.warning(
                            "could not set the caBundle of %s: %r", self.settings.webhook_configuration, exc
                        )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 30.0)
        finally:
            await runner.cleanup()


async def inject_ca(kube: Kube, name: str, ca_pem: bytes) -> int:
    """Set every webhook's caBundle in configuration ``name`` to ``ca_pem``; returns how many changed."""
    bundle = base64.b64encode(ca_pem).decode()
    cfg = await kube.get_webhook_configuration(name)
    ops: list[dict[str, Any]] = []
    for i, wh in enumerate(cfg.webhooks or []):
        if (wh.client_config.ca_bundle or "") != bundle:
            # The test pins the entry: a concurrent edit of the list fails the patch instead.
            ops += [
                {"op": "test", "path": f"/webhooks/{i}/name", "value": wh.name},
                {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": bundle},
            ]
    if ops:
        await kube.patch_webhook_configuration(name, ops)
        log.info("caBundle of %s set for %d webhook(s)", name, len(ops) // 2)
    return len(ops) // 2
