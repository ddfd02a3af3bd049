"""What a vif connects to on the host: Ethernet frames in and out.

Every host end has ``fileno()`` (readable when a frame may be waiting),
``send(frame)``, ``recv()`` (the next frame, or None when none is complete
yet; never blocks) and ``close()``.

* `PasstHost` (the default, no privileges needed): user-mode networking by
  passt (https://passt.top, Debian package ``passt``). passt is started the
  way QEMU's ``-netdev stream`` talks to it: a connected UNIX stream socket
  carrying frames each prefixed by its length as a 32-bit big-endian
  number; we hand passt its end of a socketpair (``passt -F FD``), so there
  is no socket file, and passt quits by itself as soon as our end closes —
  also if this process dies. passt gives the guest DHCP (the host's address
  and default gateway, unless given), DNS, ARP/NDP; the guest's connections
  go out through host sockets, connections to the gateway's address reach
  the host's loopback (passt's gateway mapping), and ``forwards`` bind host
  ports on 127.0.0.1 only that passt forwards into the guest.
  ICMP echo goes through "ping" sockets: net.ipv4.ping_group_range must
  include passt's group (see `ping_sockets_allowed`).
* `TapHost` (``--net tap:NAME``, needs CAP_NET_ADMIN): a TAP interface,
  /dev/net/tun opened with IFF_TAP | IFF_NO_PI, so reads and writes are raw
  frames; the host configures the interface (addresses, bridge) itself.
  A guest whose DHCP requests nothing there answers is reported once
  (`DhcpWatch`, through `set_warning_sink`).

`network_warning` is what a user hears before the guest boots when its
network cannot work: no passt for --net auto, or passt unable to forward
pings, with the sysctl command that fixes it.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import pwd
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Protocol, Sequence, Union

from ..errors import PvhvmError

log = logging.getLogger(__name__)

MAX_FRAME = 65535 + 14 + 4  # an IP datagram's worth, Ethernet and a VLAN tag
_LEN = struct.Struct(">I")
SEND_TIMEOUT = 30  # seconds passt may leave a frame of ours half-written


class NetHostError(PvhvmError):
    """The host side of a network cannot be set up."""


class NetHost(Protocol):
    def fileno(self) -> int: ...
    def send(self, frame: bytes) -> None: ...
    def recv(self) -> Optional[bytes]: ...
    def close(self) -> None: ...


# --------------------------------------------------------------------------- passt


@dataclass(frozen=True)
class Forward:
    """A host port forwarded into the guest: connections to
    ``address:host_port`` on the host reach ``guest_port`` in the guest."""

    host_port: int
    guest_port: int
    proto: str = "tcp"
    address: str = "127.0.0.1"

    def spec(self) -> str:
        return f"{self.address}/{self.host_port}:{self.guest_port}"


ForwardSpec = Union[Forward, int, tuple, str]


def parse_forward(spec: ForwardSpec) -> Forward:
    """``8080`` (same port), ``(8080, 80)``, ``"8080:80"``, ``"udp:5353:53"``
    or a Forward; ports 1-65535, bound on 127.0.0.1 unless a Forward says
    otherwise."""
    if isinstance(spec, Forward):
        f = spec
    elif isinstance(spec, int):
        f = Forward(spec, spec)
    elif isinstance(spec, tuple) and len(spec) in (2, 3):
        f = Forward(int(spec[0]), int(spec[1]), *(spec[2:]))
    elif isinstance(spec, str):
        parts = spec.split(":")
        proto = "tcp"
        if parts and parts[0] in ("tcp", "udp"):
            proto = parts.pop(0)
        try:
            ports = [int(p, 10) for p in parts]
        except ValueError:
            raise NetHostError(f"bad port forward {spec!r} "
                               "(want HOSTPORT[:GUESTPORT], tcp: or udp: in front)") from None
        if len(ports) == 1:
            ports.append(ports[0])
        if len(ports) != 2:
            raise NetHostError(f"bad port forward {spec!r} (want HOSTPORT[:GUESTPORT])")
        f = Forward(ports[0], ports[1], proto)
    else:
        raise NetHostError(f"bad port forward {spec!r}")
    if f.proto not in ("tcp", "udp"):
        raise NetHostError(f"bad port forward protocol {f.proto!r}")
    for p in (f.host_port, f.guest_port):
        if not 0 < p < 65536:
            raise NetHostError(f"port out of range in forward {spec!r}")
    ipaddress.ip_address(f.address)
    return f


def find_passt() -> Optional[str]:
    return shutil.which("passt")


PING_GROUP_RANGE = Path("/proc/sys/net/ipv4/ping_group_range")


def ping_group_range() -> Optional[tuple[int, int]]:
    """net.ipv4.ping_group_range (an empty range has low > high), or None if
    it cannot be read."""
    try:
        lo, hi = (int(x) for x in PING_GROUP_RANGE.read_text().split())
    except (OSError, ValueError):
        return None
    return lo, hi


def passt_gids() -> list[int]:
    """The groups passt runs with: nobody's when we are root (passt drops to
    that user), else ours, primary first."""
    if os.geteuid() == 0:
        try:
            return [pwd.getpwnam("nobody").pw_gid]
        except KeyError:
            return [65534]
    return list(dict.fromkeys([os.getegid(), *os.getgroups()]))


def ping_sockets_allowed(gids: Optional[Iterable[int]] = None,
                         group_range: Optional[tuple[int, int]] = None) -> bool:
    """Whether net.ipv4.ping_group_range (or `group_range`) lets a process
    with these groups (default: passt's, `passt_gids`) open ICMP "ping"
    sockets, which passt needs to forward the guest's pings."""
    lo, hi = group_range or ping_group_range() or (1, 0)
    return any(lo <= g <= hi for g in (passt_gids() if gids is None else gids))


def ping_group_range_fix(group_range: tuple[int, int], gid: int) -> str:
    """The sysctl command that lets group `gid` open ping sockets: the
    current range widened just enough to take it in (or only it, if the
    range is empty, as the kernel's default "1 0" is)."""
    lo, hi = group_range
    lo, hi = (min(lo, gid), max(hi, gid)) if lo <= hi else (gid, gid)
    return f'sysctl -w net.ipv4.ping_group_range="{lo} {hi}"'


def network_warning(requested: str, resolved: str, *, passt_installed: Optional[bool] = None,
                    gids: Optional[Sequence[int]] = None,
                    group_range: Optional[tuple[int, int]] = None) -> Optional[str]:
    """What a user should hear, once, before a guest boots with the network
    `resolved` from `requested` (`--net`: "auto" picks passt if installed,
    else none): that it has none since passt is missing, or that its pings
    will get no answer (passt cannot open ping sockets) and the command
    that fixes it. None when all is well. The keyword arguments stand in for
    the host's state (tests)."""
    if resolved == "none" and requested == "auto":
        if passt_installed is None:
            passt_installed = find_passt() is not None
        if not passt_installed:
            return ("the guest has no network: --net auto found no passt; to give it one, install passt "
                    "(Debian: apt install passt), user-mode networking that needs no root")
    if resolved == "passt":
        group_range = group_range or ping_group_range()
        gids = passt_gids() if gids is None else gids
        if group_range is not None and gids and not ping_sockets_allowed(gids, group_range):
            lo, hi = group_range
            return (f"pings from the guest will get no answer: net.ipv4.ping_group_range ({lo} {hi}) leaves out "
                    f"passt's group {gids[0]}, so passt cannot open ping sockets; as root, "
                    f"{ping_group_range_fix(group_range, gids[0])} lets them through")
    return None


def _log_warning(message: str) -> None:
    log.warning("%s", message)


_warning_sink: Callable[[str], None] = _log_warning


def set_warning_sink(sink: Optional[Callable[[str], None]]) -> None:
    """Where a host end's warnings for the user go (a TAP whose guest gets no
    DHCP answer): `sink(message)`, possibly from another thread; None puts
    back the default, the logging module (this module's logger, WARNING)."""
    global _warning_sink
    _warning_sink = sink or _log_warning


def warn(message: str) -> None:
    _warning_sink(message)


class PasstHost:
    """passt as the vif's host end.

    ``forwards``: host ports (127.0.0.1 only) forwarded into the guest, see
    `parse_forward`. ``mtu``: what passt's DHCP tells the guest (passt's own
    default is 65520; a vif can carry that because we offer feature-sg).
    ``address``/``netmask``/``gateway``/``dns``: override what passt copies
    from the host's default-route interface. ``ipv4_only``: no IPv6.
    ``log_file``: passt's log (default: kept in memory, see ``log``).
    ``extra_args`` go to passt as they are.
    """

    def __init__(
        self,
        forwards: Sequence[ForwardSpec] = (),
        *,
        mtu: Optional[int] = 65520,
        address: Optional[str] = None,
        netmask: Optional[str] = None,
        gateway: Optional[str] = None,
        dns: Optional[Sequence[str]] = None,
        mac: Optional[str] = None,
        ipv4_only: bool = False,
        log_file: Optional[str] = None,
        debug: bool = False,
        extra_args: Sequence[str] = (),
        passt: Optional[str] = None,
    ) -> None:
        self.binary = passt or find_passt()
        if not self.binary:
            raise NetHostError("passt is not installed (Debian: apt-get install passt); "
                               "it provides the guest's user-mode network")
        self.forwards = [parse_forward(f) for f in forwards]
        args = [self.binary, "--foreground", "--stderr"]
        if debug:
            args.append("--debug")
        if log_file:
            args += ["--log-file", log_file]
        if mtu is not None:
            if not 68 <= mtu <= 65520:
                raise NetHostError(f"mtu {mtu} out of range (68-65520)")
            args += ["--mtu", str(mtu)]
        if address:
            args += ["--address", address]
        if netmask:
            args += ["--netmask", netmask]
        if gateway:
            args += ["--gateway", gateway]
        if mac:
            args += ["--mac-addr", mac]
        if dns is not None:
            if not dns:
                args += ["--dns", "none"]
            for d in dns:
                args += ["--dns", d]
        if ipv4_only:
            args.append("--ipv4-only")
        # One option per forward (an address prefix covers a whole list).
        # passt forwards the UDP ports of TCP forwards too unless told:
        # "none" keeps anything else from being bound.
        for proto in ("tcp", "udp"):
            specs = [f.spec() for f in self.forwards if f.proto == proto]
            for spec in specs or ["none"]:
                args += [f"--{proto}-ports", spec]
        args += list(extra_args)

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (ours, theirs):
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                try:
                    s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
                except OSError:
                    pass
        args[1:1] = ["--fd", str(theirs.fileno())]
        self.args = args
        self._log = bytearray()
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, pass_fds=[theirs.fileno()],
                                         start_new_session=True)
        except OSError as e:
            ours.close()
            theirs.close()
            raise NetHostError(f"cannot start {self.binary}: {e.strerror}") from None
        theirs.close()
        self._sock = ours
        self._inbuf = bytearray()
        self._pos = 0
        self.frames_in = self.frames_out = 0
        self.closed = False
        # passt's output, for diagnostics; the thread ends when passt does.
        self._reader = threading.Thread(target=self._read_log, name="passt-log", daemon=True)
        self._reader.start()
        self._finalizer = weakref.finalize(self, _stop_process, self.proc, self._sock)
        # passt reports its configuration and then waits; if the arguments
        # were bad it exits at once.
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.01)
        if self.proc.poll() is not None:
            self._reader.join(1)
            self.close()
            raise NetHostError(f"passt exited with status {self.proc.returncode}: {self.log_text[-2000:]}")
        log.info("passt started (pid %d): %s", self.proc.pid, " ".join(args))

    def _read_log(self) -> None:
        out = self.proc.stdout
        assert out is not None
        for line in iter(out.readline, b""):
            if b"Failed to send" in line and b"syslog" in line:
                continue  # no syslog daemon here: passt says so for every line
            self._log += line
            if len(self._log) > 1 << 20:
                del self._log[: len(self._log) - (1 << 19)]
        out.close()

    @property
    def log_text(self) -> str:
        """What passt printed (its configuration, warnings)."""
        return self._log.decode(errors="replace")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, frame: bytes) -> None:
        """Write one frame to passt. If passt's socket buffer is full, wait
        for room while still taking in what passt sends (passt may itself
        be blocked writing the rest of a frame to us)."""
        if self.closed:
            return
        data = memoryview(_LEN.pack(len(frame)) + frame)
        deadline = None
        while data:
            try:
                n = self._sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if deadline is None:
                    deadline = time.monotonic() + SEND_TIMEOUT
                elif time.monotonic() > deadline:
                    # Half a frame is out: the stream cannot be resynchronised.
                    log.error("passt has not read for %d s; closing the connection", SEND_TIMEOUT)
                    self._broken()
                    return
                readable, _, _ = select.select([self._sock], [self._sock], [], 1.0)
                if readable:
                    self._fill()
                    if self.closed:
                        return
                continue
            except OSError as e:
                if e.errno in (errno.EPIPE, errno.ECONNRESET):
                    log.warning("passt went away: %s", self.log_text[-500:])
                    self._broken()
                    return
                raise
            data = data[n:]
        self.frames_out += 1

    def _broken(self) -> None:
        self.closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _fill(self) -> None:
        """Take in whatever passt has sent (never blocks)."""
        try:
            data = self._sock.recv(1 << 18, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno in (errno.ECONNRESET, errno.EPIPE):
                self.closed = True
                return
            raise
        if not data:
            self.closed = True
            return
        if self._pos:
            del self._inbuf[: self._pos]
            self._pos = 0
        self._inbuf += data

    def recv(self) -> Optional[bytes]:
        """The next complete frame from passt, or None (never blocks)."""
        frame = self._next()
        if frame is not None or self.closed:
            return frame
        self._fill()
        return self._next()

    def _next(self) -> Optional[bytes]:
        buf, pos = self._inbuf, self._pos
        if len(buf) - pos < 4:
            return None
        (n,) = _LEN.unpack_from(buf, pos)
        if n > MAX_FRAME:
            log.error("passt sent a %d-byte frame; dropping the connection", n)
            self.closed = True
            return None
        if len(buf) - pos - 4 < n:
            return None
        frame = bytes(buf[pos + 4 : pos + 4 + n])
        self._pos = pos + 4 + n
        self.frames_in += 1
        return frame

    @property
    def eof(self) -> bool:
        """passt closed its end (it has exited)."""
        return self.closed

    def why_gone(self) -> str:
        """What became of passt, once its connection is gone (for the vif's report)."""
        try:
            status = self.proc.wait(0.5)  # its end closes as it exits: reaped at once, or nearly
        except subprocess.TimeoutExpired:
            return f"passt (pid {self.proc.pid}) closed the connection"
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        return f"passt (pid {self.proc.pid}) {how}"

    def close(self) -> None:
        """Stop passt and wait for it (nothing is left behind)."""
        self.closed = True
        self._finalizer()
        self._reader.join(2)

    def __enter__(self) -> "PasstHost":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PasstHost pid={self.proc.pid} {'running' if self.running else 'exited'}>"


def _stop_process(proc: subprocess.Popen, sock: socket.socket) -> None:
    # Closing our end alone makes passt exit; terminate in case it is wedged.
    try:
        sock.close()
    except OSError:
        pass
    if proc.poll() is None:
        try:
            proc.wait(1)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- TAP

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


DHCP_ANSWER_TIMEOUT = 10.0  # seconds a guest's first DHCPDISCOVER may go unanswered before we say so
ETH_P_IPV4 = 0x0800
IPPROTO_UDP = 17
BOOTP_SERVER_PORT, BOOTP_CLIENT_PORT = 67, 68
BOOTP_REQUEST, BOOTP_REPLY = 1, 2
DHCP_MAGIC_COOKIE = b"\x63\x82\x53\x63"
DHCP_OPTION_MESSAGE_TYPE, DHCP_OPTION_PAD, DHCP_OPTION_END = 53, 0, 255
DHCPDISCOVER = 1


def _bootp(frame: bytes, src_port: int, dst_port: int) -> Optional[memoryview]:
    """The BOOTP message in an Ethernet frame of IPv4/UDP between these
    ports (unfragmented), or None. Every length is checked: the guest's
    frames are untrusted."""
    if len(frame) < 14 + 20 + 8 or int.from_bytes(frame[12:14], "big") != ETH_P_IPV4:
        return None
    ip = memoryview(frame)[14:]
    ihl = (ip[0] & 0xF) * 4
    if ip[0] >> 4 != 4 or ihl < 20 or len(ip) < ihl + 8 or ip[9] != IPPROTO_UDP:
        return None
    if int.from_bytes(ip[6:8], "big") & 0x3FFF:  # more fragments, or not the first
        return None
    udp = ip[ihl:]
    if (int.from_bytes(udp[0:2], "big"), int.from_bytes(udp[2:4], "big")) != (src_port, dst_port):
        return None
    return udp[8:]


def dhcp_message_type(bootp: memoryview) -> Optional[int]:
    """Option 53 of a DHCP message (BOOTP with the magic cookie), or None."""
    if len(bootp) < 240 or bytes(bootp[236:240]) != DHCP_MAGIC_COOKIE:
        return None
    options, at = bootp[240:], 0
    while at < len(options):
        code = options[at]
        if code == DHCP_OPTION_END:
            break
        if code == DHCP_OPTION_PAD:
            at += 1
            continue
        if at + 1 >= len(options):
            break
        size = options[at + 1]
        if code == DHCP_OPTION_MESSAGE_TYPE and size == 1 and at + 2 < len(options):
            return options[at + 2]
        at += 2 + size
    return None


def is_dhcp_discover(frame: bytes) -> bool:
    """A guest's DHCPDISCOVER: client port to server port, a BOOTP request."""
    bootp = _bootp(frame, BOOTP_CLIENT_PORT, BOOTP_SERVER_PORT)
    return bootp is not None and len(bootp) > 0 and bootp[0] == BOOTP_REQUEST and \
        dhcp_message_type(bootp) == DHCPDISCOVER


def is_dhcp_reply(frame: bytes) -> bool:
    """Any answer of a DHCP (or plain BOOTP) server: server port to client port."""
    bootp = _bootp(frame, BOOTP_SERVER_PORT, BOOTP_CLIENT_PORT)
    return bootp is not None and len(bootp) > 0 and bootp[0] == BOOTP_REPLY


class DhcpWatch:
    """Notices a guest whose DHCP requests nothing answers: `timeout` seconds
    after its first DHCPDISCOVER with no reply seen, `on_silence()` is called
    once (on a timer thread). Any reply ends the watch. Frames from the guest
    go to `guest_sent`, frames to it to `host_sent`."""

    def __init__(self, on_silence: Callable[[], None], timeout: float = DHCP_ANSWER_TIMEOUT) -> None:
        self._on_silence = on_silence
        self.timeout = timeout
        self.answered = False
        self.reported = False
        self._timer: Optional[threading.Timer] = None
        self._lock = threading.Lock()

    def guest_sent(self, frame: bytes) -> None:
        if self._timer is not None or self.answered or not is_dhcp_discover(frame):
            return
        with self._lock:
            if self._timer is None and not self.answered:
                self._timer = threading.Timer(self.timeout, self._expired)
                self._timer.daemon = True
                self._timer.start()

    def host_sent(self, frame: bytes) -> None:
        if not self.answered and is_dhcp_reply(frame):
            with self._lock:
                self.answered = True
                if self._timer is not None:
                    self._timer.cancel()

    def _expired(self) -> None:
        with self._lock:
            if self.answered or self.reported:
                return
            self.reported = True
        self._on_silence()

    def close(self) -> None:
        with self._lock:
            self.answered = True  # nothing more to say
            if self._timer is not None:
                self._timer.cancel()


class TapHost:
    """A TAP interface (created if missing, persistent ones reused) as the
    vif's host end. Needs CAP_NET_ADMIN. ``up``: bring the interface up.
    A guest whose DHCP requests get no answer for ``dhcp_timeout`` seconds
    is reported once through `set_warning_sink` (a TAP has no DHCP server
    of its own; the host's side of it must bring one)."""

    def __init__(self, name: str, *, up: bool = True, dhcp_timeout: float = DHCP_ANSWER_TIMEOUT) -> None:
        if not name or len(name.encode()) > 15 or "/" in name:
            raise NetHostError(f"bad TAP interface name {name!r}")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise NetHostError(f"/dev/net/tun: {e.strerror}") from None
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
            res = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as e:
            os.close(fd)
            hint = " (needs root or CAP_NET_ADMIN)" if e.errno == errno.EPERM else ""
            raise NetHostError(f"cannot attach TAP interface {name}: {e.strerror}{hint}") from None
        self.fd = fd
        self.name = res[:16].rstrip(b"\0").decode()
        self.frames_in = self.frames_out = 0
        self.closed = False
        self.dhcp = DhcpWatch(self._dhcp_unanswered, dhcp_timeout)
        if up:
            self._set_up()

    def _set_up(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifr = struct.pack("16sH22x", self.name.encode(), 0)
            flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
            if not flags & IFF_UP:
                fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", self.name.encode(), flags | IFF_UP))

    def _dhcp_unanswered(self) -> None:
        warn(f"the guest has no network on TAP {self.name}: nothing answered its DHCP requests in "
             f"{self.dhcp.timeout:g} s (give {self.name} a DHCP server, e.g. dnsmasq --interface={self.name}, "
             "or bridge it to a network that has one)")

    def fileno(self) -> int:
        return self.fd

    def send(self, frame: bytes) -> None:
        if self.closed:
            return
        self.dhcp.guest_sent(frame)
        try:
            os.write(self.fd, frame)
            self.frames_out += 1
        except BlockingIOError:
            pass  # the host's queue is full: dropped, as a wire would
        except OSError as e:
            if e.errno in (errno.EIO, errno.EINVAL, errno.EMSGSIZE):
                log.debug("tap %s: frame of %d bytes refused: %s", self.name, len(frame), e.strerror)
                return
            raise

    def recv(self) -> Optional[bytes]:
        if self.closed:
            return None
        try:
            frame = os.read(self.fd, MAX_FRAME)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno == errno.EIO:  # interface down
                return None
            raise
        self.frames_in += 1
        self.dhcp.host_sent(frame)
        return frame

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.dhcp.close()
            os.close(self.fd)

    def __enter__(self) -> "TapHost":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# For a busybox guest: udhcpc runs /etc/udhcpc/default.script (which busybox
# does not ship) with the lease in its environment. This one configures the
# interface with iproute2-style busybox `ip`, MTU included (passt offers
# 65520, which a vif carries thanks to feature-sg), and prints the lease.
UDHCPC_SCRIPT = """\
#!/bin/sh
case "$1" in
bound|renew)
    ip link set "$interface" up
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route add default via "$router" dev "$interface"
    echo "DHCP-BOUND ip=$ip mask=$mask router=$router mtu=$mtu"
    ;;
deconfig)
    ip link set "$interface" up
    ip addr flush dev "$interface"
    ;;
esac
exit 0
"""
UDHCPC_SCRIPT_PATH = "etc/udhcpc/default.script"


def open_host(spec: str, forwards: Sequence[ForwardSpec] = ()) -> Optional[NetHost]:
    """``"passt"`` -> PasstHost(forwards), ``"tap:NAME"`` -> TapHost(NAME),
    ``"none"`` -> None (a vif with nothing behind it)."""
    if spec == "none":
        return None
    if spec == "passt":
        return PasstHost(forwards)
    if spec.startswith("tap:"):
        if forwards:
            raise NetHostError("port forwards need --net passt")
        return TapHost(spec[4:])
    raise NetHostError(f"unknown network {spec!r} (want passt, tap:NAME or none)")


__all__ = ["UDHCPC_SCRIPT", "UDHCPC_SCRIPT_PATH", "NetHost", "PasstHost", "TapHost", "Forward", "parse_forward",
           "open_host", "NetHostError", "ping_sockets_allowed", "ping_group_range", "ping_group_range_fix",
           "passt_gids", "network_warning", "set_warning_sink", "DhcpWatch", "find_passt"]
