"""Fault injection with real processes and real guests (issue 15): passt
dies under a running Linux guest, the disk image's file system fills up, a
host xenstore client vanishes mid-transaction, and SIGTERM/SIGINT reach
`pvhvm boot`, `pvhvm restore` and a background domain while it is built,
runs or saves. Each must end cleanly: the domain lives on (or goes with
nothing left behind: no passt, no socket, no half-written file)."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket as socket_mod
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import pvhvm
from pvhvm import savefile
from pvhvm.devices import net_host
from pvhvm.devices.blkback import punch_hole
from pvhvm.shell import GuestShell
from pvhvm.xenbus import XenbusState
from pvhvm.xenstore import XenstoreSocketServer, XsType

from test_terminal import PtySession
from test_toolstack import linux_cfg, nothing_left, rt  # noqa: F401 - rt is a fixture
from test_toolstack import run as pvhvm_run
from test_xenstore_socket import DOMID, Raw, drive, idle_kernel, loop_until, read_ok  # noqa: F401

PVHVM = [sys.executable, "-m", "pvhvm"]
MARKER = "PVHVM-INIT-OK"
MIB = 1 << 20

needs_passt = pytest.mark.skipif(net_host.find_passt() is None, reason="passt is not installed (apt-get install passt)")


@pytest.fixture(scope="module")
def default_guest():
    from pvhvm.images import prepare_default_guest

    return prepare_default_guest()


@pytest.fixture(scope="module")
def blk_guest():
    from pvhvm.images import prepare_default_guest

    return prepare_default_guest(modules=["xen-blkfront"])


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def is_passt(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().startswith("passt")
    except OSError:
        return False


def gone(pid: int, timeout: float = 10) -> bool:
    """The process has exited (a zombie of init's counts: it is reaped soon)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.01)
    pytest.fail(f"{what} within {timeout} s")


# --------------------------------------------------------------------------- passt dies


@needs_passt
@pytest.mark.slow
def test_passt_killed_under_linux_then_a_new_nic_works(default_guest, caplog):
    dom = pvhvm.Domain(default_guest.vmlinux, initrd=default_guest.initrd,
                       cmdline="console=hvc0 quiet pvhvm.shell pvhvm.net", memory_mib=256, net="passt")
    try:
        dom.expect(MARKER, 120)
        sh = GuestShell(dom)
        assert "inet " in sh.ok("dmesg -n 1; ip -4 addr show eth0")  # /init's DHCP on eth0 worked
        vif = dom.vifs[0]
        assert vif.connected
        os.kill(vif.host.pid, signal.SIGKILL)
        with caplog.at_level("ERROR", logger="pvhvm.xenbus"):
            assert dom.run_until(lambda: vif.failure is not None, 10)
        # Reported: the log (stderr under the CLI), xenbus's error node, the backend state.
        assert re.search(r"passt \(pid \d+\) was killed by signal 9; the vif has no link", vif.failure)
        assert vif.failure in caplog.text
        assert dom.store.read(0, vif.error_path).decode() == vif.failure
        assert not vif.connected and vif.state in (XenbusState.CLOSING, XenbusState.CLOSED)
        assert dom.run_until(lambda: vif.state == XenbusState.CLOSED, 10)  # netfront closed its side
        assert "alive" in sh.ok("echo alive")
        assert dom.outcome is None
        # A new card on a new passt: the guest sees eth1 and gets a lease on it.
        new = dom.attach_nic("passt")
        assert new.devid == 1
        out = sh.ok("i=0; while ! ip link show eth1 >/dev/null 2>&1 && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1));"
                    " done; udhcpc -i eth1 -q -n -t 5 -T 2", 60)
        assert re.search(r"DHCP-BOUND ip=\S+", out), out
        assert new.connected and new.failure is None and vif.failure is not None
    finally:
        dom.close()


# --------------------------------------------------------------------------- the disk's file system fills up


@pytest.fixture
def small_filesystem():
    """A 2 MiB tmpfs (root), else RLIMIT_FSIZE at 2 MiB for this process
    while the guest writes (EFBIG instead of ENOSPC: the same path, an
    OSError from pwritev). Yields (directory, arm) where arm() is a
    context manager for the writing."""
    from contextlib import contextmanager, nullcontext

    d = Path(tempfile.mkdtemp(prefix="pvhvm-full-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "pvhvm-full", str(d)],
                             capture_output=True).returncode == 0

    @contextmanager
    def fsize_limit():
        old = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * MIB, old[1]))  # Python ignores SIGXFSZ: EFBIG
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)

    try:
        yield d, (nullcontext if mounted else fsize_limit), ("ENOSPC" if mounted else "EFBIG")
    finally:
        if mounted:
            subprocess.run(["umount", str(d)], check=False)
        for p in d.iterdir() if d.exists() else ():
            p.unlink()
        d.rmdir()


