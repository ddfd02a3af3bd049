"""The xenstore wire protocol (xen/include/public/io/xs_wire.h,
docs/misc/xenstore.txt): message header, type numbers, and the request
dispatcher that turns one request into its replies against a Store.

A message is a 16-byte little-endian header ``{type, req_id, tx_id, len}``
followed by ``len`` (at most XENSTORE_PAYLOAD_MAX = 4096) payload bytes.
Replies copy type, req_id and tx_id from the request; failures are ERROR
messages carrying the errno name and a NUL.

Choices where the doc is silent follow the C xenstored: an unknown or
reply-only type (WATCH_EVENT, ERROR, RESTRICT, …) is ENOSYS; the
privileged-only requests (CONTROL, INTRODUCE, RELEASE, IS_DOMAIN_INTRODUCED,
RESUME, SET_TARGET) are EACCES for a domU; a tx_id naming no open transaction
of the caller is ENOENT (WATCH and UNWATCH ignore tx_id); TRANSACTION_START
inside a transaction is EBUSY; a reply longer than 4096 bytes (a big
DIRECTORY) is E2BIG; a request longer than 4096 bytes kills the connection.
"""

from __future__ import annotations

import enum
import logging
import struct
from dataclasses import dataclass
from typing import Optional, Union

from .store import XENSTORE_PAYLOAD_MAX, Store, XenstoreError, format_perm

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size  # 16


class XsType(enum.IntEnum):
    CONTROL = 0  # formerly DEBUG
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESTRICT = 20
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


XS_DEBUG = XsType.CONTROL

# Requests only domain 0 may send.
PRIVILEGED = frozenset(
    {
        XsType.CONTROL,
        XsType.INTRODUCE,
        XsType.RELEASE,
        XsType.IS_DOMAIN_INTRODUCED,
        XsType.RESUME,
        XsType.SET_TARGET,
    }
)
# Requests whose tx_id is not looked up.
IGNORES_TX = frozenset({XsType.WATCH, XsType.UNWATCH})

CONTROL_COMMANDS = ("help", "print")


@dataclass(frozen=True)
class Message:
    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        return HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload

    @classmethod
    def decode(cls, data: Union[bytes, bytearray, memoryview]) -> "Message":
        """A message from exactly its bytes (header + payload)."""
        typ, req_id, tx_id, length = HEADER.unpack_from(data)
        if len(data) != HEADER_SIZE + length:
            raise ValueError("length does not match the header")
        return cls(typ, req_id, tx_id, bytes(data[HEADER_SIZE:]))


class Close:
    """handle()'s answer when the connection must be dropped."""

    _instance: Optional["Close"] = None

    def __new__(cls) -> "Close":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "CLOSE"


CLOSE = Close()


def encode_token(token: str) -> bytes:
    return token.encode("utf-8", "surrogateescape")


def decode_token(raw: bytes) -> str:
    """Tokens are opaque bytes; they survive a decode/encode round trip."""
    return raw.decode("utf-8", "surrogateescape")


def watch_event(path: str, token: str) -> Optional[Message]:
    """The WATCH_EVENT for an event, or None if it would be over-long (then
    xenstored drops it)."""
    payload = path.encode("ascii") + b"\0" + encode_token(token) + b"\0"
    if len(payload) > XENSTORE_PAYLOAD_MAX:
        return None
    return Message(XsType.WATCH_EVENT, 0, 0, payload)


def error_reply(msg: Message, errno: str) -> Message:
    return Message(XsType.ERROR, msg.req_id, msg.tx_id, errno.encode() + b"\0")


def _strings(payload: bytes) -> list[bytes]:
    """The NUL-terminated strings of a payload (bytes after the last NUL are
    not a string)."""
    parts = payload.split(b"\0")
    return parts[:-1]


