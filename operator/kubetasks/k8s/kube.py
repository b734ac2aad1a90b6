"""A thin async face on the official Kubernetes client.

kopf is not a client library, so writes outside its handlers (status,
finalizers, Events, deletes) go through the official ``kubernetes`` package.
It is synchronous: every call runs in a thread so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

GROUP = "kubetasks.dev"
VERSION = "v1alpha1"
FINALIZER = "kubetasks.dev/cancel-on-delete"


def configured() -> bool:
    """Is there a cluster to talk to: in-cluster, $KUBECONFIG or ~/.kube/config?"""
    if os.environ.get("KUBETASKS_OPERATOR", "").lower() in ("0", "false", "off", "no"):
        return False
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return True
    kc = os.environ.get("KUBECONFIG")
    if kc:
        return any(Path(p).exists() for p in kc.split(os.pathsep) if p)
    return (Path.home() / ".kube" / "config").exists()


def new_api_client() -> Any:
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
        return kubernetes.client.ApiClient()
    return kubernetes.config.new_client_from_config()  # type: ignore[no-untyped-call]


class Kube:
    """The handful of calls kubetasks makes, each in a worker thread."""

    def __init__(self, api_client: Any | None = None) -> None:
        self.api = api_client if api_client is not None else new_api_client()
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.core = kubernetes.client.CoreV1Api(self.api)

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        await asyncio.to_thread(
            self.custom.patch_namespaced_custom_object_status,
            GROUP, VERSION, namespace, plural, name, {"status": status},
        )  # fmt: skip

    async def patch(self, plural: str, namespace: str, name: str, body: Any) -> None:
        """Merge patch (a dict) or JSON patch (a list) on the object itself."""
        await asyncio.to_thread(
            self.custom.patch_namespaced_custom_object, GROUP, VERSION, namespace, plural, name, body
        )

    async def delete(self, plural: str, namespace: str, name: str) -> None:
        await asyncio.to_thread(
            self.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, plural, name
        )

    async def list_pods(self, namespace: str, selector: str) -> list[str]:
        res = await asyncio.to_thread(self.core.list_namespaced_pod, namespace, label_selector=selector)
        return [p.metadata.name for p in res.items if p.metadata is not None and p.metadata.name]

    async def event(
        self,
        *,
        kind: str,
        namespace: str,
        name: str,
        uid: str,
        reason: str,
        message: str,
        warning: bool = False,
    ) -> None:
        """Post a core/v1 Event about an object (what `kubectl describe` shows)."""
        stamp = datetime.datetime.now(datetime.UTC)  # noqa: TID251 - an Event's timestamp is informational
        body = kubernetes.client.CoreV1Event(
            metadata=kubernetes.client.V1ObjectMeta(generate_name=f"{name}.", namespace=namespace),
            involved_object=kubernetes.client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}", kind=kind, name=name, namespace=namespace, uid=uid
            ),
            reason=reason,
            message=message[:1024],
            type="Warning" if warning else "Normal",
            first_timestamp=stamp,
            last_timestamp=stamp,
            count=1,
            source=kubernetes.client.V1EventSource(component="kubetasks"),
            reporting_component="kubetasks",
            reporting_instance=os.environ.get("POD_NAME", "kubetasks"),
        )
        await asyncio.to_thread(self.core.create_namespaced_event, namespace, body)


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 404


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 409
