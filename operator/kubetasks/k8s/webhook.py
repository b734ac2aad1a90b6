"""A validating admission webhook: the API server refuses oversized Task payloads.

No schema keyword or CEL rule can bound the serialised size of a free-form
object (CEL cannot see preserve-unknown-fields data), so the size rule of
DESIGN §7 -- compact JSON, UTF-8, at most 128 KiB -- is enforced here, and
again when a Task is ingested, because a webhook is absent while no operator
runs. The entry is registered with failurePolicy Ignore for the same reason:
an operator that crashed must not leave every `kubectl apply` of a Task
failing against a dead URL.

Enabled by ``KUBETASKS_WEBHOOK_PORT``. The serving certificate comes from
``KUBETASKS_WEBHOOK_CERT_DIR`` (tls.crt, tls.key, ca.crt, e.g. a
cert-manager Secret mounted there); without one, a throwaway CA and leaf for
the webhook host are made with openssl (kopf's own self-signing depends on
oscrypto, which cannot load OpenSSL 3).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import kopf

from kubetasks import validation
from kubetasks.k8s.kube import GROUP, VERSION

log = logging.getLogger("kubetasks.k8s.webhook")
CONFIGURATION_NAME = "kubetasks.dev"


def cr_payload_bytes(payload: Any) -> int:
    """The size rule for Task objects: compact JSON, UTF-8, as DESIGN §7 defines it."""
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


def register(registry: kopf.OperatorRegistry) -> bool:
    """Register the webhook when KUBETASKS_WEBHOOK_PORT is set; True if it was."""
    port = os.environ.get("KUBETASKS_WEBHOOK_PORT")
    if not port:
        return False
    addr = os.environ.get("KUBETASKS_WEBHOOK_ADDR", "127.0.0.1")
    host = os.environ.get("KUBETASKS_WEBHOOK_HOST", addr)
    cert_dir = os.environ.get("KUBETASKS_WEBHOOK_CERT_DIR")
    if cert_dir and (Path(cert_dir) / "tls.crt").exists():
        crt, key, ca = Path(cert_dir) / "tls.crt", Path(cert_dir) / "tls.key", Path(cert_dir) / "ca.crt"
    else:
        crt, key, ca = make_certs(Path(tempfile.mkdtemp(prefix="kubetasks-webhook-")), host)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.admission.server = kopf.WebhookServer(
            addr=addr, port=int(port), host=host, certfile=str(crt), pkeyfile=str(key), cafile=str(ca)
        )
        settings.admission.managed = CONFIGURATION_NAME

    @kopf.on.validate(
        GROUP,
        VERSION,
        "tasks",
        id="payload-size",
        operations=["CREATE"],
        ignore_failures=True,
        registry=registry,
    )
    def task_payload_size(spec: Any, **_: Any) -> None:
        error = payload_error(spec)
        if error:
            raise kopf.AdmissionError(error, code=422)

    log.info("admission webhook on https://%s:%s (configuration %s)", host, port, CONFIGURATION_NAME)
    return True
