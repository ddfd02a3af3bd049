"""Domains in the background, as xl runs them: one process per domain with
a control socket (runtime.py, protocol.py, server.py, daemon.py), and the
client side the CLI and `pvhvm.connect` use (client.py)."""

from .client import DomainHandle, connect, create, list_domains, restore_in_background
from .runtime import ToolstackError

__all__ = ["DomainHandle", "ToolstackError", "connect", "create", "list_domains", "restore_in_background"]
