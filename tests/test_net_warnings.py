"""What pvhvm tells a user whose guest has no working network, once, on
stderr: --net auto with no passt installed; passt unable to forward pings
(net.ipv4.ping_group_range leaves out its group), with the sysctl command
that fixes it; a TAP on which nothing answers the guest's DHCP.

The kernel's side (ping sockets, TAP devices, network namespaces) needs
root; those tests are skipped otherwise, as in test_netback.py and
test_tap.py. The rest runs anywhere."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

from pvhvm.devices import net_host
from pvhvm.devices.net_host import DhcpWatch, is_dhcp_discover, is_dhcp_reply, network_warning

PVHVM = [sys.executable, "-m", "pvhvm"]
IS_ROOT = os.geteuid() == 0
needs_netns = pytest.mark.skipif(not IS_ROOT or shutil.which("unshare") is None or shutil.which("ip") is None,
                                 reason="a network namespace of our own needs root, unshare and ip")


# --------------------------------------------------------------------------- what is said


def test_auto_without_passt_says_the_guest_has_no_network():
    message = network_warning("auto", "none", passt_installed=False)
    assert message.startswith("the guest has no network") and "apt install passt" in message
    assert network_warning("none", "none", passt_installed=False) is None  # asked for none: nothing to say
    assert network_warning("auto", "passt", gids=[65534], group_range=(0, 2147483647)) is None


@pytest.mark.parametrize("group_range, gid, fixed", [
    ((1, 0), 65534, (65534, 65534)),  # the kernel's default: nobody may
    ((0, 1000), 65534, (0, 65534)),  # widened just enough
    ((100, 200), 50, (50, 200)),
])
def test_ping_warning_names_the_sysctl_that_lets_passt_in(group_range, gid, fixed):
    message = network_warning("passt", "passt", gids=[gid], group_range=group_range)
    command = f'sysctl -w net.ipv4.ping_group_range="{fixed[0]} {fixed[1]}"'
    assert message.startswith("pings from the guest will get no answer") and command in message, message
    assert f"leaves out passt's group {gid}" in message
    assert net_host.ping_sockets_allowed([gid], fixed) and not net_host.ping_sockets_allowed([gid], group_range)
    assert network_warning("passt", "passt", gids=[gid], group_range=fixed) is None
    assert network_warning("tap:x", "tap:x", gids=[gid], group_range=group_range) is None  # no passt, no pings


def test_passt_runs_as_nobody_when_we_are_root():
    if IS_ROOT:
        import pwd

        assert net_host.passt_gids() == [pwd.getpwnam("nobody").pw_gid]
    else:
        assert net_host.passt_gids()[0] == os.getegid()


PING_SOCKET_PROBE = """
import os, socket, sys
os.setgroups([])
os.setgid(int(sys.argv[1]))
os.setuid(65534)
try:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
    print("allowed")
except PermissionError:
    print("refused")
