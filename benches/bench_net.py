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

`measure_vs_qemu()` (`--vs-qemu`) compares with QEMU TCG instead: the same
kernel with an initramfs of its own (NET_INIT) booted as a process under
pvhvm (`--net passt`) and under QEMU (virtio-net on `-netdev user`, whose
gateway 10.0.2.2 is the host's loopback too), alternated; the guest's /init
takes a DHCP lease and does both transfers above with no shell to drive.

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


def send_to_guest(port: int, nbytes: int, timeout: float, result: dict) -> None:
    """Send `nbytes` of zeros to 127.0.0.1:`port` (forwarded to the guest's
    nc), wait until the guest closes; the seconds go to result["s"], a
    failure to result["error"]."""
    try:
        t = time.perf_counter()
        c = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        chunk = bytes(1 << 20)
        for _ in range(nbytes >> 20):
            c.sendall(chunk)
        c.shutdown(socket.SHUT_WR)
        c.recv(1)  # until the guest's nc closes
        result["s"] = time.perf_counter() - t
        c.close()
    except OSError as e:
        result["error"] = f"{type(e).__name__}: {e}"


def receive_from_guest(srv: socket.socket, nbytes: int, timeout: float, result: dict) -> None:
    """Accept one connection on `srv` and read up to `nbytes` (busybox nc may
    not close at the end of its input); seconds and bytes go to result["s"]
    and result["n"], a failure to result["error"]."""
    try:
        c, _ = srv.accept()
        c.settimeout(timeout)
        t, n = time.perf_counter(), 0
        while n < nbytes:
            b = c.recv(1 << 20)
            if not b:
                break
            n += len(b)
        result.update(s=time.perf_counter() - t, n=n)
        c.close()
    except OSError as e:
        result["error"] = f"{type(e).__name__}: {e}"


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

            sender = threading.Thread(target=send_to_guest, args=(fport, nbytes, 600, h2g), daemon=True)
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

            receiver = threading.Thread(target=receive_from_guest, args=(srv, nbytes, 600, g2h), daemon=True)
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


# --------------------------------------------------------------------------- pvhvm vs QEMU

# /init of the guest measure_vs_qemu() boots (under both hypervisors): the
# network card's driver, a DHCP lease, then the two transfers, announced on
# the console for the host to follow, then power-off. netbench=COUNT,PORT on
# the command line: COUNT 64 KiB blocks guest -> host, to PORT on the gateway.
NET_INIT = """\
#!/bin/sh
# benches/bench_net.py measure_vs_qemu(): TCP both ways through the gateway.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "PVHVM-INIT-OK uptime=$(cut -d' ' -f1 /proc/uptime)"
count=128 port=0
for a in $(cat /proc/cmdline); do
    case "$a" in netbench=*) set -- $(echo "${a#netbench=}" | tr , ' '); count=$1; port=$2 ;; esac
done
if [ "$(cat /sys/hypervisor/type 2>/dev/null)" = xen ]; then
    modprobe xen-netfront
else
    modprobe virtio_pci; modprobe virtio_net
fi
i=0
while ! ip link show eth0 >/dev/null 2>&1 && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if ! udhcpc -i eth0 -q -n -t 5 -T 2; then echo "NETBENCH-FAIL no DHCP lease"; poweroff -f; fi
set -- $(ip route show default)
gw=$3
# stdin a FIFO no one writes: nc must not see EOF on it.
mkfifo /tmp/nc-in
nc -l -p __GUEST_PORT__ <>/tmp/nc-in >/dev/null &
nc_pid=$!
sleep 0.3
echo "NETBENCH-LISTEN gw=$gw"
wait $nc_pid
echo "NETBENCH-H2G-DONE"
dd if=/dev/zero bs=65536 count=$count 2>/dev/null | nc $gw $port
echo "NETBENCH-DONE"
poweroff -f
""".replace("__GUEST_PORT__", str(GUEST_PORT))

NET_PATTERNS = {
    "init": re.compile(rb"PVHVM-INIT-OK"),
    "bound": re.compile(rb"DHCP-BOUND ip=(\S+) mask=(\d+) router=(\S+)"),
    "listen": re.compile(rb"NETBENCH-LISTEN"),
    "h2g": re.compile(rb"NETBENCH-H2G-DONE"),
    "done": re.compile(rb"NETBENCH-DONE"),
    "fail": re.compile(rb"NETBENCH-FAIL[^\r\n]*"),
}


def _net_guest():
    from pvhvm.images import prepare_default_guest

    # virtio_net for QEMU's card; xen-netfront is a default module.
    return prepare_default_guest(init_script=NET_INIT, modules=["virtio_net"])


def _vs_qemu_commands(g, fport: int, cmdline: str) -> dict[str, list[str]]:
    from bench_boot import MEMORY_MIB, QEMU, QEMU_SAME_CPU

    pvhvm_cmd = [sys.executable, "-m", "pvhvm", "boot", str(g.vmlinux), "--initrd", str(g.initrd), "--memory",
                 str(MEMORY_MIB), "--cmdline", f"console=hvc0 {cmdline}", "--net", "passt",
                 "--forward", f"{fport}:{GUEST_PORT}"]
    # QEMU's user-mode network (slirp): the host's loopback is 10.0.2.2,
    # the gateway, as passt's gateway is for pvhvm.
    qemu_cmd = [QEMU, "-M", "pc", "-accel", "tcg", "-cpu", QEMU_SAME_CPU, "-m", str(MEMORY_MIB),
                "-kernel", str(g.vmlinux), "-initrd", str(g.initrd), "-append", f"console=ttyS0 panic=-1 {cmdline}",
                "-nographic", "-nodefaults", "-no-reboot", "-serial", "stdio",
                "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{fport}-:{GUEST_PORT}",
                "-device", "virtio-net-pci,netdev=n0"]
    return {"pvhvm": pvhvm_cmd, "qemu": qemu_cmd}


def _one_vs_qemu_run(name: str, g, nbytes: int, timeout: float) -> dict:
    """One boot of the NET_INIT guest: both transfers, timed on the host."""
    from bench_disk import watch

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(timeout)
    fport = _free_port()
    cmd = _vs_qemu_commands(g, fport, f"netbench={nbytes >> 16},{srv.getsockname()[1]}")[name]
    h2g: dict = {}
    g2h: dict = {}

    sender = threading.Thread(target=send_to_guest, args=(fport, nbytes, timeout, h2g), daemon=True)
    receiver = threading.Thread(target=receive_from_guest, args=(srv, nbytes, timeout, g2h), daemon=True)
    receiver.start()

    def on_match(what: str, m, t: float) -> None:
        if what == "listen":
            sender.start()

    try:
        r = watch(cmd, NET_PATTERNS, stop=("done",), timeout=timeout, grace={"fail": 2}, on_match=on_match,
                  idle_timeout=120)
    finally:
        srv.close()
    if sender.ident is not None:
        sender.join(5)
    receiver.join(5)
    out: dict = {"wall_s": round(r["wall_s"], 3)}
    if "bound" in r["times"]:
        m = NET_PATTERNS["bound"].search(r["out"])
        out["guest_ip"], out["gateway"] = m[1].decode(), m[3].decode()
    if "s" in h2g and "h2g" in r["times"]:
        out["tcp_host_to_guest_mbit_s"] = round(nbytes * 8 / h2g["s"] / 1e6, 3)
    else:
        out["tcp_host_to_guest_error"] = h2g.get("error") or _console_why(r)
    if g2h.get("n") == nbytes:
        out["tcp_guest_to_host_mbit_s"] = round(nbytes * 8 / g2h["s"] / 1e6, 3)
    else:
        out["tcp_guest_to_host_error"] = g2h.get("error") or f"the host got {g2h.get('n')} of {nbytes} bytes"
    if any(k.endswith("_error") for k in out):
        out["failed"] = True
        out["console_tail"] = r["out"][-1500:].decode(errors="replace")
    return out


def _console_why(r: dict) -> str:
    m = NET_PATTERNS["fail"].search(r["out"])
    if m:
        return m[0].decode(errors="replace")
    if "bound" not in r["times"]:
        return "no DHCP lease"
    return "timed out" if r["timed_out"] else f"the guest did not finish (exit {r['returncode']})"


def measure_vs_qemu(quick: bool = False, runs: int = 1, skip_qemu: bool = False, timeout: float = 300,
                    log=sys.stderr) -> dict:
    """TCP throughput both ways, pvhvm (netfront, pvhvm's netback, passt)
    against QEMU TCG (virtio-net, -netdev user), the same guest and the
    same transfers, alternated `runs` times; medians and pvhvm/QEMU ratios.
    A side that cannot run here (no passt, no QEMU) is left out with its
    reason in "skipped"."""
    import shutil
    import statistics

    from bench_boot import QEMU
    from bench_disk import run_order
    from pvhvm.devices import net_host

    nbytes = (8 if quick else 32) << 20
    names, skipped = [], {}
    if not backend_present():
        skipped["pvhvm"] = "network backend not present"
    elif net_host.find_passt() is None:
        skipped["pvhvm"] = "passt is not installed (apt-get install passt)"
    else:
        names.append("pvhvm")
    if skip_qemu:
        skipped["qemu"] = "--skip-qemu"
    elif shutil.which(QEMU) is None:
        skipped["qemu"] = f"{QEMU} not found"
    else:
        names.append("qemu")
    if not names:
        raise NotMeasured("; ".join(f"{k}: {v}" for k, v in skipped.items()))
    g = _net_guest()
    samples: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(runs):
        for name in run_order(names, i):
            r = _one_vs_qemu_run(name, g, nbytes, timeout)
            samples[name].append(r)
            h2g = (f"{r['tcp_host_to_guest_mbit_s']:.1f}" if "tcp_host_to_guest_mbit_s" in r
                   else f"FAILED ({r['tcp_host_to_guest_error']})")
            g2h = (f"{r['tcp_guest_to_host_mbit_s']:.1f}" if "tcp_guest_to_host_mbit_s" in r
                   else f"FAILED ({r['tcp_guest_to_host_error']})")
            print(f"  net vs qemu run {i + 1}/{runs} {name:6} host->guest {h2g} Mbit/s, guest->host {g2h} Mbit/s, "
                  f"wall {r['wall_s']:.1f} s", file=log, flush=True)
    keys = ("tcp_host_to_guest_mbit_s", "tcp_guest_to_host_mbit_s")
    median = {n: {k: (round(statistics.median(v), 3) if (v := [s[k] for s in ss if k in s]) else None)
                  for k in keys} for n, ss in samples.items()}
    ratios = {}
    if "pvhvm" in median and "qemu" in median:
        for k in keys:
            a, b = median["pvhvm"][k], median["qemu"][k]
            ratios[k] = round(a / b, 3) if a is not None and b else None
    return {"bytes": nbytes, "runs": samples, "median": median, "ratio_pvhvm_over_qemu": ratios,
            "failed_runs": {n: sum(1 for s in ss if s.get("failed")) for n, ss in samples.items()},
            "skipped": skipped}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--vs-qemu", action="store_true",
                    help="Instead: TCP both ways, pvhvm (passt) against QEMU TCG (-netdev user), alternated.")
    ap.add_argument("--runs", type=int, default=1, help="With --vs-qemu: runs per hypervisor.")
    args = ap.parse_args()
    try:
        if args.vs_qemu:
            print(json.dumps(measure_vs_qemu(args.quick, args.runs), indent=2, default=str))
        else:
            print(json.dumps(measure(args.quick), indent=2, default=str))
    except NotMeasured as e:
        print(f"not measured: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
