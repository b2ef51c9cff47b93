"""``/upstream/{model}/{path}``: an engine's own route, allow-listed per backend
(``request/surfaces.raw_access``), forwarded with its body as it came."""

from __future__ import annotations

from imageworks.chat_proxy.auth import require_admin
from imageworks.chat_proxy.errors import NotFound
from imageworks.chat_proxy.request.surfaces import raw_access
from imageworks.chat_proxy.routes.forward import JSON, Call
from imageworks.chat_proxy.routes.routing import route
from imageworks.chat_proxy.upstream.peers import FORWARDED_HEADER


class RawCall(Call):
    """``/upstream/{model}/{path}``: an allow-listed engine route, the body as it came."""

    def prepare_other(self, raw: bytes) -> None:
        scope = self.scope
        name, _, rest = scope["path"].removeprefix("/upstream/").partition("/")
        self.method = scope["method"]
        path = "/" + rest
        if not name or self.method not in ("GET", "POST"):
            raise NotFound(f"no route for {self.method} {scope['path']}")
        self.info.model = name
        entry = self.to(route(self.state, name, FORWARDED_HEADER in self.headers))
        access = raw_access(entry, self.method, path)
        if access == "never":
            raise NotFound(
                f"{self.method} {path} is not an engine route the proxy forwards for "
                f"{entry.backend} models (docs/api.md lists them)"
            )
        if access == "admin":
            config = self.state.config
            require_admin(
                self.headers, config.admin_token, peer=self.info.client, api_keys=config.api_keys
            )
        query = scope.get("query_string", b"")
        if entry.metadata.get("peer"):  # another ImageWorks proxy: its own raw route
            path = f"/upstream/{entry.upstream_id}{path}"
        self.path = path + ("?" + query.decode("latin-1") if query else "")
        self.at_root = True
        self.payload = raw
        self.content_type = self.headers.get("content-type", JSON)