"""


@needs_netns
def test_the_suggested_sysctl_lets_passts_group_open_ping_sockets():
    """In a network namespace of its own (ping_group_range is per
    namespace, "1 0" when new), the kernel refuses passt's group a ping
    socket; after the command pvhvm prints, it gives it one."""
    gid = net_host.passt_gids()[0]
    message = network_warning("passt", "passt", gids=[gid], group_range=(1, 0))
    command = message[message.index("sysctl -w"):].split(" lets ")[0]
    if shutil.which("sysctl") is None:
        pytest.skip("no sysctl (procps)")
    probe = f"{sys.executable} -c '{PING_SOCKET_PROBE}' {gid}"
    script = f"{probe}; {command} >/dev/null; {probe}"
    p = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert p.stdout.split() == ["refused", "allowed"], (p.stdout, p.stderr)


# --------------------------------------------------------------------------- the CLI says it once


def test_cli_auto_without_passt_says_so_once(guests, tmp_path):
    """No passt on PATH: the guest boots without a network, and pvhvm says
    so once, with how to get one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {**os.environ, "PATH": str(bin_dir)}
    p = subprocess.run([*PVHVM, "boot", str(guests["hello"]), "--memory", "32"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    said = [line for line in p.stderr.splitlines() if "the guest has no network" in line]
    assert len(said) == 1 and said[0].startswith("pvhvm: ") and "apt install passt" in said[0], p.stderr
    assert "Hello from a PVH guest" in p.stdout


NETNS_WITH_A_ROUTE = """
ip link set lo up
ip tuntap add pvdummy0 mode tap  # no dummy module needed: a TAP nobody opens
ip addr add 10.98.0.2/24 dev pvdummy0
ip link set pvdummy0 up
ip route add default via 10.98.0.1
"""


@needs_netns
@pytest.mark.skipif(net_host.find_passt() is None, reason="passt is not installed (apt-get install passt)")
def test_cli_passt_without_ping_sockets_says_so_once_with_the_fix(guests):
    """In a namespace of its own with a route out (passt wants one) and the
    kernel's default ping_group_range, `boot --net passt` says once that
    pings will go unanswered and which sysctl fixes it; after that sysctl
    it says nothing."""
    boot = f"{sys.executable} -m pvhvm boot {guests['hello']} --memory 32 --net passt"
    p = subprocess.run(["unshare", "-n", "sh", "-ec", NETNS_WITH_A_ROUTE + boot], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    said = [line for line in p.stderr.splitlines() if "ping" in line]
    assert len(said) == 1 and said[0].startswith("pvhvm: pings from the guest will get no answer"), p.stderr
    fix = said[0][said[0].index("sysctl -w "):].split(" lets ")[0]
    p = subprocess.run(["unshare", "-n", "sh", "-ec", NETNS_WITH_A_ROUTE + f"{fix} >/dev/null\n" + boot],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "ping" not in p.stderr, p.stderr


# --------------------------------------------------------------------------- DHCP on a TAP

GUEST_MAC = bytes.fromhex("00163e0a0b0c")


def udp_frame(src_port: int, dst_port: int, payload: bytes, ihl: int = 5, frag: int = 0) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + 8 + len(payload), 1, frag, 64, 17, 0,
                     bytes(4), b"\xff" * 4) + bytes(4 * (ihl - 5))
    udp = struct.pack("!HHHH", src_port, dst_port, 8 + len(payload), 0)
    return b"\xff" * 6 + GUEST_MAC + b"\x08\x00" + ip + udp + payload


def bootp(op: int, message_type: int | None, options: bytes = b"") -> bytes:
    fixed = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", op, 1, 6, 0, 0x1234, 0, 0x8000, bytes(4), bytes(4),
                        bytes(4), bytes(4), GUEST_MAC, bytes(64), bytes(128))
    msg = fixed + b"\x63\x82\x53\x63" + options
    if message_type is not None:
        msg += bytes([53, 1, message_type])
    return msg + b"\xff"


DISCOVER = udp_frame(68, 67, bootp(1, 1, options=b"\x00\x00" + bytes([12, 4]) + b"host"))  # pads, a hostname
OFFER = udp_frame(67, 68, bootp(2, 2))


def test_dhcp_frames_are_told_apart():
    assert is_dhcp_discover(DISCOVER) and not is_dhcp_reply(DISCOVER)
    assert is_dhcp_reply(OFFER) and not is_dhcp_discover(OFFER)
    assert not is_dhcp_discover(udp_frame(68, 67, bootp(1, 3)))  # a REQUEST
    assert not is_dhcp_discover(udp_frame(68, 67, bootp(1, None)))  # plain BOOTP
    assert not is_dhcp_discover(udp_frame(68, 67, bootp(1, 1), frag=0x2000))  # a first fragment
    assert is_dhcp_discover(udp_frame(68, 67, bootp(1, 1), ihl=6))  # IP options
    assert not is_dhcp_discover(udp_frame(5353, 67, bootp(1, 1)))
    assert not is_dhcp_discover(DISCOVER[:12] + b"\x86\xdd" + DISCOVER[14:])


def test_hostile_frames_never_break_the_watch():
    """Guest frames are untrusted: every truncation of a DISCOVER, and bytes
    flipped in its headers and options, are parsed without an exception."""
    for n in range(len(DISCOVER) + 1):
        is_dhcp_discover(DISCOVER[:n])
        is_dhcp_reply(OFFER[:n])
    options_at = 14 + 20 + 8 + 240
    for at in [*range(14, 14 + 28), *range(options_at, len(DISCOVER))]:
        for value in (0x00, 0x0F, 0xFF):
            frame = bytearray(DISCOVER)
            frame[at] = value
            is_dhcp_discover(bytes(frame))
    assert not is_dhcp_discover(DISCOVER[:-6] + bytes([53, 40]))  # an option running past the end


def test_dhcp_watch_speaks_once_after_the_timeout_without_a_reply():
    said = []
    watch = DhcpWatch(lambda: said.append(time.monotonic()), timeout=0.3)
    start = time.monotonic()
    watch.guest_sent(DISCOVER)
    time.sleep(0.1)
    watch.guest_sent(DISCOVER)  # udhcpc's retries: still one timer from the first
    deadline = time.monotonic() + 5
    while not said and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(said) == 1 and 0.3 <= said[0] - start < 2
    watch.guest_sent(DISCOVER)
    time.sleep(0.5)
    assert len(said) == 1 and watch.reported


def test_dhcp_watch_is_quiet_when_answered_or_never_asked():
    said = []
    watch = DhcpWatch(lambda: said.append(1), timeout=0.2)
    watch.guest_sent(DISCOVER)
    watch.host_sent(OFFER)
    quiet = DhcpWatch(lambda: said.append(2), timeout=0.2)
    quiet.guest_sent(udp_frame(68, 67, bootp(1, 3)))  # a REQUEST alone starts nothing
    closed = DhcpWatch(lambda: said.append(3), timeout=0.2)
    closed.guest_sent(DISCOVER)
    closed.close()
    time.sleep(0.5)
    assert said == [] and watch.answered and not watch.reported


def _can_tap() -> bool:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return IS_ROOT


@pytest.fixture
def warnings_said():
    said: list[str] = []
    net_host.set_warning_sink(said.append)
    yield said
    net_host.set_warning_sink(None)


@pytest.mark.skipif(not _can_tap(), reason="TAP needs root (CAP_NET_ADMIN) and /dev/net/tun")
def test_tap_says_once_that_nothing_answers_dhcp(warnings_said):
    """The guest's DISCOVERs go out on a real TAP that nothing serves: the
    warning sink hears once that the guest has no network on it."""
    name = f"pvd{os.getpid() % 100000}"
    with net_host.TapHost(name, dhcp_timeout=0.4) as tap:
        for _ in range(3):
            tap.send(DISCOVER)
            time.sleep(0.3)
        deadline = time.monotonic() + 5
        while not warnings_said and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
    assert len(warnings_said) == 1, warnings_said
    assert warnings_said[0].startswith(f"the guest has no network on TAP {name}: nothing answered its DHCP")


@pytest.mark.skipif(not _can_tap(), reason="TAP needs root (CAP_NET_ADMIN) and /dev/net/tun")
def test_tap_with_a_dhcp_answer_says_nothing(warnings_said):
    """An OFFER sent on the TAP's host side (as a DHCP server there would)
    reaches the vif's host end, and the watch stays quiet."""
    name = f"pve{os.getpid() % 100000}"
    with net_host.TapHost(name, dhcp_timeout=0.5) as tap:
        tap.send(DISCOVER)
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as server:
            server.bind((name, 0))
            server.send(OFFER)
        deadline = time.monotonic() + 2
        while not tap.dhcp.answered and time.monotonic() < deadline:
            while (frame := tap.recv()) is not None and frame != OFFER:
                pass
            time.sleep(0.02)
        assert tap.dhcp.answered
        time.sleep(0.8)
    assert warnings_said == []
