"""
The seams of consoleproxy.

The token API talks to an L{IAuthenticator} (who is asking?) and an L{ICloud}
(what may they open, and where is it?).  The embedded inventory implements
both; the OpenNebula backend implements them against oned.  Neither the API
nor the relay knows which one it has.
"""

from __future__ import annotations

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
