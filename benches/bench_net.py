#!/usr/bin/env python3
"""Network: ping round trip and TCP throughput of the default guest's vif
(xen-netfront in the guest, pvhvm's netback on passt on the host).

    .venv/bin/python benches/bench_net.py [--quick]

The default guest boots in-process with `net="passt"` and "pvhvm.net
pvhvm.shell" on its command line (its /init loads xen-netfront and takes a
DHCP lease from passt, then starts a shell on hvc0, driven from here):

* ping: `ping -c N -i 0.2 <gateway>` from the guest (passt answers for the
  host); the rtt min/avg/max busybox prints. passt forwards pings with ICMP
  "ping" sockets, which net.ipv4.ping_group_range must allow for its group;
  as root the range is opened for the run and put back afterwards (as
  tests/test_netback.py does), otherwise ping is not measured.
* TCP host -> guest: a host client sends B bytes to 127.0.0.1:<fport>,
  which passt forwards to the guest's `nc -l > /dev/null`; timed from
  connect until the guest's nc closes.
* TCP guest -> host: the guest's `dd if=/dev/zero | nc <gateway> <port>`
  to a host server on 127.0.0.1 (passt maps the gateway to the host's
  loopback); timed from accept to EOF on the host.

`measure()` raises NotMeasured with the reason when something needed is
missing (the network backend, passt); benches/run_all.py records the reason
instead of a number.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

GUEST_PORT = 5001
PING_GROUP_RANGE = Path("/proc/sys/net/ipv4/ping_group_range")


class NotMeasured(Exception):
    """The reason a network number could not be measured here."""


def backend_present() -> bool:
    return importlib.util.find_spec("pvhvm.devices.netback") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _PingRange:
    """Let passt's group open ICMP ping sockets for the run, if we may."""

    def __init__(self) -> None:
        self.old: str | None = None
        self.ours: str | None = None
        self.reason: str | None = None

    def __enter__(self) -> "_PingRange":
        from pvhvm.devices.net_host import ping_sockets_allowed

        if ping_sockets_allowed():
            return self
        if os.geteuid() != 0:
            self.reason = "net.ipv4.ping_group_range excludes passt's group (not root to open it)"
            return self
        try:
            self.old = PING_GROUP_RANGE.read_text()
            self.ours = "0 2147483647\n"
            PING_GROUP_RANGE.write_text(self.ours)
        except OSError as e:
            self.reason = f"cannot open net.ipv4.ping_group_range for passt's pings: {e}"
            self.old = None
        return self

    def __exit__(self, *exc) -> None:
        if self.old is not None:
            try:
                # Put it back unless someone else changed it meanwhile.
                if PING_GROUP_RANGE.read_text().split() == self.ours.split():
                    PING_GROUP_RANGE.write_text(self.old)
            except OSError:
                pass


def measure(quick: bool = False, log=sys.stderr) -> dict:
    if not backend_present():
        raise NotMeasured("network backend not present")
    import pvhvm
    from pvhvm.devices import net_host
    from pvhvm.images import prepare_default_guest
    from pvhvm.shell import GuestShell

    if net_host.find_passt() is None:
        raise NotMeasured("passt is not installed (apt-get install passt)")
    nbytes = (8 if quick else 32) << 20
    pings = 10 if quick else 30
    g = prepare_default_guest()
    fport = _free_port()
    result: dict = {"bytes": nbytes}
    with _PingRange() as ping_range:
        dom = pvhvm.Domain(g.vmlinux, initrd=g.initrd, cmdline="console=hvc0 pvhvm.net pvhvm.shell",
                           memory_mib=256, net="passt", net_forwards=[(fport, GUEST_PORT)])
        try:
            m = dom.expect(rb"DHCP-BOUND ip=(\S+) mask=(\d+) router=(\S+) mtu=(\d*)", 180)
            router = m.group(3).decode()
            result["mtu"] = int(m.group(4) or 0)
            sh = GuestShell(dom)
            sh.run("true", 60)  # the shell is up

            if ping_range.reason:
                result["ping_status"] = f"not measured: {ping_range.reason}"
            else:
                out = sh.run(f"ping -c {pings} -i 0.2 {router}", 60 + pings)
                rtt = re.search(r"round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms", out)
                loss = re.search(r"(\d+)% packet loss", out)
                if rtt:
                    result["ping_ms"] = {"min": float(rtt[1]), "avg": float(rtt[2]), "max": float(rtt[3]),
                                         "n": pings, "loss_pct": int(loss[1]) if loss else None}
                else:
                    result["ping_status"] = f"not measured: ping failed: {out.strip()[-200:]}"
            print(f"  net: ping {result.get('ping_ms') or result.get('ping_status')}", file=log)

            # host -> guest
            # stdin a FIFO no one writes, not the console: a background
            # reader of the tty is stopped by SIGTTIN when the next command
            # line arrives (see tests/test_netback.py).
            out = sh.run(f"mkfifo /tmp/nc-in; nc -l -p {GUEST_PORT} <>/tmp/nc-in >/dev/null & sleep 0.3", 60)
            h2g: dict = {}

            def send() -> None:
                try:
                    t = time.perf_counter()
                    c = socket.create_connection(("127.0.0.1", fport), timeout=600)
                    chunk = bytes(1 << 20)
                    for _ in range(nbytes >> 20):
                        c.sendall(chunk)
                    c.shutdown(socket.SHUT_WR)
                    c.recv(1)  # until the guest's nc closes
                    h2g["s"] = time.perf_counter() - t
                    c.close()
                except OSError as e:
                    h2g["error"] = str(e)

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            sh.run("wait", 600)
            sender.join(60)
            if "s" in h2g:
                result["tcp_host_to_guest_mbit_s"] = nbytes * 8 / h2g["s"] / 1e6
            else:
                result["tcp_host_to_guest_status"] = f"not measured: {h2g.get('error', 'no transfer')}"

            # guest -> host
            srv = socket.socket()
            srv.bind(("127.0.0.1", 0))
            srv.listen(1)
            srv.settimeout(600)
            g2h: dict = {}

            def receive() -> None:
                try:
                    c, _ = srv.accept()
                    t, n = time.perf_counter(), 0
                    while True:
                        b = c.recv(1 << 20)
                        if not b:
                            break
                        n += len(b)
                    g2h.update(s=time.perf_counter() - t, n=n)
                    c.close()
                except OSError as e:
                    g2h["error"] = str(e)

            receiver = threading.Thread(target=receive, daemon=True)
            receiver.start()
            sh.run(f"dd if=/dev/zero bs=65536 count={nbytes >> 16} 2>/dev/null | nc {router} {srv.getsockname()[1]}",
                   600)
            receiver.join(60)
            srv.close()
            if g2h.get("n") == nbytes:
                result["tcp_guest_to_host_mbit_s"] = nbytes * 8 / g2h["s"] / 1e6
            else:
                why = g2h.get("error") or f"the host got {g2h.get('n')} of {nbytes} bytes"
                result["tcp_guest_to_host_status"] = f"not measured: {why}"
            if dom.vifs:
                result["vif_stats"] = dict(getattr(dom.vifs[0], "stats", {}) or {})
        finally:
            dom.close()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    try:
        print(json.dumps(measure(args.quick), indent=2, default=str))
    except NotMeasured as e:
        print(f"not measured: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
