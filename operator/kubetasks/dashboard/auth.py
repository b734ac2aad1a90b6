"""Who may read and who may write: authentication, CSRF and the read-only switch.

Three modes (``KUBETASKS_DASHBOARD_AUTH``):

* ``token`` (default): a bearer token from a Secret. Scripts send
  ``Authorization: Bearer <token>``; the page's login posts the token once and
  gets an HttpOnly, SameSite=Strict session cookie holding an HMAC of the
  token (never the token itself), so rotating the token ends every session.
  Without a token the dashboard refuses to start (``Settings.dashboard_ready``).
* ``proxy``: an authenticating proxy in front (oauth2-proxy and the like) sets
  ``KUBETASKS_DASHBOARD_USER_HEADER``; a request without it is refused. Only
  the proxy may reach the dashboard (bind it to loopback in the proxy's pod,
  or restrict it with a NetworkPolicy): the header is trusted as it comes.
* ``none``: everyone is ``anonymous``; for a trusted loopback address.

Writes (retry, cancel, pause, resume, delete, schedule actions) are refused
with 403 unless ``KUBETASKS_DASHBOARD_WRITES`` is true. A write that relies on
something the browser sends by itself (the session cookie, a proxy's session,
or nothing in mode ``none``) must also carry ``X-CSRF-Token`` equal to the
``kt_csrf`` cookie, which only a page of the dashboard's own origin can read
(double submit), and an ``Origin`` header, when present, must be the
dashboard's own. A bearer header is not sent by a browser on its own, so a
request carrying one needs neither.

Comparisons of secrets are constant-time; nothing here ever echoes a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request

from kubetasks.config import Settings

SESSION_COOKIE = "kt_session"
CSRF_COOKIE = "kt_csrf"
CSRF_HEADER = "X-CSRF-Token"
_SESSION_CONTEXT = b"kubetasks-dashboard-session-v1"


@dataclass(frozen=True)
class Principal:
    """Who is asking, and how they proved it (bearer, cookie, proxy or none)."""

    name: str
    via: str

    @property
    def ambient(self) -> bool:
        """Authenticated by something a browser attaches on its own: a write needs CSRF proof."""
        return self.via != "bearer"


class Denied(Exception):
    """Refused: ``status`` 401 (who are you?) or 403 (not allowed)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


class Auth:
    def __init__(self, settings: Settings) -> None:
        self.mode = settings.dashboard_auth
        self.writes = settings.dashboard_writes
        self.user_header = settings.dashboard_user_header
        self._token = settings.dashboard_token.encode()
        self._session = (
            hmac.new(self._token, _SESSION_CONTEXT, hashlib.sha256).hexdigest() if self._token else ""
        )

    # -- reading ---------------------------------------------------------------------------

    def authenticate(self, request: Request) -> Principal:
        """The caller, or ``Denied(401)``."""
        if self.mode == "none":
            return Principal("anonymous", "none")
        if self.mode == "proxy":
            user = request.headers.get(self.user_header, "").strip()
            if not user or len(user) > 256:
                raise Denied(
                    401, f"no user: this dashboard trusts the {self.user_header} header of its proxy"
                )
            return Principal(user, "proxy")
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value:
            if self.token_ok(value.strip()):
                return Principal("token", "bearer")
            raise Denied(401, "the bearer token is not valid")
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if cookie and self._session and hmac.compare_digest(cookie, self._session):
            return Principal("token", "cookie")
        raise Denied(401, "log in: send Authorization: Bearer <token>, or use the page's login")

    def token_ok(self, token: str) -> bool:
        return bool(self._token) and hmac.compare_digest(token.encode(), self._token)

    def session_value(self) -> str:
        """The session cookie's value for a caller who presented the token."""
        return self._session

    # -- writing ---------------------------------------------------------------------------

    def check_write(self, request: Request, who: Principal) -> None:
        """``Denied(403)`` unless writes are on and, for an ambient credential, the request
        proves it comes from a page of the dashboard itself."""
        if not self.writes:
            raise Denied(
                403,
                "the dashboard is read-only (its operator may allow actions: KUBETASKS_DASHBOARD_WRITES)",
            )
        if not who.ambient:
            return
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
            raise Denied(403, "cross-origin write refused")
        sent = request.headers.get(CSRF_HEADER, "")
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if not sent or not cookie or not hmac.compare_digest(sent, cookie):
            raise Denied(403, f"missing or wrong {CSRF_HEADER}: reload the page")


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)