def _onearg(payload: bytes) -> bytes:
    """The single argument: the payload must hold exactly one NUL, at the end."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        raise XenstoreError("EINVAL", "expected one argument")
    return payload[:-1]


def _text(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise XenstoreError("EINVAL", "non-ASCII argument") from None


def _domid(raw: bytes) -> int:
    text = _text(raw)
    if not text.isdigit() or len(text) > 5 or int(text) > 0xFFFF:
        raise XenstoreError("EINVAL", f"bad domid {text!r}")
    return int(text)


def _atoi(raw: bytes) -> int:
    """C atoi(): optional sign and leading digits, else 0."""
    text = raw.decode("ascii", "replace").lstrip(" \t\n\v\f\r")
    sign = 1
    if text[:1] in ("+", "-"):
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    digits = ""
    for ch in text:
        if not ch.isdigit() or not ch.isascii():
            break
        digits += ch
    return sign * int(digits) if digits else 0


OK = b"OK\0"


def _dispatch(store: Store, conn_id: int, domid: int, msg: Message, typ: XsType) -> bytes:
    """The reply payload of a request; raises XenstoreError."""
    tx = 0 if typ in IGNORES_TX else msg.tx_id
    p = msg.payload

    if typ is XsType.READ:
        return store.read(domid, _text(_onearg(p)), tx)
    if typ is XsType.WRITE:
        nul = p.find(b"\0")
        if nul < 0:
            raise XenstoreError("EINVAL", "WRITE without path")
        store.write(domid, _text(p[:nul]), p[nul + 1 :], tx)
        return OK
    if typ is XsType.MKDIR:
        store.mkdir(domid, _text(_onearg(p)), tx)
        return OK
    if typ is XsType.RM:
        store.rm(domid, _text(_onearg(p)), tx)
        return OK
    if typ is XsType.DIRECTORY:
        names = store.directory(domid, _text(_onearg(p)), tx)
        return b"".join(n.encode() + b"\0" for n in names)
    if typ is XsType.DIRECTORY_PART:
        args = _strings(p)
        if len(args) != 2:
            raise XenstoreError("EINVAL", "DIRECTORY_PART takes path and offset")
        # xenstored reads the offset with atoi() into an unsigned int.
        offset = _atoi(args[1]) & 0xFFFFFFFF
        gen, chunk = store.directory_part(domid, _text(args[0]), offset, tx)
        return str(gen).encode() + b"\0" + chunk
    if typ is XsType.GET_PERMS:
        perms = store.get_perms(domid, _text(_onearg(p)), tx)
        return b"".join(format_perm(x).encode() + b"\0" for x in perms)
    if typ is XsType.SET_PERMS:
        args = _strings(p)
        if len(args) < 2:
            raise XenstoreError("EINVAL", "SET_PERMS takes path and permissions")
        store.set_perms(domid, _text(args[0]), [_text(a) for a in args[1:]], tx)
        return OK
    if typ is XsType.WATCH or typ is XsType.UNWATCH:
        args = _strings(p)
        if len(args) != 2:
            raise XenstoreError("EINVAL", "expected path and token")
        path, token = _text(args[0]), decode_token(args[1])
        if typ is XsType.WATCH:
            store.watch(conn_id, path, token)
        else:
            store.unwatch(conn_id, path, token)
        return OK
    if typ is XsType.TRANSACTION_START:
        if msg.tx_id:
            raise XenstoreError("EBUSY", "already in a transaction")
        return str(store.transaction_start(domid, conn_id)).encode() + b"\0"
    if typ is XsType.TRANSACTION_END:
        arg = _onearg(p)
        if arg not in (b"T", b"F"):
            raise XenstoreError("EINVAL", "TRANSACTION_END takes T or F")
        if not msg.tx_id:
            raise XenstoreError("ENOENT", "not in a transaction")
        store.transaction_end(domid, msg.tx_id, commit=arg == b"T")
        return OK
    if typ is XsType.GET_DOMAIN_PATH:
        return store.get_domain_path(_domid(_onearg(p))).encode() + b"\0"
    if typ is XsType.RESET_WATCHES:
        store.reset_watches(conn_id)
        return OK

    # Privileged requests (the caller is domain 0 here).
    if typ is XsType.INTRODUCE:
        args = _strings(p)
        if len(args) < 3:
            raise XenstoreError("EINVAL", "INTRODUCE takes domid, mfn, port")
        target = _domid(args[0])
        if target == 0:
            raise XenstoreError("EINVAL", "cannot introduce domain 0")
        # Mapping the ring page and binding the port is the host's business;
        # here the domain just becomes known and @introduceDomain fires.
        store.introduce_domain(target)
        return OK
    if typ is XsType.RELEASE:
        target = _domid(_onearg(p))
        if target == 0:
            raise XenstoreError("EINVAL", "cannot release domain 0")
        if not store.is_domain_introduced(target):
            raise XenstoreError("ENOENT", "domain not introduced")
        store.release_domain(target)
        return OK
    if typ is XsType.IS_DOMAIN_INTRODUCED:
        return b"T\0" if store.is_domain_introduced(_domid(_onearg(p))) else b"F\0"
    if typ is XsType.RESUME:
        target = _domid(_onearg(p))
        if not store.is_domain_introduced(target):
            raise XenstoreError("ENOENT", "domain not introduced")
        store.resume_domain(target)
        return OK
    if typ is XsType.SET_TARGET:
        args = _strings(p)
        if len(args) != 2:
            raise XenstoreError("EINVAL", "SET_TARGET takes two domids")
        store.set_target(_domid(args[0]), _domid(args[1]))
        return OK
    if typ is XsType.CONTROL:
        args = _strings(p)
        if not args:
            raise XenstoreError("EINVAL", "CONTROL needs a command")
        cmd = _text(args[0])
        if cmd == "help":
            return "".join(c + "\n" for c in CONTROL_COMMANDS).encode() + b"\0"
        if cmd == "print":
            if len(args) < 2:
                raise XenstoreError("EINVAL", "print needs a string")
            log.info("xenstore CONTROL print: %s", args[1].decode("utf-8", "replace"))
            return OK
        raise XenstoreError("EINVAL", f"unknown CONTROL command {cmd!r}")
    raise XenstoreError("ENOSYS", f"request type {int(typ)}")


_HANDLED = frozenset(set(XsType) - {XsType.WATCH_EVENT, XsType.ERROR, XsType.RESTRICT})


def handle(store: Store, conn_id: int, domid: int, msg: Message) -> Union[list[Message], Close]:
    """Process one request from connection ``conn_id`` of domain ``domid``.

    Returns the replies to send (one message), or CLOSE if the connection
    must be dropped (an over-long payload). Never raises; the watch events a
    request causes leave through the connection's deliver callback."""
    try:
        if len(msg.payload) > store.payload_max:
            return CLOSE
        try:
            typ = XsType(msg.type)
        except ValueError:
            typ = None
        if typ is None or typ not in _HANDLED:
            return [error_reply(msg, "ENOSYS")]
        if typ in PRIVILEGED and not store.is_privileged(domid):
            return [error_reply(msg, "EACCES")]
        if typ not in IGNORES_TX and msg.tx_id and not store.has_transaction(domid, msg.tx_id, conn_id):
            return [error_reply(msg, "ENOENT")]
        try:
            payload = _dispatch(store, conn_id, domid, msg, typ)
        except XenstoreError as e:
            return [error_reply(msg, e.errno)]
        if len(payload) > store.payload_max:
            return [error_reply(msg, "E2BIG")]
        return [Message(typ, msg.req_id, msg.tx_id, payload)]
    except Exception:  # a bug here must not take the host down with the guest
        log.exception("xenstore: request %r failed", msg)
        return [error_reply(msg, "EIO")]
