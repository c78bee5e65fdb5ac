"""
The seams of consoleproxy.

The token API talks to an L{IAuthenticator} (who is asking?) and an L{ICloud}
(what may they open, and where is it?).  The embedded inventory implements
both; the OpenNebula backend implements them against oned.  Neither the API
nor the relay knows which one it has.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from zope.interface import Attribute, Interface


class IAuthenticator(Interface):
    """Turns a request's credentials into an L{consoleproxy.consoles.Identity}."""

    def authenticate(authorization: bytes | None):  # type: ignore[no-untyped-def]
        """
        Check the value of the request's ``Authorization`` header.

        @param authorization: the raw header value, or C{None} when absent.
        @return: a Deferred firing with an L{Identity}, or failing with
            L{consoleproxy.errors.Unauthenticated} (bad or missing
            credentials) or L{consoleproxy.errors.CloudUnavailable}.
        """


class ICloud(Interface):
    """Knows the VMs and how to reach their consoles."""

    name = Attribute("A short name for logs, e.g. 'inventory' or 'opennebula'.")

    def console(identity, vm_id: int, console_type: str, zone: str | None):  # type: ignore[no-untyped-def]
        """
        Describe how guacd reaches one console of one VM for this user.

        @param identity: the L{Identity} from the authenticator.
        @param vm_id: the VM's numeric id.
        @param console_type: C{"vnc"}, C{"ssh"} or C{"rdp"}.
        @param zone: a zone id when the request names one, else C{None}.
        @return: a Deferred firing with a L{consoleproxy.consoles.Console},
            or failing with a L{consoleproxy.errors.ApiError}.
        """


class IConsoleDirectory(Interface):
    """
    Lists the consoles a user may open (optional: the embedded inventory can,
    OpenNebula's consoles are opened from Sunstone or FireEdge).
    """

    def listing(identity):  # type: ignore[no-untyped-def]
        """
        The user's VMs and their console types.

        @param identity: the L{Identity} from the authenticator.
        @return: a Deferred firing with a list of
            L{consoleproxy.consoles.Listing}, by VM id.
        """


class ITunnels(Interface):
    """Decides how guacd reaches a console, and provides tunnels when needed."""

    def route(console):  # type: ignore[no-untyped-def]
        """
        Find the way to a console.

        @param console: the L{consoleproxy.consoles.Console} from the token.
        @return: a Deferred firing with a L{consoleproxy.tunnels.routes.Route} whose
            C{parameters} guacd gets, or failing with a
            L{consoleproxy.guacamole.status.GuacamoleError} that says what to fix.
        """


class ISpentTokens(Interface):
    """
    Remembers which console tokens have opened a session, so that each opens
    one only: in memory (tests), in a file under the state directory (one
    server, across restarts), or in a store that several servers share.
    """

    def spend(token_id: bytes, expires: float):  # type: ignore[no-untyped-def]
        """
        Record the use of a token, atomically with the check.

        @param token_id: the token's unique id (its 12-byte nonce).
        @param expires: when the token expires (seconds since the epoch, the
            clock's): the id need not be remembered after that.
        @return: C{True} for the first use, C{False} for any later one.  The
            local stores answer at once; a shared one (Redis ``SET id 1 NX
            PXAT expires``) would answer with a Deferred firing with the
            same C{bool}, and its caller then waits for it.
        """


class IRoles(Interface):
    """
    Says whether a user is an administrator of consoleproxy, where a role
    matters (the sessions API, share links, recordings), never on every token
    request: for OpenNebula it costs an oned call (cached briefly).
    """

    def with_role(identity):  # type: ignore[no-untyped-def]
        """
        The identity with its C{admin} flag set from the cloud's facts.

        @param identity: the L{consoleproxy.consoles.Identity} from the
            authenticator.
        @return: a Deferred firing with an L{Identity} (the same user, with
            C{admin} True or False), or failing with
            L{consoleproxy.errors.Unauthenticated} (the cloud refused the
            credentials) or L{consoleproxy.errors.CloudUnavailable}.
        """


@dataclass(frozen=True)
class LiveSession:
    """
    One open console session, as the sessions API lists it.

    @ivar id: the session id (a uuid hex, unique in the cluster).
    @ivar user: who opened it.
    @ivar vm: the VM id.
    @ivar type: the console type (``vnc``, ``ssh``, ``rdp``).
    @ivar zone: the zone it was relayed to (C{""}: this one).
    @ivar client: the browser's address.
    @ivar started: POSIX time it opened.
    @ivar bytes_to_browser: bytes relayed to the browser so far (with a
        cluster, as of the holder's last renewal, at most 10 s old).
        With Redis, this is also the registry's record (cluster/registry.py).
    @ivar bytes_from_browser: bytes relayed from the browser so far.
    @ivar viewers: shared viewers joined to it now.
    @ivar recording: its recording's id, when recorded.
    @ivar worker: which process holds it (host:pid), for operators.
    """

    id: str
    user: str
    vm: str
    type: str
    zone: str
    client: str
    started: float
    bytes_to_browser: int = 0
    bytes_from_browser: int = 0
    viewers: int = 0
    recording: str | None = None
    worker: str = ""

    def to_json(self) -> str:
        """The record as the cluster's registry stores it."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> LiveSession:
        """A stored record (L{ValueError} or L{TypeError} if it is not one)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        # A newer process's record may carry more: read what this one knows.
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


class ILiveSessions(Interface):
    """
    The open console sessions (of this process, or of the whole cluster with
    Redis), and ending one: what the sessions API needs of the relays.
    """

    def listing(identity):  # type: ignore[no-untyped-def]
        """
        The sessions C{identity} may see: every one for an administrator,
        else the user's own.

        @return: a Deferred firing with a list of L{LiveSession}, oldest first.
        """

    def end(identity, session_id: str, reason: str):  # type: ignore[no-untyped-def]
        """
        End a session at once, wherever it runs (the caller checked the role).

        @return: a Deferred firing with the ended L{LiveSession}, or failing
            with L{consoleproxy.errors.NotFound} when no such session is open.
        """
