"""Device models: the host ends of the guest's split drivers."""

from .console import ConsoleBackend, ConsoleHistory

__all__ = ["ConsoleBackend", "ConsoleHistory"]
