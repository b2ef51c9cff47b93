"""What a failure talking to a backend means for the client: each aiohttp or timeout error as
the proxy's error (``classify``), and which failures are worth a retry on a fresh connection
(``STALE``)."""

from __future__ import annotations

import os

import aiohttp

from imageworks.chat_proxy.errors import BackendTimeout, BackendUnavailable, ProxyError


class StreamBroken(Exception):
    """The backend ended an event stream without ``[DONE]``."""


FAILURES = (aiohttp.ClientError, TimeoutError, StreamBroken)


# A reused connection found dead as the request was written or before any answer came.
STALE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


def classify(exc: BaseException, url: object, during: str, model: str | None = None) -> ProxyError:
    """The failure as our error. The address goes in parentheses, which API clients never see
    (``ProxyError.body``: ``public_text``); admins see it redacted."""
    who = f"the backend of model {model!r}" if model else "the backend"
    where = f" ({url})"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return BackendUnavailable(f"timed out connecting to {who}{where}")
    if isinstance(exc, TimeoutError):
        return BackendTimeout(f"{who} sent nothing for too long {during}{where}")
    if isinstance(exc, aiohttp.ClientSSLError):
        return BackendUnavailable(f"TLS with {who} failed{where}: {type(exc).__name__}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        code = exc.os_error.errno
        reason = os.strerror(code) if code else type(exc.os_error).__name__
        error = BackendUnavailable(f"cannot connect to {who}{where}: {reason}")
        error.unreached = True  # nothing answered there: worth a look at the engine
        return error
    if isinstance(exc, aiohttp.ClientResponseError):  # a head aiohttp could not parse
        return BackendUnavailable(f"{who} sent a malformed response {during}{where}")
    detail = type(exc).__name__ if isinstance(exc, aiohttp.ClientError) else str(exc)
    return BackendUnavailable(f"the connection to {who} failed {during}{where}: {detail}")
