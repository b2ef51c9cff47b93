"""The registry's error tree. Every error message is one line a person can act on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class RegistryError(Exception):
    """Base class for every registry, layer and profile error."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a layer file, located as precisely as we can."""

    file: str
    message: str
    index: int | None = None
    name: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.index is not None:
            where += f" entry #{self.index}"
        if self.name:
            where += f" ({self.name!r})"
        if self.field:
            where += f" field {self.field!r}"
        return f"{where}: {self.message}"


class RegistryValidationError(RegistryError):
    """One or more layer files are invalid; carries every problem found, not just the first."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        count = len(self.problems)
        head = str(self.problems[0]) if self.problems else "invalid registry"
        more = f" (and {count - 1} more)" if count > 1 else ""
        super().__init__(head + more)


class UnknownModelError(RegistryError, KeyError):
    """A name that resolves to no entry. Subclasses KeyError so mapping-style callers work."""

    def __init__(self, name: str, suggestions: Sequence[str] = ()) -> None:
        self.name = name
        self.suggestions = tuple(suggestions)
        hint = f"; did you mean {', '.join(map(repr, self.suggestions))}?" if suggestions else ""
        super().__init__(f"unknown model {name!r}{hint}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class UnknownProfileError(RegistryError, KeyError):
    """A deployment profile name that is not defined."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.known = tuple(known)
        super().__init__(f"unknown deployment profile {name!r}; known: {', '.join(known)}")

    def __str__(self) -> str:
        return str(self.args[0])
