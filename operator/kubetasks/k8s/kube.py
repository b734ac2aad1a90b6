"""A thin async face on the official Kubernetes client.

kopf is not a client library, so writes outside its handlers (status,
deletes, Events, the webhook's CA) go through the official ``kubernetes``
package. It is synchronous: every call runs in a thread so the event loop
never blocks.

Every write about one object is tied to that object's uid, never to its name
alone: `kubectl replace --force` gives a name a new object, and a status or
a delete meant for the old one must not land on it. Status is written with a
JSON patch whose first operation tests ``/metadata/uid`` (the status
subresource ignores ``metadata.uid`` in a merge patch); deletes carry a uid
precondition. Either way an object that was replaced reads as gone
(:class:`ObjectGone`).
"""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import kubernetes
from kubernetes.client.exceptions import ApiException

if TYPE_CHECKING:
    pass

GROUP = "kubetasks.dev"
VERSION = "v1alpha1"
#: The finalizer older versions held on unfinished Tasks; removed wherever it is seen.
FINALIZER = "kubetasks.dev/cancel-on-delete"
JSON_PATCH = "application/json-patch+json"
LIST_PAGE = 500


class ObjectGone(Exception):
    """The object is gone, or its name now belongs to another object (another uid)."""


def new_api_client() -> Any:
    """In a pod, the in-cluster configuration (the client reads the service variables itself);
    elsewhere, the kubeconfig."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        return kubernetes.config.new_client_from_config()  # type: ignore[no-untyped-call]
    return kubernetes.client.ApiClient()


class Kube:
    """The handful of calls kubetasks makes, each in a worker thread."""

    def __init__(
        self, api_client: Any | None = None, *, request_timeout: float = 20.0, instance: str = "kubetasks"
    ) -> None:
        self.api = api_client if api_client is not None else new_api_client()
        #: The events' reportingInstance: this pod's name.
        self.instance = instance
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.admission = kubernetes.client.AdmissionregistrationV1Api(self.api)
        # A call never waits longer than this for the API server (an outage must
        # not pin a thread of the pool for the TCP timeout).
        self.timeout = request_timeout

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", self.timeout)
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def patch_status(
        self, plural: str, namespace: str, name: str, uid: str, status: dict[str, Any]
    ) -> None:
        """Replace the whole status of the object ``name`` if it still has ``uid``."""
        await self.patch_status_ops(
            plural, namespace, name, uid, [{"op": "add", "path": "/status", "value": status}]
        )

    async def patch_status_keys(
        self, plural: str, namespace: str, name: str, uid: str, keys: dict[str, Any], *, has_status: bool
    ) -> None:
        """Set some keys of the status (others stay) if the object still has ``uid``."""
        ops: list[dict[str, Any]] = [] if has_status else [{"op": "add", "path": "/status", "value": {}}]
        ops += [{"op": "add", "path": f"/status/{k}", "value": v} for k, v in keys.items()]
        await self.patch_status_ops(plural, namespace, name, uid, ops)

    async def patch_status_ops(
        self, plural: str, namespace: str, name: str, uid: str, ops: list[dict[str, Any]]
    ) -> None:
        body = [{"op": "test", "path": "/metadata/uid", "value": uid}, *ops]
        try:
            await self._call(
                self.custom.patch_namespaced_custom_object_status,
                GROUP, VERSION, namespace, plural, name, body, _content_type=JSON_PATCH,
            )  # fmt: skip
        except ApiException as exc:
            await self._raise_gone(exc, plural, namespace, name, uid)
            raise

    async def patch(self, plural: str, namespace: str, name: str, body: Any) -> None:
        """Merge patch (a dict) on the object itself; callers put a resourceVersion in it."""
        await self._call(
            self.custom.patch_namespaced_custom_object, GROUP, VERSION, namespace, plural, name, body
        )

    async def delete(self, plural: str, namespace: str, name: str, uid: str) -> None:
        """Delete the object ``name`` only if it still has ``uid``."""
        try:
            await self._call(
                self.custom.delete_namespaced_custom_object,
                GROUP, VERSION, namespace, plural, name, body={"preconditions": {"uid": uid}},
            )  # fmt: skip
        except ApiException as exc:
            if exc.status in (404, 409):
                raise ObjectGone(f"{plural} {namespace}/{name} (uid {uid})") from exc
            raise

    async def _raise_gone(self, exc: ApiException, plural: str, namespace: str, name: str, uid: str) -> None:
        if exc.status == 404:
            raise ObjectGone(f"{plural} {namespace}/{name} (uid {uid})") from exc
        if exc.status == 422:
            # A failed `test` and a status the schema refuses both answer 422:
            # only a look at the object tells which.
            try:
                now = await self._call(
                    self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, plural, name
                )
            except ApiException as exc2:
                if exc2.status == 404:
                    raise ObjectGone(f"{plural} {namespace}/{name} (uid {uid})") from exc
                raise exc from None
            if now["metadata"]["uid"] != uid:
                raise ObjectGone(f"{plural} {namespace}/{name} (uid {uid}) was replaced") from exc

    async def list_objects(self, plural: str, namespaces: tuple[str, ...]) -> list[dict[str, Any]]:
        """Every object of ``plural`` in ``namespaces`` (empty: every namespace), page by page."""
        out: list[dict[str, Any]] = []
        for ns in namespaces or (None,):
            token: str | None = None
            while True:
                kw: dict[str, Any] = {"limit": LIST_PAGE}
                if token:
                    kw["_continue"] = token
                if ns is None:
                    raw = await self._call(
                        self.custom.list_cluster_custom_object, GROUP, VERSION, plural, **kw
                    )
                else:
                    raw = await self._call(
                        self.custom.list_namespaced_custom_object, GROUP, VERSION, ns, plural, **kw
                    )
                out.extend(raw.get("items", []))
                token = (raw.get("metadata") or {}).get("continue")
                if not token:
                    break
        return out

    async def list_pods(self, namespace: str, selector: str) -> tuple[list[dict[str, Any]], str]:
        """The pods matching ``selector`` (name and phase) and the list's resourceVersion."""
        res = await self._call(self.core.list_namespaced_pod, namespace, label_selector=selector)
        pods = [
            {"name": p.metadata.name, "phase": (p.status.phase if p.status else None)}
            for p in res.items
            if p.metadata is not None and p.metadata.name
        ]
        return pods, res.metadata.resource_version

    def watch_pods(
        self, namespace: str, selector: str, resource_version: str, stop: threading.Event, timeout: int = 30
    ) -> Iterator[tuple[str, str, str | None, str]]:
        """(type, name, phase, resourceVersion) of pod events after ``resource_version``;
        ends after ``timeout`` s.

        Blocking: run it in a thread of its own."""
        w = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
        try:
            for ev in w.stream(  # type: ignore[no-untyped-call]
                self.core.list_namespaced_pod,
                namespace,
                label_selector=selector,
                resource_version=resource_version,
                timeout_seconds=timeout,
                allow_watch_bookmarks=False,
                _request_timeout=timeout + 10,
            ):
                if stop.is_set():
                    return
                obj = ev["object"]
                if ev["type"] == "ERROR":
                    raise ApiException(status=getattr(obj, "code", None) or 500, reason=str(obj))
                phase = obj.status.phase if obj.status else None
                yield ev["type"], obj.metadata.name, phase, obj.metadata.resource_version
        finally:
            w.stop()  # type: ignore[no-untyped-call]

    async def get_webhook_configuration(self, name: str) -> Any:
        return await self._call(self.admission.read_validating_webhook_configuration, name)

    async def patch_webhook_configuration(self, name: str, ops: list[dict[str, Any]]) -> None:
        await self._call(
            self.admission.patch_validating_webhook_configuration, name, ops, _content_type=JSON_PATCH
        )

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
            reporting_instance=self.instance,
        )
        await self._call(self.core.create_namespaced_event, namespace, body)


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 404


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 409


def is_transient(exc: BaseException) -> bool:
    """An error worth retrying: the API server unreachable, overloaded or failing."""
    if isinstance(exc, ApiException):
        return exc.status is None or exc.status in (0, 408, 409, 429) or exc.status >= 500
    return isinstance(exc, OSError | TimeoutError) or type(exc).__module__.startswith("urllib3")
