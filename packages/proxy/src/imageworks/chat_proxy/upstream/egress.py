"""How the proxy speaks to its backends: one aiohttp ``ClientSession`` for every backend call
(forwarding, the executor, Ollama), TLS, and each entry's credentials and fixed headers.

The session is tuned for relaying: no connection limit (every open stream holds a connection,
and a limit would silently queue the streams beyond it), no cookie jar (a backend's cookies
must not reach other clients), no decompression (bodies are relayed as the backend sent them),
no total timeout (generations take minutes) but a connect and an idle-read limit.

TLS: ``https://`` backends are verified against the system's trust store, which honours
``SSL_CERT_FILE`` / ``SSL_CERT_DIR``; an entry's ``backend_config.ca_file`` names a CA bundle
for that backend alone (a private CA, another ImageWorks box).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

import aiohttp
from yarl import URL

from imageworks.chat_proxy.config import ProxyConfig
from imageworks.chat_proxy.errors import BackendUnavailable
from imageworks.model_loader.schema import ModelEntry

JSON = "application/json"
# Below the 5 s keep-alive of uvicorn-based backends (vLLM among them): a connection the
# backend is about to close is not reused for a POST, which aiohttp rightly never resends.
KEEPALIVE_S = 4.0
_MAX_CACHED = 1024  # parsed URLs and TLS contexts, bounded even if base URLs keep changing


@dataclass(frozen=True)
class Target:
    """Where one entry's requests go, and what they carry besides the body."""

    base_url: str
    ssl: ssl.SSLContext | bool  # True: the session's default context
    extra_headers: tuple[tuple[str, str], ...]
    api_key_env: str | None
    egress: Egress
    model: str | None = None  # named in errors

    def url(self, path: str) -> URL:
        """``path`` after the base URL's path, before its query (``?api-version=...``)."""
        base, mark, query = self.base_url.partition("?")
        return self.egress.parsed(base.rstrip("/") + path + mark + query)

    def root_url(self, path: str) -> URL:
        """``path`` under the engine's root (its raw routes: /tokenize, /props, ...)."""
        return self.egress.parsed(self.base_url.removesuffix("/v1") + path)

    def headers(self, request_id: str) -> dict[str, str]:
        headers = {"content-type": JSON, "x-request-id": request_id}
        headers.update(self.extra_headers)
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise BackendUnavailable(
                    f"the backend's API key variable {self.api_key_env} (backend_config."
                    "api_key_env) is not set in the proxy's environment"
                )
            headers["authorization"] = f"Bearer {key}"
        return headers


class Egress:
    """The app's HTTP client to backends; opened and closed by the lifespan."""

    def __init__(self, config: ProxyConfig) -> None:
        # Built here rather than aiohttp's import-time default so that SSL_CERT_FILE set for
        # this process is honoured.
        self.default_ssl = ssl.create_default_context()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, ttl_dns_cache=300, ssl=self.default_ssl, keepalive_timeout=KEEPALIVE_S
            ),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=config.connect_timeout_s, sock_read=config.read_timeout_s
            ),
            auto_decompress=False,
            # No Accept-Encoding: bodies are relayed undecoded, so the backend must not be
            # invited to compress them (a gzipped SSE stream or JSON body would reach clients
            # without its Content-Encoding).
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._urls: dict[str, URL] = {}

    def target(self, entry: ModelEntry, base_url: str) -> Target:
        bc = entry.backend_config
        return Target(
            base_url=base_url,
            ssl=tls_context(bc.ca_file) if bc.ca_file else True,
            extra_headers=tuple(bc.headers.items()),
            api_key_env=bc.api_key_env,
            egress=self,
            model=entry.name,
        )

    def parsed(self, url: str) -> URL:
        """``url`` parsed once (a handful of models, each asked many times)."""
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) > _MAX_CACHED:
                self._urls.clear()
            parsed = self._urls[url] = URL(url)
        return parsed

    async def close(self) -> None:
        await self.session.close()


_contexts: dict[str, ssl.SSLContext] = {}


def tls_context(ca_file: str) -> ssl.SSLContext:
    """The TLS context that trusts ``ca_file``, made once (for backends and peers alike)."""
    context = _contexts.get(ca_file)
    if context is None:
        try:
            context = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise BackendUnavailable(
                f"cannot load the backend's CA bundle {ca_file} (backend_config.ca_file): {exc}"
            ) from None
        if len(_contexts) > _MAX_CACHED:
            _contexts.clear()
        _contexts[ca_file] = context
    return context
