"""
Errors of the token API, each with the HTTP status it answers with.

Clouds and authenticators raise these; the API turns them into FireEdge's
JSON shape ``{"id": <status>, "message": ..., "data": ...}``.  The message is
shown to the user, so it says what is wrong without leaking secrets.
"""

from __future__ import annotations


class ApiError(Exception):
    """A refusal with an HTTP status and a message for the user."""

    status = 500
    title = "Internal Server Error"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: Seconds after which asking again may work (sent as ``Retry-After``); None: no advice.
        self.retry_after = retry_after


class BadRequest(ApiError):
    """The request or the console's settings cannot be used (400)."""

    status = 400
    title = "Bad Request"


class Unauthenticated(ApiError):
    """No credentials, or wrong ones (401)."""

    status = 401
    title = "Unauthorized"


class Forbidden(ApiError):
    """The user may not open this console (403)."""

    status = 403
    title = "Forbidden"


class NotFound(ApiError):
    """No such VM, console or zone (404)."""

    status = 404
    title = "Not Found"


class Conflict(ApiError):
    """The VM is in a state where the console cannot work (409)."""

    status = 409
    title = "Conflict"


class TooManyRequests(ApiError):
    """The caller is over a rate limit (429)."""

    status = 429
    title = "Too Many Requests"


class BadGateway(ApiError):
    """The cloud answered something unusable (502)."""

    status = 502
    title = "Bad Gateway"


class CloudUnavailable(ApiError):
    """The cloud could not be reached in time (503)."""

    status = 503
    title = "Service Unavailable"


class Overloaded(ApiError):
    """
    Too much work of this kind is under way to take more now (503).

    Refused at once and cheaply, with C{retry_after}, so that the work that
    is accepted finishes in a bounded time (password checks).
    """

    status = 503
    title = "Service Unavailable"
