"""`imageworks-models`: inspect the registry and the deployment profiles.

Thin by design: parse, call the library, print. Every domain error becomes a one-line message
and a non-zero exit (click.ClickException), never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from imageworks.model_loader.errors import RegistryError, RegistryValidationError
from imageworks.model_loader.profiles import PROFILES_FILE, ProfileManager
from imageworks.model_loader.proxy_client import DEFAULT_PROXY_URL, call
from imageworks.model_loader.registry import Registry, build_registry, load_registry, registry_dir
from imageworks.model_loader.schema import ModelEntry


@dataclass
class Context:
    registry_dir: Path
    staging_dir: Path

    def registry(self) -> Registry:
        return load_registry(self.registry_dir)

    def profiles(self) -> ProfileManager:
        return ProfileManager(self.registry_dir / PROFILES_FILE, self.staging_dir)


@contextmanager
def domain_errors() -> Iterator[None]:
    try:
        yield
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{exc.filename or ''}: {exc.strerror or exc}") from None


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--registry-dir",
    envvar="IMAGEWORKS_REGISTRY_DIR",
    default="configs",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory with the registry layers and deployment_profiles.json.",
)
@click.option(
    "--staging-dir",
    envvar="IMAGEWORKS_STAGING_DIR",
    default="_staging",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for runtime state (the active profile, autostart logs).",
)
@click.pass_context
def main(ctx: click.Context, registry_dir: Path, staging_dir: Path) -> None:
    """Inspect the ImageWorks model registry and deployment profiles."""
    ctx.obj = Context(registry_dir, staging_dir)


def _summary(entry: ModelEntry) -> dict[str, Any]:
    return {
        "name": entry.name,
        "display_name": entry.label,
        "backend": entry.backend,
        "served_model_id": entry.upstream_id,
        "capabilities": sorted(k for k, v in entry.capabilities.model_dump().items() if v is True),
        "profiles": entry.profiles,
        "vram_estimate_mb": entry.vram_estimate_mb,
        "deprecated": entry.deprecated,
    }


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return "\n".join(lines)


proxy_url = click.option(
    "--proxy-url",
    envvar="IMAGEWORKS_CHAT_PROXY_URL",
    default=DEFAULT_PROXY_URL,
    show_default=True,
    help="The chat proxy (IMAGEWORKS_CHAT_PROXY_URL).",
)
admin_token = click.option(
    "--admin-token",
    envvar="CHAT_PROXY_ADMIN_TOKEN",
    default=None,
    help="The proxy's admin token, if it has one (CHAT_PROXY_ADMIN_TOKEN).",
)


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@click.option(
    "--live",
    is_flag=True,
    help="Ask the running proxy instead: its models and its peers', each with its state and "
    "where it runs (this box's engines, a peer, a Ray cluster).",
)
@click.option("--profile", help="Filter by this deployment profile (default: the active one).")
@click.option("--backend", help="Only entries of this backend.")
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help="Include deprecated entries and entries hidden by the profile.",
)
@proxy_url
@admin_token
@pass_ctx
def list_models(
    obj: Context,
    as_json: bool,
    live: bool,
    profile: str | None,
    backend: str | None,
    show_all: bool,
    proxy_url: str,
    admin_token: str | None,
) -> None:
    """List registry entries visible in a deployment profile (--live: what the proxy serves)."""
    if live:
        _list_live(proxy_url, admin_token, as_json, backend, show_all)
        return
    with domain_errors():
        registry = obj.registry()
        active = obj.profiles().get(profile) if profile else obj.profiles().active
        entries = [
            e
            for e in registry
            if (show_all or (active.admits(e) and not e.deprecated and e.servable))
            and (backend is None or e.backend == backend)
        ]
    if as_json:
        click.echo(json.dumps([_summary(e) for e in entries], indent=2))
        return
    if not entries:
        click.echo(
            f"no models in profile {active.name!r}"
            + (f" for backend {backend!r}" if backend else "")
        )
        return
    rows = [
        [
            s["name"],
            s["backend"],
            s["served_model_id"],
            ",".join(s["capabilities"]),
            "-" if s["vram_estimate_mb"] is None else str(s["vram_estimate_mb"]),
            "deprecated" if s["deprecated"] else "",
        ]
        for s in map(_summary, entries)
    ]
    click.echo(_table(rows, ["NAME", "BACKEND", "SERVED ID", "CAPABILITIES", "VRAM MB", ""]))
    if not show_all:
        click.echo(f"\nprofile: {active.name} ({len(entries)} of {len(registry)} entries)")


def where(location: dict[str, Any] | None) -> str:
    """Where a model runs, in a word: ``local``, ``peer:<box>`` or ``ray:<application>``."""
    location = location or {}
    kind = str(location.get("kind", "local"))
    detail = location.get("peer") or location.get("application")
    return f"{kind}:{detail}" if detail else kind


def _list_live(
    proxy_url: str, admin_token: str | None, as_json: bool, backend: str | None, show_all: bool
) -> None:
    with domain_errors():
        state = call(proxy_url, "GET", "/admin/state", token=admin_token)
    models = [
        m
        for m in state.get("models", [])
        if (show_all or m.get("visible")) and (backend is None or m.get("backend") == backend)
    ]
    if as_json:
        click.echo(json.dumps(models, indent=2))
        return
    if not models:
        click.echo("no models")
        return
    rows = [
        [m["name"], str(m.get("backend")), str(m.get("state")), where(m.get("location"))]
        for m in models
    ]
    click.echo(_table(rows, ["NAME", "BACKEND", "STATE", "WHERE"]))


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print entry, origins and sources as JSON.")
@pass_ctx
def show(obj: Context, name: str, as_json: bool) -> None:
    """Show the merged entry NAME and which layer each field came from."""
    with domain_errors():
        registry = obj.registry()
        entry = registry.resolve(name)
        raw, origins = registry.raw(entry.name), registry.origins(entry.name)
        sources = [
            {"layer": s[0], "file": s[1], "index": s[2]} for s in registry.sources(entry.name)
        ]
    if as_json:
        click.echo(json.dumps({"entry": raw, "origins": origins, "sources": sources}, indent=2))
        return
    click.echo(json.dumps(raw, indent=2))
    click.echo("\nfield origins:")
    width = max(map(len, origins), default=0)
    for field_name in sorted(origins):
        click.echo(f"  {field_name.ljust(width)}  {origins[field_name]}")
    click.echo(
        "defined in: " + "; ".join(f"{s['layer']} ({s['file']} #{s['index']})" for s in sources)
    )


@main.command()
@pass_ctx
def validate(obj: Context) -> None:
    """Check every layer file and the profiles; list every problem and exit 1 if there are any."""
    problems: list[str] = []
    count = 0
    try:
        count = len(build_registry(obj.registry_dir, write_snapshot=False))
    except RegistryValidationError as exc:
        problems += [str(p) for p in exc.problems]
    try:
        obj.profiles()
    except RegistryValidationError as exc:
        problems += [str(p) for p in exc.problems]
    except RegistryError as exc:
        problems.append(str(exc))
    if problems:
        for line in problems:
            click.echo(line, err=True)
        raise click.ClickException(f"{len(problems)} problem(s) in {obj.registry_dir}")
    click.echo(f"ok: {count} entries in {registry_dir(obj.registry_dir)}")


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def profiles(ctx: click.Context, as_json: bool) -> None:
    """List deployment profiles (the active one is marked with *)."""
    if ctx.invoked_subcommand is not None:
        return
    obj: Context = ctx.obj
    with domain_errors():
        manager = obj.profiles()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "active": manager.active.name,
                    "profiles": [p.model_dump() for p in manager.profiles],
                },
                indent=2,
            )
        )
        return
    for profile in manager.profiles:
        mark = "*" if profile.name == manager.active.name else " "
        click.echo(f"{mark} {profile.name:<12} {profile.description}")


@profiles.command("use")
@click.argument("name")
@pass_ctx
def profiles_use(obj: Context, name: str) -> None:
    """Make NAME the active deployment profile (persisted under the staging dir)."""
    with domain_errors():
        profile = obj.profiles().use(name)
    click.echo(f"active profile: {profile.name}")


# --- commands that talk to a running proxy -------------------------------------------------


@main.command("activate-model")
@click.argument("name")
@proxy_url
@admin_token
def activate_model(name: str, proxy_url: str, admin_token: str | None) -> None:
    """Start NAME through the proxy (swapping out a model that shares its slot); waits until
    it is ready."""
    click.echo(f"activating {name} via {proxy_url} ...", err=True)
    with domain_errors():
        state = call(proxy_url, "POST", "/admin/activate", {"model": name}, token=admin_token)
    load = f" in {state['load_ms'] / 1000:.1f} s" if state.get("load_ms") else ""
    click.echo(f"{state['name']}: {state['state']}{load}")


@main.command("deactivate-model")
@click.argument("name", required=False)
@proxy_url
@admin_token
def deactivate_model(name: str | None, proxy_url: str, admin_token: str | None) -> None:
    """Stop NAME (or every model the proxy started) once its requests have finished."""
    with domain_errors():
        answer = call(
            proxy_url,
            "POST",
            "/admin/deactivate",
            {"model": name} if name else None,
            token=admin_token,
        )
    stopped = answer.get("stopped") or []
    click.echo("stopped: " + ", ".join(stopped) if stopped else "nothing was running")


@main.command("current-model")
@click.option("--json", "as_json", is_flag=True)
@proxy_url
@admin_token
def current_model(as_json: bool, proxy_url: str, admin_token: str | None) -> None:
    """Show the models the proxy has running or loading, and those that failed or crashed
    (with the restart policy, the backoff left and the last error)."""
    with domain_errors():
        state = call(proxy_url, "GET", "/admin/state", token=admin_token)
    shown = [
        m
        for m in state.get("models", [])
        if m.get("managed")
        and m.get("state") in ("starting", "ready", "stopping", "failed", "crashed")
    ]
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    if not shown:
        click.echo("none")
    for model in shown:
        line = f"{model['name']}  {model['backend']}  {model['state']}  "
        line += f"in flight: {model['in_flight']}"
        restarts = model.get("restarts") or {}
        if model["state"] in ("failed", "crashed"):
            line += f"  restart: {model.get('restart', 'on-failure')}"
            if restarts.get("retry_in_s"):
                line += f", next try in {restarts['retry_in_s']:.0f} s"
            if restarts.get("halted"):
                line += ", halted (activate it by hand)"
            line += f"\n  last error: {(model.get('last_error') or '').splitlines()[0][:200]}"
        click.echo(line)


if __name__ == "__main__":
    main()
