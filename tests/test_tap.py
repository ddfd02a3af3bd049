"""As root: the Debian guest's netfront on a host TAP device, pinged with the
host's own ping. Everything happens in a network namespace this test makes,
so the guest's addresses exist only there."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from pvhvm.images import prepare_default_guest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="a TAP device needs root (CI runs as root)"),
]

GUEST_IP, HOST_IP = "10.99.0.2", "10.99.0.1"
INIT = f"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
modprobe xen-netfront
ip addr add {GUEST_IP}/24 dev eth0
ip link set eth0 up
echo NET-UP
read line
poweroff -f
"""


def test_host_pings_the_guest_through_tap():
    assert shutil.which("ip") and shutil.which("ping"), "iproute2 and ping are needed"
    tap = "pvtap0"
    with booted_on_tap(INIT, "pvhvm-tap", tap) as (ns, p):
        out = b""
        deadline = time.monotonic() + 120
        os.set_blocking(p.stdout.fileno(), False)
        while b"NET-UP" not in out and time.monotonic() < deadline and p.poll() is None:
            chunk = p.stdout.read() or b""
            out += chunk
            time.sleep(0.05)
        assert b"NET-UP" in out, out.decode(errors="replace")[-2000:]
        run = lambda *a: subprocess.run(["ip", "netns", "exec", ns, *a], capture_output=True, text=True)  # noqa: E731
        assert run("ip", "addr", "add", f"{HOST_IP}/24", "dev", tap).returncode == 0
        assert run("ip", "link", "set", tap, "up").returncode == 0
        ping = run("ping", "-c", "5", "-i", "0.2", "-W", "5", GUEST_IP)
        assert "5 packets transmitted, 5 received, 0% packet loss" in ping.stdout, ping.stdout + ping.stderr
        p.stdin.write(b"\n")
        p.stdin.close()
        assert p.wait(60) == 0


@contextlib.contextmanager
def booted_on_tap(init: str, ns_prefix: str, tap: str):
    """`pvhvm boot` of the default guest with `init`, its vif on a TAP in a
    network namespace of its own: (namespace, process); both go after."""
    guest = prepare_default_guest(init_script=init)
    ns = f"{ns_prefix}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    p = None
    try:
        p = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "pvhvm", "boot", str(guest.vmlinux),
             "--initrd", str(guest.initrd), "--cmdline", "console=hvc0", "--net", f"tap:{tap}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        yield ns, p
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        subprocess.run(["ip", "netns", "delete", ns])


DHCP_INIT = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
modprobe xen-netfront
udhcpc -i eth0 -q -n -t 8 -T 2 || echo DHCP-GAVE-UP
read line
poweroff -f
"""


def test_cli_says_once_that_nothing_answers_dhcp_on_the_tap():
    """The guest asks for DHCP on a TAP that nothing serves: ~10 s after its
    first DISCOVER, pvhvm says once on stderr that it has no network there."""
    tap = "pvtap1"
    with booted_on_tap(DHCP_INIT, "pvhvm-dhcp", tap) as (_, p):
        out = err = b""
        os.set_blocking(p.stdout.fileno(), False)
        os.set_blocking(p.stderr.fileno(), False)
        deadline = time.monotonic() + 180
        while b"DHCP-GAVE-UP" not in out and time.monotonic() < deadline and p.poll() is None:
            out += p.stdout.read() or b""
            err += p.stderr.read() or b""
            time.sleep(0.05)
        assert b"DHCP-GAVE-UP" in out, out.decode(errors="replace")[-2000:]
        p.stdin.write(b"\n")
        p.stdin.close()
        assert p.wait(60) == 0
        err += p.stderr.read() or b""
        said = [line for line in err.decode().splitlines() if "has no network" in line]
        assert said == [f"pvhvm: the guest has no network on TAP {tap}: nothing answered its DHCP requests in 10 s "
                        f"(give {tap} a DHCP server, e.g. dnsmasq --interface={tap}, or bridge it to a network "
                        "that has one)"], err.decode()
