"""Save, restore, snapshot and fork of running domains (issue 13).

Test guests first (fast): the vmgenid guest reports its VM generation ID
and keeps running, so a save, a restore and forks can be watched from
inside. Then Debian's kernel (slow, in CI): a file, the network, xenstore
watches and time across a save, a guest-requested suspend, fork isolation.
Then every kind of bad file."""

from __future__ import annotations

import os
import re
import socket
import struct
import threading
import time
import zlib

import pytest

import pvhvm
from pvhvm import savefile
from pvhvm.savefile import SaveFileError
from pvhvm.shell import GuestShell
from test_netback import GUEST_INIT as NET_GUEST_INIT  # netfront loaded, then a shell on hvc0

ID = re.compile(rb"VMGENID ([0-9a-f]{32})")


def next_id(dom: pvhvm.Domain) -> bytes:
    return bytes.fromhex(dom.expect(ID, timeout=60).group(1).decode())


@pytest.fixture()
def genid_guest(guests):
    dom = pvhvm.Domain(guests["vmgenid"], memory_mib=64)
    first = next_id(dom)
    assert first == dom.generation_id
    yield dom, first
    dom.close()


def test_restore_goes_on_with_a_new_generation_id(genid_guest, tmp_path):
    dom, first = genid_guest
    path = tmp_path / "g.sav"
    saved_time = dom._vm.system_time_ns()  # the save's instant is a little later
    size = dom.save(path)
    assert size == path.stat().st_size
    # Sparse: a 64 MiB guest that touched little of its RAM.
    assert path.stat().st_blocks * 512 < 16 << 20
    dom.close()

    r = pvhvm.Domain.restore(path)
    assert r.domid == dom.domid and r.uuid == dom.uuid and r.name == dom.name
    # Guest time goes on from the saved instant: never backwards, and not
    # by the time the file sat on disk.
    assert saved_time <= r._vm.system_time_ns() < saved_time + 5_000_000_000
    new = next_id(r)
    assert new == r.generation_id and new != first
    # The guest goes on to its verdict: two more changes.
    r.renew_generation_id()
    next_id(r)
    r.renew_generation_id()
    out = r.run(timeout=60)
    assert out.reason is pvhvm.ShutdownReason.POWEROFF, (out, r.console_output)
    assert b"VERDICT: PASS" in r.console_output, r.console_output
    r.close()


def test_forks_get_their_own_ids_and_memory(genid_guest):
    dom, first = genid_guest
    a, b = dom.fork(2)
    try:
        assert {a.domid, b.domid, dom.domid} == {dom.domid, dom.domid + 1, dom.domid + 2}
        assert len({a.uuid, b.uuid, dom.uuid}) == 3
        ids = [next_id(a), next_id(b)]
        assert ids == [a.generation_id, b.generation_id]
        assert len({first, *ids}) == 3
        assert dom.generation_id == first  # the parent keeps its own
        # Each home in each store names its domain.
        assert a.store.read(0, f"/local/domain/{a.domid}/name") == a.name.encode()
        assert a.store.read(0, f"/local/domain/{a.domid}/domid") == str(a.domid).encode()
        # RAM is shared copy-on-write: a write in one is seen by nobody else.
        gpa = 0x300000  # low RAM the guest does not use
        before = bytes(dom.memory[gpa:gpa + 8])
        a.memory[gpa:gpa + 8] = b"child-a!"
        dom.memory[gpa + 8:gpa + 16] = b"parent!!"
        assert bytes(b.memory[gpa:gpa + 16]) == before + before
        assert bytes(dom.memory[gpa:gpa + 8]) == before
        assert bytes(a.memory[gpa + 8:gpa + 16]) == before
        # All three run on.
        for d in (a, b, dom):
            d.renew_generation_id()
            assert next_id(d) == d.generation_id
    finally:
        a.close()
        b.close()


def test_snapshot_spawns_again_and_again(genid_guest):
    dom, first = genid_guest
    with dom.snapshot() as snap:
        kids = [snap.spawn() for _ in range(3)]
    try:
        assert [k.name for k in kids] == [f"{dom.name}-{i}" for i in (1, 2, 3)]
        seen = {next_id(k) for k in kids}
        assert len(seen) == 3 and first not in seen
    finally:
        for k in kids:
            k.close()


@pytest.mark.parametrize("variant", ["", ".i386-nopaging", ".i386-pse", ".i386-pae"])
def test_a_suspend_is_saved_and_resumed_as_cancelled(guests, tmp_path, variant):
    """The suspend guest (64-bit, and 32-bit in each paging mode: the
    compat shared_info and 32-bit segments go through the save too) asks to
    suspend; its restore answers 1 and it finds its memory and clock."""
    dom = pvhvm.Domain(guests["suspend" + variant], memory_mib=64)
    assert dom.run(timeout=60).reason is pvhvm.ShutdownReason.SUSPEND
    path = tmp_path / "s.sav"
    dom.save(path)
    dom.close()
    r = pvhvm.Domain.restore(path)
    outcome = r.run(timeout=60)
    out = r.console_output.decode()
    assert outcome.reason is pvhvm.ShutdownReason.POWEROFF, (outcome, out)
    assert "SUSPEND-GUEST resumed rc=1" in out and "VERDICT: PASS" in out, out
    r.close()


