"""xenstored's Unix socket for host tools: the same wire protocol as the
ring (wire.py) over a stream socket, so that unmodified dom0 clients work
against a running domain's Store.

    server = XenstoreSocketServer(dom.store, "/run/pvhvm/xs.sock")
    server.attach(dom)          # served by dom's run loop
    ...                         # XENSTORED_PATH=/run/pvhvm/xs.sock xenstore-ls
    server.close()

How clients find the socket:

* libxenstore (Debian's xenstore-utils, xl, …): ``$XENSTORED_PATH`` if set
  (it is then also the fallback "device", so nothing else is tried), else
  ``${XENSTORED_RUNDIR:-/var/run/xenstored}/socket``, then /dev/xen/xenbus
  or /proc/xen/xenbus.
* pyxs: ``Client(unix_socket_path=...)``; without it ``$XENSTORED_PATH``,
  else ``${XENSTORED_RUNDIR:-/var/run/xenstored}/socket``.

Every accepted client is a connection of domain ``domid`` (0: privileged
dom0 tools) with its own watches and transactions. As in xenstored, a
request announcing more than 4096 payload bytes closes the connection; an
unknown type gets an ENOSYS error. Everything runs on the owning loop's
thread (the Domain's run loop): sockets are non-blocking, replies and watch
events wait in a per-client buffer that is flushed when the client sends,
after every guest exit (a service function) and whenever anything else on
the server happens. A client that lets more than OUT_HIGH_WATER bytes pile
up is not read from until it drains them, and watch events are dropped for
a client that has more than ``max_event_backlog`` bytes waiting (xenstored
also drops events past its quota).

Each client may hold at most ``max_transactions`` transactions open at once
(the store's quota_transactions, 10 by default; more is ENOSPC), even as
domain 0. xenstored exempts privileged connections from that quota; here
every open transaction is memory of the domain's own process, so a host
client that never ends its transactions is bounded like a guest.

The socket file is created mode 0600. An existing path is replaced only if
it is a stale socket (nobody listening); anything else is refused.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import PvhvmError
from . import wire
from .store import Store

log = logging.getLogger(__name__)

# Bytes of replies and events waiting for a client before we stop reading
# its requests (it is not reading what we send).
OUT_HIGH_WATER = 256 * 1024
# Watch events are dropped for a client with this much output waiting.
MAX_EVENT_BACKLOG = 2 * 1024 * 1024
RECV_SIZE = 64 * 1024
LISTEN_BACKLOG = 64
# Requests that can change the store (and so fire watches in the guest).
_MUTATING = frozenset(
    {
        wire.XsType.WRITE,
        wire.XsType.MKDIR,
        wire.XsType.RM,
        wire.XsType.SET_PERMS,
        wire.XsType.TRANSACTION_END,
        wire.XsType.INTRODUCE,
        wire.XsType.RELEASE,
        wire.XsType.RESUME,
        wire.XsType.SET_TARGET,
    }
)
_KNOWN = frozenset(int(t) for t in wire.XsType)
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)


class XenstoreSocketError(PvhvmError):
    """The xenstore socket cannot be created (path taken, bad directory …)."""


class _Client:
    __slots__ = ("sock", "fd", "conn_id", "inbuf", "out", "capture", "reading", "dead")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.conn_id = 0
        self.inbuf = bytearray()
        self.out = bytearray()
        self.capture: Optional[list[bytes]] = None
        self.reading = False  # registered with add_reader
        self.dead = False


class XenstoreSocketServer:
    """A xenstored-style Unix stream socket serving ``store``.

    The socket is bound and listening once constructed (clients that
    connect before attach() wait in the backlog). ``attach(dom)`` hands it
    to a run loop: anything with ``add_reader``, ``remove_reader`` and
    ``add_service`` (a pvhvm.Domain); if the loop has ``xenstore`` (the
    guest's RingConnection), its ``service()`` is called after host clients
    change the store so the guest sees its watch events at once. Call
    ``close()`` (on the loop's thread) to drop the clients and remove the
    socket file."""

    def __init__(self, store: Store, path: Union[str, os.PathLike], *, domid: int = 0) -> None:
        self.store = store
        self.domid = domid
        self.path = Path(path)
        self._abspath = self.path.absolute()  # for close() after a chdir
        self.max_event_backlog = MAX_EVENT_BACKLOG
        # Open transactions per client (for clients that connect later).
        self.max_transactions = store.quota_transactions
        self.request_counts: Counter[int] = Counter()  # by request type; -1: unknown types
        self.dropped_events = 0
        self._clients: dict[int, _Client] = {}
        self._pending: set[_Client] = set()  # output waiting
        self._stalled: set[_Client] = set()  # over the high-water mark
        self._busy = 0
        self._store_changed = False
        self._loop: Any = None
        self._closed = False
        self._claim_path()
        self._listener = self._bind()
        st = os.stat(self.path)
        self._ident = (st.st_dev, st.st_ino)

    # ------------------------------------------------------------- the socket

    def _claim_path(self) -> None:
        """Remove a stale socket at our path; refuse anything else."""
        p = self.path
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return
        except OSError as e:
            raise XenstoreSocketError(f"{p}: {e.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise XenstoreSocketError(f"{p} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            probe.connect(str(p))
        except ConnectionRefusedError:
            pass  # nobody listening: stale
        except BlockingIOError:
            raise XenstoreSocketError(f"{p}: a server is already listening on this socket") from None
        except OSError as e:
            raise XenstoreSocketError(f"{p}: cannot tell whether the socket is in use: {e.strerror or e}") from None
        else:
            raise XenstoreSocketError(f"{p}: a server is already listening on this socket")
        finally:
            probe.close()
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise XenstoreSocketError(f"{p}: cannot remove the stale socket: {e.strerror}") from None

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # On Linux bind() creates the file with the socket inode's mode
            # (less the umask): no window in which it is group/world-usable.
            try:
                os.fchmod(sock.fileno(), 0o600)
            except OSError:
                pass
            try:
                sock.bind(str(self.path))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise XenstoreSocketError(f"{self.path} appeared while the socket was being created") from None
                raise XenstoreSocketError(f"{self.path}: cannot create the socket: {e.strerror or e}") from None
            if stat.S_IMODE(os.stat(self.path).st_mode) != 0o600:
                os.chmod(self.path, 0o600)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def fileno(self) -> int:
        return self._listener.fileno()

    @property
    def connections(self) -> list[int]:
        """The store connection ids of the clients connected now."""
        return [c.conn_id for c in self._clients.values() if not c.dead]

    def pending_output(self, conn_id: int) -> int:
        """Bytes waiting to be sent to a client (0 if it is gone)."""
        for c in self._clients.values():
            if c.conn_id == conn_id:
                return len(c.out)
        return 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._clients)} clients"
        return f"<XenstoreSocketServer {str(self.path)!r} domid={self.domid} {state}>"

    def __enter__(self) -> "XenstoreSocketServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- the loop

    def attach(self, dom: Any) -> None:
        """Serve clients from ``dom``'s run loop (see the class doc)."""
        if self._closed:
            raise XenstoreSocketError(f"{self.path}: the xenstore socket is closed")
        if self._loop is not None:
            raise XenstoreSocketError(f"{self.path}: the xenstore socket is already attached")
        self._loop = dom
        dom.add_reader(self._listener, self._on_accept)
        dom.add_service(self.service)

    def close(self) -> None:
        """Drop every client (their watches and transactions go), stop
        listening and remove the socket file (if it is still ours)."""
        if self._closed:
            return
        self._closed = True
        for c in list(self._clients.values()):
            self._drop(c)
        if self._loop is not None:
            try:
                self._loop.remove_reader(self._listener)
            except (KeyError, ValueError):
                pass
        self._listener.close()
        try:
            st = os.lstat(self._abspath)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self._abspath)
        except OSError:
            pass

    def service(self) -> bool:
        """Send waiting output and resume clients that drained theirs; the
        loop calls this after every guest exit. True if anything was sent."""
        if self._closed:
            return False
        return self._settle()

    def _on_accept(self) -> None:
        for _ in range(LISTEN_BACKLOG):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue
            except OSError as e:  # EMFILE and friends: leave it in the backlog
                log.warning("xenstore socket %s: accept failed: %s", self.path, e.strerror or e)
                break
            sock.setblocking(False)
            c = _Client(sock)
            c.conn_id = self.store.connect(self.domid, lambda path, token, c=c: self._on_event(c, path, token),
                                           transaction_quota=self.max_transactions)
            self._clients[c.fd] = c
            self._resume(c)
            log.debug("xenstore socket %s: client connected (conn %d)", self.path, c.conn_id)
        self._settle()

    def _resume(self, c: _Client) -> None:
        if not c.reading and not c.dead and self._loop is not None:
            self._loop.add_reader(c.sock, lambda c=c: self._on_readable(c))
            c.reading = True

    def _pause(self, c: _Client) -> None:
        if c.reading:
            c.reading = False
            try:
                self._loop.remove_reader(c.sock)
            except (KeyError, ValueError):
                pass

    def _on_readable(self, c: _Client) -> None:
        if c.dead:
            self._settle()
            return
        self._busy += 1
        try:
            try:
                data = c.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as e:
                log.debug("xenstore socket %s: conn %d: %s", self.path, c.conn_id, e)
                self._kill(c)
                data = None
            if data == b"":
                if c.inbuf:
                    log.debug("xenstore socket %s: conn %d went away mid-message", self.path, c.conn_id)
                self._kill(c)
            elif data:
                c.inbuf += data
                self._process(c)
        finally:
            self._busy -= 1
        self._settle()

    # --------------------------------------------------------------- requests

    def _process(self, c: _Client) -> None:
        """Answer the complete requests in the client's input buffer."""
        while not c.dead and len(c.inbuf) >= wire.HEADER_SIZE:
            if len(c.out) >= OUT_HIGH_WATER:
                # It is not reading our replies: stop reading its requests.
                self._stalled.add(c)
                self._pause(c)
                return
            typ, req_id, tx_id, length = wire.HEADER.unpack_from(c.inbuf)
            if length > self.store.payload_max:
                log.info("xenstore socket %s: conn %d sent a %d-byte payload; closing it", self.path, c.conn_id, length)
                self._kill(c)
                return
            end = wire.HEADER_SIZE + length
            if len(c.inbuf) < end:
                return
            msg = wire.Message(typ, req_id, tx_id, bytes(c.inbuf[wire.HEADER_SIZE:end]))
            del c.inbuf[:end]
            self._dispatch(c, msg)

    def _dispatch(self, c: _Client, msg: wire.Message) -> None:
        self.request_counts[msg.type if msg.type in _KNOWN else -1] += 1
        c.capture = []
        try:
            replies = wire.handle(self.store, c.conn_id, self.domid, msg)
        finally:
            events, c.capture = c.capture, None
        if msg.type in _MUTATING:
            self._store_changed = True
        if replies is wire.CLOSE:
            self._kill(c)
            return
        out = b"".join(r.encode() for r in replies)
        # As xenstored: the events a request causes go before its reply,
        # except WATCH, whose first event follows the OK.
        if msg.type == wire.XsType.WATCH:
            self._queue(c, out)
            for e in events:
                self._queue_event(c, e)
        else:
            for e in events:
                self._queue_event(c, e)
            self._queue(c, out)

    # ----------------------------------------------------------------- output

    def _on_event(self, c: _Client, path: str, token: str) -> None:
        msg = wire.watch_event(path, token)
        if msg is None or c.dead:
            return
        data = msg.encode()
        if c.capture is not None:
            c.capture.append(data)
            return
        self._queue_event(c, data)
        if not self._busy:
            # Fired from outside (the guest's ring, the host's own writes):
            # send now; a failure is dealt with at the next callback.
            self._flush(c)

    def _queue_event(self, c: _Client, data: bytes) -> None:
        if len(c.out) + len(data) > self.max_event_backlog:
            self.dropped_events += 1
            return
        self._queue(c, data)

    def _queue(self, c: _Client, data: bytes) -> None:
        if data and not c.dead:
            c.out += data
            self._pending.add(c)

    def _flush(self, c: _Client) -> bool:
        """Send what the socket takes now; True if anything was sent."""
        sent = False
        while c.out and not c.dead:
            try:
                n = c.sock.send(c.out, _SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.debug("xenstore socket %s: conn %d: %s", self.path, c.conn_id, e)
                c.dead = True
                break
            del c.out[:n]
            sent = True
        if not c.out or c.dead:
            self._pending.discard(c)
        return sent

    # ------------------------------------------------------------- lifecycle

    def _kill(self, c: _Client) -> None:
        """Mark a client for dropping (done once we are out of the store)."""
        c.dead = True

    def _drop(self, c: _Client) -> None:
        self._pause(c)
        self._pending.discard(c)
        self._stalled.discard(c)
        self._clients.pop(c.fd, None)
        self.store.disconnect(c.conn_id)
        c.dead = True
        c.inbuf.clear()
        c.out.clear()
        try:
            c.sock.close()
        except OSError:
            pass
        log.debug("xenstore socket %s: conn %d closed", self.path, c.conn_id)

    def _settle(self) -> bool:
        """After a callback: let the guest see what host clients changed,
        send what is waiting, resume clients that drained their output,
        drop the dead. True if anything was sent."""
        if self._busy:
            return False
        sent = False
        self._busy += 1
        try:
            for _ in range(8):
                if self._store_changed:
                    self._store_changed = False
                    ring = getattr(self._loop, "xenstore", None)
                    if ring is not None:
                        ring.service()  # may fire events to our clients
                for c in list(self._pending):
                    sent |= self._flush(c)
                resumed = False
                for c in list(self._stalled):
                    if c.dead:
                        self._stalled.discard(c)
                    elif len(c.out) < OUT_HIGH_WATER // 2:
                        self._stalled.discard(c)
                        self._resume(c)
                        self._process(c)
                        resumed = True
                if not resumed and not self._store_changed:
                    break
        finally:
            self._busy -= 1
        for c in [c for c in self._clients.values() if c.dead]:
            self._drop(c)
        return sent


__all__ = ["XenstoreSocketServer", "XenstoreSocketError", "OUT_HIGH_WATER", "MAX_EVENT_BACKLOG"]
