"""Remote images, fetched only from the hosts an entry allows (``vision.remote_images``): no
redirects, a size cap and a time limit."""

from __future__ import annotations

import asyncio
import urllib.parse

import aiohttp

from imageworks.chat_proxy.errors import InvalidRequest, PayloadTooLarge
from imageworks.model_loader.schema import RemoteImages


def host_allowed(url: str, remote: RemoteImages) -> bool:
    try:
        split = urllib.parse.urlsplit(url)
    except ValueError:
        return False
    host = (split.hostname or "").lower().rstrip(".")
    if split.scheme not in ("http", "https") or not host:
        return False
    for allowed in remote.allow_hosts:
        allowed = allowed.lower().rstrip(".")
        if host == allowed or (allowed.startswith("*.") and host.endswith(allowed[1:])):
            return True
    return False


async def fetch_image(
    session: aiohttp.ClientSession, url: str, remote: RemoteImages, at: str
) -> bytes:
    """GET an allow-listed image: no redirects (they could leave the allow-list), at most
    ``max_bytes``, within ``timeout_s`` in all."""
    try:
        async with asyncio.timeout(remote.timeout_s):
            async with session.get(
                url, allow_redirects=False, headers={"accept": "image/*"}
            ) as response:
                if response.status != 200:
                    raise InvalidRequest(
                        f"fetching the image at {at} ({url}) got HTTP {response.status}"
                        + (" (redirects are not followed)" if 300 <= response.status < 400 else ""),
                        param=at,
                    )
                if (response.content_length or 0) > remote.max_bytes:
                    raise _too_big(at, remote)
                data = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    data += chunk
                    if len(data) > remote.max_bytes:
                        raise _too_big(at, remote)
                return bytes(data)
    except TimeoutError:
        raise InvalidRequest(
            f"fetching the image at {at} ({url}) took longer than {remote.timeout_s} s",
            param=at,
        ) from None
    except aiohttp.ClientError as exc:
        raise InvalidRequest(
            f"fetching the image at {at} ({url}) failed: {exc or type(exc).__name__}", param=at
        ) from None


def _too_big(at: str, remote: RemoteImages) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the image at {at} is larger than {remote.max_bytes} bytes "
        "(vision.remote_images.max_bytes)",
        param=at,
    )