@pytest.mark.parametrize("variant", [".i386-nopaging", ".i386-pae"])
def test_32bit_guest_restores_with_a_new_generation_id(guests, tmp_path, variant):
    dom = pvhvm.Domain(guests["vmgenid" + variant], memory_mib=64)
    first = next_id(dom)
    dom.save(tmp_path / "g.sav")
    dom.close()
    r = pvhvm.Domain.restore(tmp_path / "g.sav")
    assert next_id(r) == r.generation_id != first
    r.close()


# --------------------------------------------------------------- bad files

@pytest.fixture(scope="module")
def good_save(guests, tmp_path_factory):
    dom = pvhvm.Domain(guests["vmgenid"], memory_mib=64)
    next_id(dom)
    path = tmp_path_factory.mktemp("save") / "good.sav"
    dom.save(path)
    dom.close()
    return path


def _header(data: bytes) -> dict:
    names = ("magic", "format", "arch", "ram_off", "ram_len", "core_off", "core_len", "core_crc", "meta_off",
             "meta_len", "meta_crc")
    return dict(zip(names, savefile._HEADER.unpack_from(data)))


def _reheader(data: bytearray, **fields) -> None:
    """Rewrite header fields and make the header's own checksum right again."""
    h = _header(data)
    h.update(fields)
    head = savefile._HEADER.pack(*h.values())
    data[: len(head) + 4] = head + struct.pack("<I", zlib.crc32(head))


def _variants(good: bytes) -> dict[str, tuple[bytes, str]]:
    h = _header(good)
    out: dict[str, tuple[bytes, str]] = {}
    out["empty"] = (b"", "not a pvhvm save file")
    out["not a save"] = (b"\x7fELF" + bytes(100), "not a pvhvm save file")
    out["short header"] = (good[:20], "truncated")
    out["cut in RAM"] = (good[: h["ram_off"] + 4096], "truncated")
    out["cut in core"] = (good[: h["core_off"] + 10], "truncated")
    out["cut in record"] = (good[:-1], "truncated")
    b = bytearray(good)
    b[12] ^= 1  # the arch field, under the header's checksum
    out["header flipped"] = (bytes(b), "header's checksum")
    b = bytearray(good)
    b[h["core_off"] + 40] ^= 0x10
    out["core flipped"] = (bytes(b), "core state's checksum")
    b = bytearray(good)
    b[h["meta_off"] + 5] ^= 0x01
    out["record flipped"] = (bytes(b), "domain record's checksum")
    b = bytearray(good)
    first_page = _meta(good)["ram"]["runs"][0][0]
    b[h["ram_off"] + first_page * 4096 + 100] ^= 0x55
    out["RAM flipped"] = (bytes(b), "RAM image is damaged")
    b = bytearray(good)
    _reheader(b, format=99)
    out["future format"] = (bytes(b), "save format 99; this pvhvm reads format 1")
    b = bytearray(good)
    _reheader(b, arch=b"aarch64-pvh")
    out["foreign arch"] = (bytes(b), "saved on 'aarch64-pvh'")
    # A core record that checksums right but does not hold up: its format
    # word, then a vCPU count that is not the RAM's domain's.
    for name, at, value, why in (("core format", 8, 7, "core state format 7"),
                                 ("core vCPUs", 12, 200, "200 vCPUs")):
        b = bytearray(good)
        core = bytearray(good[h["core_off"]:h["core_off"] + h["core_len"]])
        core[at:at + 4] = struct.pack("<I", value)
        b[h["core_off"]:h["core_off"] + len(core)] = core
        _reheader(b, core_crc=zlib.crc32(core))
        out[name] = (bytes(b), why)
    # A domain record that checksums right but lies.
    for name, edit, why in (("record vcpus", lambda m: m["domain"].update(vcpus=0), "domain record"),
                            ("record port", lambda m: m["ports"].update(console="x"), "domain record"),
                            ("record runs", lambda m: m["ram"].update(runs=[[1 << 40, 1]]), "outside its RAM"),
                            ("record device", lambda m: m["devices"].append({"type": "vbd"}), "device record")):
        meta = _meta(good)
        edit(meta)
        blob = savefile.json.dumps(meta).encode()
        b = bytearray(good[: h["meta_off"]]) + blob
        _reheader(b, meta_len=len(blob), meta_crc=zlib.crc32(blob))
        out[name] = (bytes(b), why)
    return out


