"""What a failure talking to a backend means for the client: each aiohttp or timeout error as
the proxy's error (``classify``), and which failures are worth a retry on a fresh connection
(``STALE``)."""

from __future__ import annotations

import aiohttp

from imageworks.chat_proxy.errors import BackendTimeout, BackendUnavailable, ProxyError


class StreamBroken(Exception):
    """The backend ended an event stream without ``[DONE]``."""


FAILURES = (aiohttp.ClientError, TimeoutError, StreamBroken)


# A reused connection found dead as the request was written or before any answer came.
STALE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


def classify(exc: BaseException, url: object, during: str) -> ProxyError:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return BackendUnavailable(f"timed out connecting to {url}")
    if isinstance(exc, TimeoutError):
        return BackendTimeout(f"backend sent nothing for too long {during} ({url})")
    if isinstance(exc, aiohttp.ClientSSLError):
        return BackendUnavailable(f"TLS with the backend at {url} failed: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__
        error = BackendUnavailable(f"cannot connect to backend at {url}: {reason}")
        error.unreached = True  # nothing answered there: worth a look at the engine
        return error
    if isinstance(exc, aiohttp.ClientResponseError):  # a head aiohttp could not parse
        return BackendUnavailable(f"backend sent a malformed response {during} ({url}): {exc}")
    detail = str(exc) or type(exc).__name__
    return BackendUnavailable(f"backend connection failed {during} ({url}): {detail}")
