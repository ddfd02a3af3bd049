"""Device models: the host ends of the guest's split drivers."""

from .console import ConsoleBackend

__all__ = ["ConsoleBackend"]
