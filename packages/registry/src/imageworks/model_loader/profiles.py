"""Deployment profiles (production / staging / testing) and the persisted active profile."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imageworks.model_loader.errors import Problem, RegistryValidationError, UnknownProfileError
from imageworks.model_loader.layers import write_atomic
from imageworks.model_loader.schema import ModelEntry

PROFILES_FILE = "deployment_profiles.json"
STATE_FILE = "active_profile.json"
PROFILE_ENV = "IMAGEWORKS_DEPLOYMENT_PROFILE"


class DeploymentProfile(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    # Entries whose declared VRAM estimate exceeds this are not offered in the profile.
    max_vram_mb: int | None = Field(default=None, ge=0)

    def admits(self, entry: ModelEntry) -> bool:
        if not entry.visible_in(self.name):
            return False
        if self.max_vram_mb is not None and entry.vram_estimate_mb is not None:
            return entry.vram_estimate_mb <= self.max_vram_mb
        return True


class ProfilesFile(BaseModel):
    model_config = ConfigDict(extra="allow")

    default: str
    profiles: list[DeploymentProfile]


def load_profiles(path: Path) -> ProfilesFile:
    """Read deployment_profiles.json; every problem raises one located, one-line error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        parsed = ProfilesFile.model_validate(data)
    except FileNotFoundError:
        raise RegistryValidationError([Problem(str(path), "file not found")]) from None
    except json.JSONDecodeError as exc:
        raise RegistryValidationError(
            [Problem(str(path), f"not valid JSON: {exc.msg} at line {exc.lineno}")]
        ) from None
    except ValidationError as exc:
        raise RegistryValidationError(
            [Problem(str(path), e["msg"], field=".".join(map(str, e["loc"]))) for e in exc.errors()]
        ) from None
    names = [p.name for p in parsed.profiles]
    if len(set(names)) != len(names):
        raise RegistryValidationError([Problem(str(path), "profile names must be unique")])
    if parsed.default not in names:
        raise RegistryValidationError(
            [Problem(str(path), f"default {parsed.default!r} is not a defined profile")]
        )
    return parsed


Subscriber = Callable[[DeploymentProfile], None]


class ProfileManager:
    """Knows the profiles, persists which one is active, and tells subscribers when it changes.

    Start-up order for the active profile: $IMAGEWORKS_DEPLOYMENT_PROFILE, else the persisted
    choice, else the file's default. A persisted name that no longer exists falls back to the
    default rather than failing start-up.
    """

    def __init__(self, profiles_path: Path, state_dir: Path) -> None:
        self.profiles_path = profiles_path
        self.state_path = state_dir / STATE_FILE
        self._file = load_profiles(profiles_path)
        self._by_name = {p.name: p for p in self._file.profiles}
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []
        self._active = self._by_name[self._initial_name()]

    def _initial_name(self) -> str:
        forced = os.environ.get(PROFILE_ENV)
        if forced:
            self.get(forced)  # a bad override is an error, not a silent fallback
            return forced
        try:
            saved = json.loads(self.state_path.read_text(encoding="utf-8")).get("name")
        except (OSError, ValueError, AttributeError):
            saved = None
        return saved if saved in self._by_name else self._file.default

    @property
    def profiles(self) -> list[DeploymentProfile]:
        return list(self._file.profiles)

    @property
    def active(self) -> DeploymentProfile:
        return self._active

    def get(self, name: str) -> DeploymentProfile:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownProfileError(name, list(self._by_name)) from None

    def use(self, name: str) -> DeploymentProfile:
        """Make ``name`` active, persist it, and notify subscribers if it changed."""
        profile = self.get(name)
        with self._lock:
            changed = profile.name != self._active.name
            write_atomic(self.state_path, (json.dumps({"name": profile.name}) + "\n").encode())
            self._active = profile
            subscribers = list(self._subscribers)
        if changed:
            for callback in subscribers:
                callback(profile)
        return profile

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(profile)`` after each change; returns a function that unsubscribes."""
        with self._lock:
            self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)
