"""A minimal xenstore client for the host: what `pvhvm shutdown` needs to
reach a running domain through its xenstored socket (XenstoreSocketServer)."""

from __future__ import annotations

import socket
from pathlib import Path

from ..errors import PvhvmError
from .wire import HEADER, HEADER_SIZE, Message, XsType


class XenstoreClientError(PvhvmError):
    pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise XenstoreClientError("xenstore socket closed before the reply")
        buf += chunk
    return bytes(buf)


def xs_request(path: str | Path, kind: XsType, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send one request on the socket at `path`; return the reply payload."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(Message(kind, 1, 0, payload).encode())
            while True:
                typ, _req, _tx, length = HEADER.unpack(_recv_exact(s, HEADER_SIZE))
                body = _recv_exact(s, length)
                if typ == XsType.WATCH_EVENT:
                    continue
                if typ == XsType.ERROR:
                    raise XenstoreClientError(f"xenstore refused: {body.rstrip(bytes(1)).decode(errors='replace')}")
                return body
    except FileNotFoundError:
        raise XenstoreClientError(f"{path}: no xenstore socket (boot with --xenstore-socket {path})") from None
    except (ConnectionRefusedError, socket.timeout, OSError) as e:
        if isinstance(e, XenstoreClientError):
            raise
        raise XenstoreClientError(f"{path}: cannot talk to the domain's xenstore: {e}") from None


def xs_write(path: str | Path, key: str, value: str) -> None:
    xs_request(path, XsType.WRITE, key.encode() + b"\0" + value.encode())
