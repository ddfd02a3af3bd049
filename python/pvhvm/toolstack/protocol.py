"""The control protocol of a background domain (docs/control-protocol.md).

One JSON object per line on the domain's Unix socket, as QEMU's QMP:

    server: {"pvhvm": {"version": "0.1.0", "name": "web", "domid": 3, "commands": [...]}}
    client: {"execute": "query-domain", "id": 1}
    server: {"return": {...}, "id": 1}
    client: {"execute": "mem-set", "arguments": {"mib": 128}, "id": 2}
    server: {"error": {"class": "InvalidArgument", "desc": "..."}, "id": 2}

`console` turns the connection into the domain's console: after its
reply, bytes either way are the guest's console until the client closes.
"""

from __future__ import annotations

import json
import socket

# A line longer than this is refused and the connection closed: a client
# must not make the domain process hold unbounded input.
MAX_LINE = 1 << 20

# Error classes (QMP's names where QMP has one).
GENERIC = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
INVALID_ARGUMENT = "InvalidArgument"
BAD_STATE = "DomainState"  # the command does not apply to the domain as it is (ended, paused …)


class CommandError(Exception):
    """A command failed: its error class and a one-line description."""

    def __init__(self, desc: str, cls: str = GENERIC) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict:
    """A client's or server's line as a JSON object; ValueError otherwise."""
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    return message


def error(desc: str, cls: str = GENERIC, ident=None) -> dict:
    reply: dict = {"error": {"class": cls, "desc": desc}}
    if ident is not None:
        reply["id"] = ident
    return reply


def receive(sock: socket.socket) -> bytes | None:
    """What a non-blocking socket has: None if nothing yet, b"" once the
    other end is gone (closed or broken)."""
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return None
    except OSError:
        return b""