@pytest.mark.slow
def test_disk_image_file_system_fills_up(blk_guest, small_filesystem, caplog):
    where, arm, errno_name = small_filesystem
    image = where / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 * MIB)  # sparse: 16 MiB for the guest, 2 MiB of room
    dom = pvhvm.Domain(blk_guest.vmlinux, initrd=blk_guest.initrd, cmdline="console=hvc0 quiet pvhvm.shell",
                       memory_mib=256, disks=[str(image)])
    try:
        dom.expect(MARKER, 120)
        sh = GuestShell(dom)
        sh.ok("dmesg -n 1; modprobe xen-blkfront && i=0; while [ ! -b /dev/xvda ] && [ $i -lt 100 ]; do sleep 0.1;"
              " i=$((i+1)); done; [ -b /dev/xvda ]", 60)
        vbd = dom.disks[0]
        sh.ok("echo first-sector > /tmp/s; dd if=/tmp/s of=/dev/xvda bs=512 count=1 conv=sync oflag=direct")
        with arm(), caplog.at_level("ERROR", logger="pvhvm.devices.blkback"):
            out = sh.run("dd if=/dev/zero of=/dev/xvda bs=1M count=8 seek=4 oflag=direct 2>&1", 120)
            status = sh.status
        # The guest sees an I/O error (BLKIF_RSP_ERROR), nothing else happens.
        assert status != 0 and "Input/output error" in out, out
        assert vbd.stats["errors"] > 0 and "write of sector" in caplog.text
        assert vbd.connected and vbd.failure is None
        # Reads still work, and what was written before is there.
        assert sh.ok("dd if=/dev/xvda bs=512 count=1 iflag=direct 2>/dev/null | head -c 12") == "first-sector"
        assert image.read_bytes()[:12] == b"first-sector"
        # Room again (the host frees what the big write took): writes work again.
        with open(image, "r+b") as f:
            punch_hole(f.fileno(), 4 * MIB, 12 * MIB)
        sh.ok("dd if=/dev/zero of=/dev/xvda bs=4096 count=1 seek=1 oflag=direct 2>&1")
        assert dom.outcome is None
    finally:
        dom.close()
    print(f"\nfull file system as {errno_name}")


# --------------------------------------------------------------------------- xenstore clients vanish


@pytest.fixture
def xs_dom(idle_kernel):  # noqa: F811
    return pvhvm.Domain(idle_kernel, memory_mib=16, domid=DOMID, name="xs-faults")