def _meta(good: bytes) -> dict:
    h = _header(good)
    return savefile.json.loads(good[h["meta_off"]:h["meta_off"] + h["meta_len"]])


BAD_KINDS = ["empty", "not a save", "short header", "cut in RAM", "cut in core", "cut in record",
             "header flipped", "core flipped", "record flipped", "RAM flipped", "future format",
             "foreign arch", "core format", "core vCPUs", "record vcpus", "record port", "record runs",
             "record device"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_files_are_refused_in_one_line(good_save, tmp_path, kind):
    data, why = _variants(good_save.read_bytes())[kind]
    bad = tmp_path / "bad.sav"
    bad.write_bytes(data)
    with pytest.raises(SaveFileError) as e:
        pvhvm.Domain.restore(bad)
    message = str(e.value)
    assert why in message and "\n" not in message and str(bad) in message, message


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(SaveFileError, match="No such file"):
        pvhvm.Domain.restore(tmp_path / "nothing.sav")


def test_the_good_file_restores(good_save):
    # The variants above are refused for what was done to them, not because
    # the file was bad to begin with.
    r = pvhvm.Domain.restore(good_save)
    assert next_id(r) == r.generation_id
    r.close()


# --------------------------------------------------------------- Debian's kernel

# What a guest that saw time jump or stall would log.
STALLS = re.compile(r"soft lockup|rcu.*(stall|detected)|hung_task|BUG|Oops|Call Trace|"
                    r"Long readout interval|Marking clocksource|clocksource.*unstable")


@pytest.fixture(scope="module")
def linux_guest():
    from pvhvm.devices import net_host
    from pvhvm.images import prepare_default_guest

    return prepare_default_guest(NET_GUEST_INIT, modules=["xen-netfront"],
                                 extra_files={net_host.UDHCPC_SCRIPT_PATH: net_host.UDHCPC_SCRIPT.encode()})


def boot_linux(guest, **kw) -> tuple[pvhvm.Domain, GuestShell]:
    dom = pvhvm.Domain(guest.vmlinux, initrd=guest.initrd, cmdline="console=hvc0 quiet", memory_mib=256, **kw)
    dom.expect("PVHVM-NET-READY", 120)
    dom.expect("# ", 60)
    return dom, GuestShell(dom)


def uptime(sh: GuestShell) -> float:
    return float(sh.ok("cat /proc/uptime").split()[0])


def host_receives(sh: GuestShell, router: str, payload: str) -> bytes:
    """What the guest sends to a server on the host's loopback (passt maps
    the router's address there)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(60)
    got = bytearray()

    def serve() -> None:
        c, _ = srv.accept()
        while chunk := c.recv(4096):
            got.extend(chunk)
        c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    sh.ok(f"echo {payload} | nc {router} {srv.getsockname()[1]}", 60)
    t.join(30)
    srv.close()
    return bytes(got)


@pytest.mark.slow
def test_linux_save_restore_keeps_files_network_watches_and_time(linux_guest, tmp_path):
    dom, sh = boot_linux(linux_guest, net="passt", vcpus=2)
    out = sh.ok("udhcpc -i eth0 -q -n -t 5 -T 2", 120)
    router = re.search(r"router=(\S+)", out).group(1)
    assert host_receives(sh, router, "before-save") == b"before-save\n"
    sh.ok("echo written-before-save > /tmp/f; sync")
    t_before = uptime(sh)
    path = tmp_path / "linux.sav"
    dom.save(path)
    log_before = dom.console_output.decode(errors="replace")
    dom.close()
    time.sleep(2.5)  # the file sits a while: the guest must not see that time

    r = pvhvm.Domain.restore(path)
    sh2 = GuestShell(r)
    assert sh2.ok("cat /tmp/f") == "written-before-save\n"
    t_after = uptime(sh2)
    assert t_before <= t_after < t_before + 2.5, (t_before, t_after)
    # The network: the vif's rings and channels went on; passt is new.
    assert host_receives(sh2, router, "after-restore") == b"after-restore\n"
    # Timers that fell due fired: sleep works on both vCPUs, the clock moves.
    sh2.ok("sleep 1; taskset -c 1 sleep 1")
    assert uptime(sh2) >= t_after + 2
    assert sh2.ok("taskset -c 1 cat /proc/self/stat").split()[38] == "1"  # it ran on vCPU 1
    dmesg = sh2.ok("dmesg")
    assert not STALLS.search(dmesg), STALLS.search(dmesg)
    # xenstore watches went with the save: Linux's control/shutdown watch
    # turns a poweroff request into a clean power-off.
    r.request_shutdown("poweroff")
    outcome = r.run(timeout=120)
    assert outcome.reason is pvhvm.ShutdownReason.POWEROFF, outcome
    log = log_before + r.console_output.decode(errors="replace")
    assert not STALLS.search(log), STALLS.search(log)
    r.close()


@pytest.mark.slow
def test_linux_suspend_request_is_saved_and_resumed(linux_guest, tmp_path):
    """The guest's own suspend (control/shutdown = suspend): Linux freezes,
    suspends xenstore and calls SCHEDOP_shutdown(SHUTDOWN_suspend); the
    domain ends with SUSPEND, is saved, and its restore answers the call
    with 1 (cancelled), so Linux goes on with its devices and channels."""
    dom, sh = boot_linux(linux_guest)
    sh.ok("echo kept > /tmp/f")
    dom.request_shutdown("suspend")
    outcome = dom.run(timeout=120)
    assert outcome.reason is pvhvm.ShutdownReason.SUSPEND, outcome
    path = tmp_path / "suspended.sav"
    dom.save(path)
    dom.close()

    r = pvhvm.Domain.restore(path)
    sh2 = GuestShell(r)
    assert sh2.ok("cat /tmp/f") == "kept\n"
    # Linux went through its suspend and came back in the same domain.
    log = sh2.ok("dmesg")
    assert "suspending xenstore" in log and "Restarting tasks" in log, log[-2000:]
    # xenstore works again (the guest suspended and resumed its connection).
    r.request_shutdown("poweroff")
    assert r.run(timeout=120).reason is pvhvm.ShutdownReason.POWEROFF
    r.close()


@pytest.mark.slow
def test_linux_forks_are_isolated(linux_guest):
    dom, sh = boot_linux(linux_guest)
    sh.ok("echo parent > /tmp/who")
    a, b = dom.fork(2)
    try:
        sa, sb = GuestShell(a), GuestShell(b)
        sa.ok("echo child-a > /tmp/who; echo only-a > /tmp/a")
        assert sb.ok("cat /tmp/who") == "parent\n"
        assert sb.run("cat /tmp/a 2>&1") .startswith("cat: can't open")
        assert sh.ok("cat /tmp/who") == "parent\n"
        assert sa.ok("cat /tmp/who") == "child-a\n"
        # Each child is its own domain to Xen tools.
        assert sb.ok("cat /sys/hypervisor/uuid").strip() == str(b.uuid)
    finally:
        a.close()
        b.close()
        dom.close()


@pytest.mark.slow
def test_linux_disk_across_a_save_with_io_in_flight(tmp_path):
    """blkback across a save: the guest is writing to its disk when the
    domain is saved (the save waits for the requests taken to be answered);
    after the restore the write finishes, what was written reads back, and
    the persistent grants and rings go on."""
    from test_blkback import boot_linux as boot_with_disks
    from pvhvm.images import prepare_default_guest

    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    guest = prepare_default_guest(modules=["xen-blkfront"])
    dom, sh = boot_with_disks(guest, [str(img)])
    sh.ok("dd if=/dev/urandom of=/tmp/data bs=1M count=16 2>/dev/null; md5sum /tmp/data > /tmp/sum")
    sh.start("dd if=/tmp/data of=/dev/xvda bs=64k oflag=direct 2>&1; sync")
    dom.run_until(lambda: dom.disks[0].stats["writes"] > 20, 60)  # mid-copy
    path = tmp_path / "io.sav"
    dom.save(path)
    dom.close()  # lets the image go, as the saved domain would be gone

    r = pvhvm.Domain.restore(path)
    sh2 = GuestShell(r)
    status, out = sh2.finish(120)
    assert status == 0 and "256+0 records out" in out, out
    want = sh2.ok("cat /tmp/sum").split()[0]
    assert sh2.ok("dd if=/dev/xvda bs=1M count=16 2>/dev/null | md5sum").split()[0] == want
    assert r.disks[0].connected and r.disks[0].failure is None
    r.close()
    with open(img, "rb") as f:
        import hashlib

        assert hashlib.md5(f.read(16 << 20)).hexdigest() == want

    # And a suspend of the same guest with its disk: the domain waits to be
    # saved with its disk connected, and after the restore it is served.
    dom, sh = boot_with_disks(guest, [str(img)])
    dom.request_shutdown("suspend")
    assert dom.run(timeout=120).reason is pvhvm.ShutdownReason.SUSPEND
    dom.save(tmp_path / "suspended.sav")
    dom.close()
    r = pvhvm.Domain.restore(tmp_path / "suspended.sav")
    sh2 = GuestShell(r)
    assert sh2.ok("dd if=/dev/xvda bs=1M count=16 iflag=direct 2>/dev/null | md5sum").split()[0] == want
    r.close()


def test_restore_refuses_a_domid_xen_would_not_give(good_save):
    for bad in (0, 0x7FF0, 70000, True):
        with pytest.raises(ValueError, match="domid must be"):
            pvhvm.Domain.restore(good_save, domid=bad)
