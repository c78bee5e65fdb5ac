"""
The live sessions API: ``GET /api/sessions``, ``DELETE /api/sessions/<id>``.

``GET`` lists the open console sessions: every one for an administrator,
the caller's own for anyone else.  ``DELETE`` ends one at once; it is for
administrators only (403 for anyone else, the owner included: a user ends
their own session by closing its page).  The caller authenticates as for the
token API (HTTP Basic, or OpenNebula's Bearer login token), through the same
password checks (their pool, queue and failed-login budget) and the same
per-client rate limit (web/site.py); the role comes from L{IRoles}, asked
only here (for OpenNebula: one ``one.user.info`` call, cached briefly).

Answers have the token API's shape, ``{"id": 200, "message": "OK", "data": ...}``,
and its errors: 400 (a session id that is not 32 lowercase hex digits), 401
(with the Basic challenge), 403, 404 (no such open session), 429, 503.  Each
kill is logged and written to the audit log (who ended which session).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.logger import Logger
from twisted.web.server import Request

from consoleproxy.consoles import Identity
from consoleproxy.errors import ApiError, BadRequest, Forbidden
from consoleproxy.interfaces import IAuthenticator, ILiveSessions, IRoles, LiveSession
from consoleproxy.net.logsafe import log_safe
from consoleproxy.net.routing import client_of, json_body
from consoleproxy.web.api import refusal_headers

#: A session id: what relays mint (uuid4().hex).
SESSION_ID = re.compile(r"[0-9a-f]{32}", re.ASCII)

#: Told of each kill: (administrator, the ended session, the requester's address).
KillObserver = Callable[[str, LiveSession, str], None]


def session_json(session: LiveSession) -> dict[str, Any]:
    """A session as the API shows it (``started``: POSIX seconds)."""
    return dict(vars(session))  # its fields (asdict's deep copy is 5x slower)


class SessionsApi:
    """Lists and ends live sessions for authenticated users, by role."""

    log = Logger()

    def __init__(
        self,
        authenticator: IAuthenticator,
        roles: IRoles,
        sessions: ILiveSessions,
        *,
        on_kill: KillObserver | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.roles = roles
        self.sessions = sessions
        self.on_kill = on_kill

    @inlineCallbacks
    def _caller(self, request: Request):  # type: ignore[no-untyped-def]
        """The authenticated caller, with its role."""
        identity: Identity = yield maybeDeferred(
            self.authenticator.authenticate, request.getHeader(b"authorization")
        )
        identity = yield self.roles.with_role(identity)
        return identity

    @inlineCallbacks
    def listing(self, request: Request):  # type: ignore[no-untyped-def]
        """``GET /api/sessions``: the sessions the caller may see, oldest first."""
        try:
            identity = yield self._caller(request)
            found = yield self.sessions.listing(identity)
        except ApiError as e:
            return self._refused(request, e, "list")
        return json_body(request, 200, "OK", [session_json(s) for s in found])

    @inlineCallbacks
    def end(self, request: Request, session_id: str):  # type: ignore[no-untyped-def]
        """``DELETE /api/sessions/<id>``: end the session now (administrators)."""
        try:
            if not SESSION_ID.fullmatch(session_id):
                raise BadRequest("a session id is 32 lowercase hexadecimal digits")
            identity = yield self._caller(request)
            if not identity.admin:
                raise Forbidden("ending a session is for administrators")
            ended: LiveSession = yield self.sessions.end(
                identity, session_id, f"by {identity.name}"
            )
        except ApiError as e:
            return self._refused(request, e, "end")
        client = str(client_of(request))
        self.log.info(
            "Session {id} ended by {admin}: user={user} vm={vm} type={type} peer={peer}",
            id=ended.id,
            admin=log_safe(identity.name),
            user=log_safe(ended.user),
            vm=ended.vm,
            type=ended.type,
            peer=log_safe(client),
        )
        if self.on_kill is not None:
            try:
                self.on_kill(identity.name, ended, client_of(request).host)
            except Exception:
                self.log.failure("Recording a kill failed")
        return json_body(request, 200, "OK", session_json(ended))

    def _refused(self, request: Request, e: ApiError, what: str) -> bytes:
        refusal_headers(request, e)
        self.log.info(
            "Sessions API refused ({what}): {status} {why} (peer={peer})",
            what=what,
            status=e.status,
            why=log_safe(e.message),
            peer=log_safe(str(client_of(request))),
        )
        return json_body(request, e.status, e.title, e.message)