def test_xenstore_clients_vanish_mid_transaction(xs_dom):
    dom, store = xs_dom, xs_dom.store
    with tempfile.TemporaryDirectory(prefix="pvhvm-xsf-") as d:
        priv = XenstoreSocketServer(store, Path(d) / "priv")
        guest = XenstoreSocketServer(store, Path(d) / "guest", domid=DOMID)  # counts against the domain's quotas
        priv.attach(dom)
        guest.attach(dom)
        paths_before = store.paths()
        quota = store.quota_transactions
        try:
            def clients():
                survivor = Raw(priv.path)
                typ, tx = survivor.call(XsType.TRANSACTION_START, b"\0")
                survivor_tx = int(tx.rstrip(b"\0"))
                assert survivor.call(XsType.WRITE, b"/kept\0yes", tx=survivor_tx) == (XsType.WRITE, b"OK\0")
                opened = []
                for i in range(20):
                    c = Raw(priv.path if i % 2 else guest.path)
                    for _ in range(quota if i % 2 == 0 else 3):  # a guest-domain client at its quota
                        typ, tx = c.call(XsType.TRANSACTION_START, b"\0")
                        assert typ == XsType.TRANSACTION_START, tx
                        tx = int(tx.rstrip(b"\0"))
                        opened.append(tx)
                        node = f"data/gone{i}-{tx}" if i % 2 == 0 else f"/gone{i}-{tx}"
                        assert c.call(XsType.WRITE, node.encode() + b"\0v", tx=tx) == (XsType.WRITE, b"OK\0")
                    if i % 2 == 0:
                        assert c.call(XsType.TRANSACTION_START, b"\0") == (XsType.ERROR, b"ENOSPC\0")
                    if i % 3 == 0:  # half a request, then gone
                        c.sock.sendall(b"\x0b\x00\x00\x00")
                    elif i % 3 == 1:  # reset, not a clean close
                        c.sock.setsockopt(socket_mod.SOL_SOCKET, socket_mod.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    c.close()
                time.sleep(0.2)
                # Another client, and the survivor's transaction, are fine.
                assert read_ok(priv.path) == b"xs-faults"
                end = survivor.call(XsType.TRANSACTION_END, b"T\0", tx=survivor_tx)
                survivor.close()
                fresh = Raw(guest.path)
                txs = [fresh.call(XsType.TRANSACTION_START, b"\0") for _ in range(quota)]
                fresh.close()
                return opened, end, txs

            opened, end, txs = drive(dom, clients)
            assert end == (XsType.TRANSACTION_END, b"OK\0")
            assert all(t[0] == XsType.TRANSACTION_START for t in txs)  # the domain's quota is whole again
            loop_until(dom, lambda: priv.connections == [] and guest.connections == [])
            assert not any(store.has_transaction(0, tx) or store.has_transaction(DOMID, tx) for tx in opened)
            assert not store._txs  # nothing open, nothing copied
            assert store.paths() == sorted(set(paths_before) | {"/kept"})
            assert store.read(0, "/kept") == b"yes"
            assert dom.outcome is None
        finally:
            priv.close()
            guest.close()


# --------------------------------------------------------------------------- signals


def _clean(d: Path) -> list[str]:
    """What pvhvm left in its working directory (the xenstore socket, save files)."""
    return sorted(p.name for p in d.iterdir())


def _signal_boot(args: list[str], d: Path, signum: int, when: str) -> tuple[int, str, list[int]]:
    """Start `pvhvm ARGS` (stdin a pipe held open) in `d`, send `signum`
    at `when`: "building" (its passt has just started: the domain is being
    built), "Ns" (N seconds after passt started), "saving" (SIGUSR1, then
    the signal at once). Returns (status, stderr, passt pids)."""
    p = subprocess.Popen([*PVHVM, *args], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         cwd=d)
    try:
        passt = wait_for(lambda: [c for c in children(p.pid) if is_passt(c)], 60, "no passt started")
        if when.endswith("s"):
            time.sleep(float(when[:-1]))
        elif when == "saving":
            time.sleep(3)
            p.send_signal(signal.SIGUSR1)
            time.sleep(0.01)
        p.send_signal(signum)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err.decode(errors="replace"), passt


BOOT_ARGS = ["boot", "--net", "passt", "--memory", "128", "--xenstore-socket", "xs", "--save-to", "saved"]


@needs_passt
@pytest.mark.slow
@pytest.mark.parametrize("signum, when", [
    (signal.SIGTERM, "building"), (signal.SIGTERM, "1s"), (signal.SIGTERM, "saving"),
    (signal.SIGINT, "building"), (signal.SIGINT, "2s"),
])
def test_signals_end_boot_cleanly(default_guest, tmp_path, signum, when):
    status, err, passt = _signal_boot(BOOT_ARGS, tmp_path, signum, when)
    assert status == (143 if signum == signal.SIGTERM else 130), err
    assert "Traceback" not in err, err
    assert ("terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted") in err
    assert all(gone(pid) for pid in passt)
    left = _clean(tmp_path)
    assert left in ([], ["saved"]), left  # no socket, no temporary file; a save is whole or absent
    if left:
        savefile.read(tmp_path / "saved").close()


@pytest.mark.slow
def test_sigterm_while_building_restores_the_terminal(default_guest):
    """In raw mode from the start: the signal lands before or while the
    terminal is taken over; either way it is given back as it was."""
    s = PtySession([*PVHVM, "boot", "--net", "none"])
    try:
        time.sleep(1.5)  # imports done; the guest being loaded or starting
        s.proc.send_signal(signal.SIGTERM)
        assert s.wait(30) == 143
        assert b"Traceback" not in s.output
        assert s.modes == s.modes_before, "terminal modes not restored"
    finally:
        s.close()


@pytest.fixture(scope="module")
def saved_linux(default_guest, tmp_path_factory):
    """The default guest at its prompt, with a vif on passt, saved."""
    path = tmp_path_factory.mktemp("saved") / "linux.save"
    dom = pvhvm.Domain(default_guest.vmlinux, initrd=default_guest.initrd, cmdline="console=hvc0 quiet pvhvm.shell",
                       memory_mib=128, net="passt")
    try:
        dom.expect(MARKER, 120)
        dom.save(path)
    finally:
        dom.close()
    return path


@needs_passt
@pytest.mark.slow
@pytest.mark.parametrize("signum, when", [(signal.SIGTERM, "building"), (signal.SIGTERM, "saving"),
                                          (signal.SIGINT, "1s")])
def test_signals_end_restore_cleanly(saved_linux, tmp_path, signum, when):
    args = ["restore", str(saved_linux), "--xenstore-socket", "xs", "--save-to", "saved"]
    status, err, passt = _signal_boot(args, tmp_path, signum, when)
    assert status == (143 if signum == signal.SIGTERM else 130), err
    assert "Traceback" not in err, err
    assert all(gone(pid) for pid in passt)
    left = _clean(tmp_path)
    assert left in ([], ["saved"]), left
    if left:
        savefile.read(tmp_path / "saved").close()


@needs_passt
@pytest.mark.slow
@pytest.mark.parametrize("when", ["building", "2s", "saving"])
def test_sigterm_ends_a_background_domain_cleanly(default_guest, tmp_path, rt, when):  # noqa: F811
    cfg = linux_cfg(tmp_path, default_guest, "sig", vif=["host=passt"])
    create = subprocess.Popen([*PVHVM, "create", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    saves = tmp_path / "saves"
    saves.mkdir()
    saver = None
    try:
        daemon = wait_for(lambda: children(create.pid)[:1], 30, "no domain process")[0]
        passt = wait_for(lambda: [c for c in children(daemon) if is_passt(c)], 60, "no passt started")
        if when == "2s":
            assert create.wait(30) == 0
            time.sleep(2)
        elif when == "saving":
            assert create.wait(30) == 0
            time.sleep(1)
            saver = subprocess.Popen([*PVHVM, "save", "sig", str(saves / "s.save")], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
            time.sleep(0.05)
        os.kill(daemon, signal.SIGTERM)
        _, err = create.communicate(timeout=30)
        if when == "building":
            assert create.returncode == 2 and "terminated by signal 15 while starting" in err.decode(), err
        if saver is not None:
            saver.communicate(timeout=30)
        assert gone(daemon, 30)
    finally:
        for proc in (create, saver):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(gone(pid) for pid in passt)
    assert pvhvm_run("list").stdout.splitlines()[1:] == []
    nothing_left(rt)
    assert [p.name for p in saves.iterdir()] in ([], ["s.save"])  # a save is whole or absent
    for p in saves.iterdir():
        savefile.read(p).close()
    log = (rt.parent / "log")
    if log.exists():
        assert not any("Traceback" in f.read_text(errors="replace") for f in log.rglob("*") if f.is_file())
