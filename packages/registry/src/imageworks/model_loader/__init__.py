"""Layered model registry, deployment profiles and name resolution for ImageWorks."""

from imageworks.model_loader.errors import (
    RegistryError,
    RegistryValidationError,
    UnknownModelError,
    UnknownProfileError,
)
from imageworks.model_loader.registry import Registry, load_registry
from imageworks.model_loader.schema import ModelEntry

__all__ = [
    "ModelEntry",
    "Registry",
    "RegistryError",
    "RegistryValidationError",
    "UnknownModelError",
    "UnknownProfileError",
    "load_registry",
]
