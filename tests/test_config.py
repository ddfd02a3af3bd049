"""xl-style domain config files: the syntax xl's parser takes, every key,
the errors (with their line numbers), warnings, relative paths, and
DomainConfig.to_text read back."""

from __future__ import annotations

import string
import uuid as uuidlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pvhvm
from pvhvm import _core
from pvhvm.config import (
    DEFAULT_CMDLINE,
    ConfigError,
    DomainConfig,
    VifSpec,
    load_config,
    parse_config,
)
from pvhvm.devices.disk import DiskSpec
from pvhvm.devices.net_host import Forward
from pvhvm.errors import PvhvmError


@pytest.fixture
def files(tmp_path):
    """A directory holding a kernel, a ramdisk and a System.map (contents do
    not matter to the parser: it only checks that they are files)."""
    for name in ("vmlinux", "initrd.cpio", "System.map"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def parse(files, body: str, head: str = 'name = "vm"\ntype = "pvh"\nkernel = "vmlinux"\n'):
    return parse_config(head + body, source="vm.cfg", base_dir=files)


def error(files, body: str, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        parse(files, body, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


# --------------------------------------------------------------------------- syntax


def test_minimal_config_gets_the_defaults(files):
    cfg, warnings = parse(files, "")
    assert warnings == []
    assert cfg == DomainConfig(name="vm", kernel=files / "vmlinux")
    assert (cfg.memory, cfg.maxmem, cfg.vcpus, cfg.online_vcpus) == (256, None, 1, 1)
    assert cfg.cmdline == DEFAULT_CMDLINE
    assert (cfg.on_poweroff, cfg.on_reboot, cfg.on_watchdog, cfg.on_crash, cfg.on_soft_reset) == (
        "destroy", "restart", "destroy", "destroy", "destroy")
    assert cfg.vifs == () and cfg.disks == () and cfg.uuid is None


def test_strings_numbers_comments_and_semicolons(files):
    text = (
        "# a comment line\n"
        "\n"
        "name='single'  # a comment after a value\n"
        'kernel = "vmlinux" ; memory = 512;vcpus=2\n'
        ";\n"
        "maxmem = 0x400\n"
        'extra = "a\\"b\\\'c\\\\d\\te"\n'
        "type = \"pvh\"   \t\n"
        "on_crash = preserve\n"
    )
    msg = error(files, text, head="")
    assert msg == "vm.cfg:9: expected a value (a \"string\", a number or a [list]), found 'preserve'"
    cfg, _ = parse(files, text.rsplit("on_crash", 1)[0], head="")
    assert cfg.name == "single"
    assert (cfg.memory, cfg.maxmem, cfg.online_vcpus) == (512, 1024, 2)
    assert cfg.cmdline == "a\"b'c\\d\te"


def test_the_last_statement_needs_no_newline_and_crlf_is_taken(files):
    cfg, _ = parse(files, "memory = 128", head='name = "vm"\r\ntype = "pvh"\r\nkernel = "vmlinux"\r\n')
    assert cfg.memory == 128


def test_a_number_may_be_quoted_and_a_string_bare_as_in_xl(files):
    cfg, _ = parse(files, 'memory = "300"\nvcpus = " 2"\nextra = 42\n')
    assert (cfg.memory, cfg.online_vcpus, cfg.cmdline) == (300, 2, "42")


def test_escapes(files):
    cfg, _ = parse(files, r'cmdline = "\a\b\f\n\r\t\v\"\'\\"' "\n")
    assert cfg.cmdline == "\a\b\f\n\r\t\v\"'\\"
    assert error(files, r'cmdline = "\x41"') == (
        "vm.cfg:4: numeric escape \\x… in a string: xl drops those; write the character itself")
    assert error(files, r'cmdline = "\101"').startswith("vm.cfg:4: numeric escape \\1")
    assert error(files, r'cmdline = "\q"') == "vm.cfg:4: invalid escape \\q in a string"


def test_lists_span_lines_with_trailing_commas_and_comments(files):
    for image in ("a.img", "b.img", "c.img"):
        (files / image).touch()
    text = (
        "disk = [\n"
        "    'a.img',   # first\n"
        "\n"
        "    'b.img'\n"
        "    ,\n"
        "    'c.img',\n"
        "]\n"
        "vif = [ ]\n"
    )
    cfg, warnings = parse(files, text)
    assert [d.path for d in cfg.disks] == [files / "a.img", files / "b.img", files / "c.img"]
    assert [d.vdev for d in cfg.disks] == ["xvda", "xvdb", "xvdc"]
    assert cfg.vifs == () and warnings == []
    cfg, _ = parse(files, "disk = ['a.img']")
    assert len(cfg.disks) == 1


def test_plus_equals_appends_strings_and_lists(files):
    text = (
        'extra = "console=hvc0"\n'
        'extra += " quiet"\n'
        'vif = [ "mac=00:16:3e:00:00:01" ]\n'
        'vif += [ "mac=00:16:3e:00:00:02", ]\n'
        'root += "/dev/xvda"\n'  # += on a key not set yet just sets it
    )
    cfg, _ = parse(files, text)
    assert cfg.cmdline == "root=/dev/xvda console=hvc0 quiet"
    assert [v.mac for v in cfg.vifs] == ["00:16:3e:00:00:01", "00:16:3e:00:00:02"]
    assert error(files, 'extra = "a"\nextra += [ "b" ]\n') == (
        'vm.cfg:5: extra +=: cannot add a [list] to a "string" or a "string" to a [list]')
    assert error(files, "memory = 5\nmemory += 12\n") == "vm.cfg:5: memory: += does not work on numbers"


def test_a_later_setting_replaces_an_earlier_one(files):
    cfg, _ = parse(files, "memory = 128\nmemory = 512\n")
    assert cfg.memory == 512


@pytest.mark.parametrize("body, message", [
    ("memory 512", "vm.cfg:4: expected = or += after memory, found '512'"),
    ("memory =\n512", "vm.cfg:4: expected a value (a \"string\", a number or a [list]), found the end of the line"),
    ("= 5", "vm.cfg:4: expected a key, found '='"),
    ('"memory" = 5', "vm.cfg:4: expected a key, found the string 'memory'"),
    ("memory = 512 256", "vm.cfg:4: expected the end of the statement after memory's value, found '256'"),
    ("Memory = 512", "vm.cfg:4: syntax error near 'Memory' (keys are lower case)"),
    ("memory = 512 * 2", "vm.cfg:4: syntax error near '*'"),
    ('kernel = "/boot/" + "vmlinux"', "vm.cfg:4: syntax error near '+' (an xl config is not Python: "
                                       "values are \"strings\", numbers or [lists])"),
    ('disk = ("a.img")', "vm.cfg:4: syntax error near '(\"a.img\")' (an xl config is not Python: "
                         "values are \"strings\", numbers or [lists])"),
    ('name = "unterminated\n', "vm.cfg:4: unterminated string '\"unterminated'"),
    ("disk = [ 'a',\n 'b'\n", "vm.cfg:4: the list opened here has no ]"),
    ("disk = [ , ]", "vm.cfg:4: expected a value (a \"string\", a number or a [list]), found ','"),
    ("disk = [ 'a',, 'b' ]", "vm.cfg:4: expected a value (a \"string\", a number or a [list]), found ','"),
    ("disk = [ 'a'\n\n 'b' ]", "vm.cfg:6: expected , or ] in the list, found the string 'b'"),
    ('name = "a\0b"', "vm.cfg:4: a NUL character in a string"),
])
def test_syntax_errors_name_their_line(files, body, message):
    assert error(files, body) == message


def test_config_error_is_a_pvhvm_error():
    assert issubclass(ConfigError, PvhvmError)


# --------------------------------------------------------------------------- keys


def test_name_is_required_and_checked(files):
    assert error(files, "", head='type = "pvh"\nkernel = "vmlinux"\n') == 'vm.cfg: no name = "..." (xl needs one too)'
    assert error(files, 'name = ""') == "vm.cfg:4: name is empty"
    assert error(files, 'name = "a\\tb"') == "vm.cfg:4: name 'a\\tb' has control characters"
    assert error(files, "name = 12") == "vm.cfg:4: name '12' is a number: xl's commands would take it for a domain id"
    assert error(files, 'name = [ "a" ]') == "vm.cfg:4: name must be a single value, not a list"


def test_type_must_be_pvh(files):
    head = 'name = "vm"\nkernel = "vmlinux"\n'
    only = 'pvhvm runs PVH guests only (type = "pvh")'
    for body, line in (('type = "pv"', 3), ('type = "hvm"', 3), ('builder = "hvm"', 3), ('builder = "generic"', 3),
                       ("pvh = 0", 3), ('type = "pvh"\nbuilder = "hvm"', 4)):
        msg = error(files, body, head=head)
        assert msg.startswith(f"vm.cfg:{line}: ") and msg.endswith(only), msg
    cfg, warnings = parse(files, "pvh = 1", head=head)
    assert warnings == []
    cfg, warnings = parse(files, "", head=head)
    assert warnings == ['vm.cfg: no type = "pvh": xl would build a PV guest, pvhvm builds a PVH one']


def test_uuid(files):
    u = "5f8e7a3c-1d2b-4c5d-9e8f-0a1b2c3d4e5f"
    cfg, _ = parse(files, f'uuid = "{u.upper()}"')
    assert cfg.uuid == uuidlib.UUID(u)
    for bad in ("5f8e7a3c1d2b4c5d9e8f0a1b2c3d4e5f", "{" + u + "}", u[:-1], u + "0", u.replace("f", "g")):
        assert error(files, f'uuid = "{bad}"').startswith(f"vm.cfg:4: uuid {bad!r} is not of the form")


def test_kernel_and_ramdisk_paths(files, tmp_path, monkeypatch):
    cfg, _ = parse(files, 'ramdisk = "initrd.cpio"\nsystem_map = "./System.map"\n')
    assert cfg.kernel == files / "vmlinux" and cfg.ramdisk == files / "initrd.cpio"
    assert cfg.system_map == files / "System.map"
    # Relative to the config file's directory, not the current one.
    sub = files / "guests"
    sub.mkdir()
    (sub / "vm.cfg").write_text('name = "vm"\ntype = "pvh"\nkernel = "../vmlinux"\n'
                                'xenstore_socket = "run/xs.sock"\n')
    monkeypatch.chdir("/")
    cfg, _ = load_config(sub / "vm.cfg")
    assert cfg.kernel == files / "vmlinux"
    assert cfg.xenstore_socket == sub / "run" / "xs.sock"
    # An absolute path stays as it is; ~ is the home directory.
    cfg, _ = parse(files, "", head=f'name = "vm"\ntype = "pvh"\nkernel = "{files / "vmlinux"}"\n')
    assert cfg.kernel == files / "vmlinux"
    monkeypatch.setenv("HOME", str(files))
    cfg, _ = parse(files, 'ramdisk = "~/initrd.cpio"')
    assert cfg.ramdisk == files / "initrd.cpio"


def test_missing_files_are_refused(files):
    assert error(files, "", head='name = "vm"\n') == (
        'vm.cfg: no kernel = "PATH": pvhvm boots a PVH kernel directly (no firmware, no bootloader)')
    assert error(files, 'kernel = "nope"') == f"vm.cfg:4: kernel: no such kernel {files / 'nope'}"
    assert error(files, 'ramdisk = "."') == f"vm.cfg:4: ramdisk: {files} is not a file"
    assert error(files, 'system_map = "nope"') == f"vm.cfg:4: system_map: no such System.map {files / 'nope'}"
    assert error(files, 'ramdisk = ""') == "vm.cfg:4: ramdisk is empty"


def test_cmdline_root_and_extra_as_xl_puts_them_together(files):
    assert parse(files, 'root = "/dev/xvda ro"')[0].cmdline == "root=/dev/xvda ro"
    assert parse(files, 'extra = "console=hvc0"')[0].cmdline == "console=hvc0"
    assert parse(files, 'extra = "console=hvc0"\nroot = "/dev/xvda"')[0].cmdline == "root=/dev/xvda console=hvc0"
    cfg, warnings = parse(files, 'cmdline = "quiet"\nroot = "/dev/xvda"\nextra = "x"')
    assert cfg.cmdline == "quiet"
    assert warnings == ["vm.cfg:5: root= and extra= are ignored in favour of cmdline= (as xl does)"]
    assert parse(files, 'cmdline = ""')[0].cmdline == ""


def test_memory_and_maxmem(files):
    cfg, _ = parse(files, "memory = 512\nmaxmem = 1024")
    assert (cfg.memory, cfg.maxmem) == (512, 1024)
    max_mib = _core.MAX_RAM >> 20
    assert error(files, "memory = 8") == f"vm.cfg:4: memory must be from 16 to {max_mib} MiB, not 8"
    assert error(files, 'memory = "-1"') == f"vm.cfg:4: memory must be from 16 to {max_mib} MiB, not -1"
    assert error(files, "memory = -1").startswith("vm.cfg:4: syntax error near '-1'")
    assert error(files, f"maxmem = {max_mib + 1}").startswith("vm.cfg:4: maxmem must be from 16")
    assert error(files, "memory = 512\nmaxmem = 256") == "vm.cfg:5: maxmem (256 MiB) is below memory (512 MiB)"
    assert error(files, "maxmem = 100") == "vm.cfg:4: maxmem (100 MiB) is below memory (256 MiB)"
    assert error(files, 'memory = "lots"') == "vm.cfg:4: memory must be a number, not 'lots'"
    assert error(files, "memory = 512m").startswith("vm.cfg:4: expected the end of the statement")
    assert error(files, "memory = 1e3") == "vm.cfg:4: memory must be a number, not '1e3'"
    assert error(files, "memory = 0512") == (
        "vm.cfg:4: memory = 0512: xl reads a number with a leading 0 as octal; write it without the 0")
    assert error(files, "memory = [ 512 ]") == "vm.cfg:4: memory must be a single value, not a list"


def test_vcpus_and_maxvcpus(files):
    cfg, _ = parse(files, "vcpus = 2")
    assert (cfg.vcpus, cfg.online_vcpus) == (2, 2)
    cfg, _ = parse(files, "vcpus = 2\nmaxvcpus = 4")
    assert (cfg.vcpus, cfg.online_vcpus) == (4, 2)
    cfg, _ = parse(files, "maxvcpus = 3")
    assert (cfg.vcpus, cfg.online_vcpus) == (3, 1)
    assert error(files, "vcpus = 4\nmaxvcpus = 2") == "vm.cfg:5: maxvcpus (2) is below vcpus (4)"
    assert error(files, "vcpus = 0") == f"vm.cfg:4: vcpus must be from 1 to {_core.MAX_VCPUS}, not 0"
    assert error(files, f"maxvcpus = {_core.MAX_VCPUS + 1}").startswith("vm.cfg:4: maxvcpus must be from 1")


def test_actions(files):
    cfg, _ = parse(files, "".join(f'{k} = "{v}"\n' for k, v in (
        ("on_poweroff", "preserve"), ("on_reboot", "destroy"), ("on_watchdog", "coredump-destroy"),
        ("on_crash", "coredump-restart"), ("on_soft_reset", "restart"))))
    assert (cfg.on_poweroff, cfg.on_reboot, cfg.on_watchdog, cfg.on_crash, cfg.on_soft_reset) == (
        "preserve", "destroy", "coredump-destroy", "coredump-restart", "restart")
    actions = "destroy, restart, preserve, coredump-destroy, coredump-restart"
    assert error(files, 'on_reboot = "rename-restart"') == (
        f"vm.cfg:4: on_reboot = 'rename-restart' is an xl action pvhvm does not have ({actions})")
    assert error(files, 'on_soft_reset = "soft-reset"') == (
        f"vm.cfg:4: on_soft_reset = 'soft-reset' is an xl action pvhvm does not have ({actions})")
    assert error(files, 'on_crash = "Destroy"') == f"vm.cfg:4: on_crash: unknown action 'Destroy' ({actions})"


def test_vif_specs(files):
    text = (
        "vif = [\n"
        "  'mac=00:16:3E:0a:b:0c, forward=8080:80, forward=udp:5353:53, forward=2222',\n"
        "  'host=tap:tap-vm0,type=vif',\n"
        "  'host=none',\n"
        "  '',\n"
        "]\n"
    )
    cfg, warnings = parse(files, text)
    assert warnings == []
    assert cfg.vifs == (
        VifSpec("passt", "00:16:3e:0a:0b:0c",
                (Forward(8080, 80), Forward(5353, 53, "udp"), Forward(2222, 2222))),
        VifSpec("tap:tap-vm0"),
        VifSpec("none"),
        VifSpec(),
    )


def test_vif_keys_xl_has_are_warned_about_with_their_line(files):
    text = "vif = [\n  'mac=00:16:3e:00:00:01',\n  'bridge=xenbr0,script=vif-bridge,model=e1000,type=ioemu,ip=10.0.0.2',\n]\n"
    cfg, warnings = parse(files, text)
    assert cfg.vifs[1] == VifSpec()
    assert warnings == [
        "vm.cfg:6: vif bridge= ignored: pvhvm's host side is passt or a TAP device (host=)",
        "vm.cfg:6: vif script= ignored: pvhvm's host side is passt or a TAP device (host=)",
        "vm.cfg:6: vif model= ignored: pvhvm's host side is passt or a TAP device (host=)",
        "vm.cfg:6: vif type=ioemu ignored: pvhvm has no emulated card, the guest gets a PV vif",
        "vm.cfg:6: vif ip= ignored: pvhvm's host side is passt or a TAP device (host=)",
    ]


@pytest.mark.parametrize("spec, message", [
    ("host=slirp", "host='slirp': want passt, tap:NAME or none (NAME: 1 to 15 bytes)"),
    ("host=tap:", "host='tap:': want passt, tap:NAME or none (NAME: 1 to 15 bytes)"),
    ("host=tap:a-name-too-long-for-linux", "want passt, tap:NAME or none"),
    ("mac=01:00:5e:00:00:01", "01:00:5e:00:00:01 is a multicast address"),
    ("mac=00:16:3e:00:00", "bad MAC address '00:16:3e:00:00'"),
    ("forward=80:99999", "port out of range in forward '80:99999'"),
    ("forward=http", "bad port forward 'http'"),
    ("host=tap:tap0,forward=80", "forward= needs host=passt"),
    ("type=vif2", "type must be vif or ioemu, not 'vif2'"),
    ("forwrad=80", "unknown key 'forwrad' (pvhvm's: host=, mac=, forward=)"),
    ("passt", "'passt' is not KEY=VALUE"),
])
def test_bad_vif_specs(files, spec, message):
    msg = error(files, f"vif = [\n  'host=passt',\n  '{spec}'\n]")
    assert msg.startswith(f"vm.cfg:6: vif {spec!r}: ") and message in msg, msg


def test_vifs_may_not_share_a_mac_or_a_host_port(files):
    assert error(files, "vif = [ 'mac=00:16:3e:00:00:01', 'mac=00:16:3e:0:0:1' ]") == (
        "vm.cfg:4: vif: two cards with one MAC address")
    assert error(files, "vif = [ 'forward=80', 'forward=80:81' ]") == "vm.cfg:4: vif: one host port forwarded twice"
    cfg, _ = parse(files, "vif = [ 'forward=80', 'forward=udp:80' ]")
    assert len(cfg.vifs) == 2


def test_vif_and_disk_must_be_lists_of_strings(files):
    assert error(files, "vif = 'mac=00:16:3e:00:00:01'") == (
        "vm.cfg:4: vif must be a [list], e.g. vif = [ \"mac=00:16:3e:00:00:01\" ]")
    assert error(files, "disk = [\n [ 'a.img' ] ]") == "vm.cfg:5: disk: a list inside the list"


def test_disk_specs(files):
    (files / "images").mkdir()
    for image in ("root.img", "data.img", "iso.img", "old.img"):
        (files / "images" / image).touch()
    text = (
        "disk = [\n"
        "  'format=raw, vdev=xvdb, access=rw, target=images/root.img',\n"
        "  'images/data.img,ro',\n"
        "  'vdev=xvdd, devtype=cdrom, target=images/iso.img',\n"
        "  'file:images/old.img,raw,xvde,w',\n"
        "]\n"
    )
    cfg, _ = parse(files, text)
    img = files / "images"
    assert cfg.disks == (
        DiskSpec(img / "root.img", False, "xvdb"),
        DiskSpec(img / "data.img", True, "xvda"),
        DiskSpec(img / "iso.img", True, "xvdd", cdrom=True),
        DiskSpec(img / "old.img", False, "xvde"),
    )


@pytest.mark.parametrize("spec, message", [
    ("", "empty disk spec"),
    ("format=qcow2, target=a.img", "format qcow2 is not supported (raw images only)"),
    ("a.img, vdev=hda", "bad virtual device 'hda'"),
    ("a.img, access=rx", "access must be ro or rw"),
    ("a.img, colour=blue", "unknown key 'colour'"),
])
def test_bad_disk_specs(files, spec, message):
    msg = error(files, f"disk = [\n  'b.img',\n  '{spec}',\n]")
    assert msg.startswith("vm.cfg:6: ") and message in msg, msg


def test_two_disks_on_one_vdev(files):
    assert error(files, "disk = [ 'a.img,vdev=xvda', 'b.img,vdev=xvda' ]") == "vm.cfg:4: disk: two disks on xvda"


def test_gdb(files):
    assert parse(files, 'gdb = "127.0.0.1:1234"')[0].gdb == "127.0.0.1:1234"
    assert parse(files, 'gdb = "[::1]:1234"')[0].gdb == "[::1]:1234"
    # As --gdb reads it: no host is 127.0.0.1, port 0 picks a free one.
    for good in ("1234", ":1234", "localhost:0"):
        assert parse(files, f'gdb = "{good}"')[0].gdb == good
    for bad in ("localhost:65536", "localhost:gdb", "x:"):
        assert error(files, f'gdb = "{bad}"') == f"vm.cfg:4: gdb = {bad!r}: want \"[HOST:]PORT\" (e.g. \"127.0.0.1:1234\")"


def test_unknown_keys_are_warned_about_with_their_line(files):
    cfg, warnings = parse(files, 'memory = 128\nfoo = "bar"\ncpus = [ "0-3" ]\nvfb = [ "vnc=1" ]\n')
    assert cfg.memory == 128
    assert warnings == ["vm.cfg:5: unknown key 'foo' ignored", "vm.cfg:6: unknown key 'cpus' ignored",
                        "vm.cfg:7: unknown key 'vfb' ignored"]


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.cfg: cannot read the config file: No such file"):
        load_config(tmp_path / "nope.cfg")
    bad = tmp_path / "bad.cfg"
    bad.write_bytes(b'name = "vm"\nextra = "\xff"\n')
    with pytest.raises(ConfigError, match=r"bad.cfg:2: not UTF-8 text$"):
        load_config(bad)


# --------------------------------------------------------------------------- output


def test_domain_kwargs(files):
    (files / "a.img").touch()
    cfg, _ = parse(files, 'ramdisk = "initrd.cpio"\nmemory = 128\nmaxmem = 256\nvcpus = 2\n'
                          'uuid = "5f8e7a3c-1d2b-4c5d-9e8f-0a1b2c3d4e5f"\ndisk = [ "a.img" ]\n'
                          'vif = [ "forward=8080:80" ]\nsystem_map = "System.map"\nxenstore_socket = "xs"\n')
    assert cfg.domain_kwargs() == {
        "kernel": files / "vmlinux", "initrd": files / "initrd.cpio", "cmdline": DEFAULT_CMDLINE,
        "memory_mib": 128, "maxmem_mib": 256, "name": "vm", "vcpus": 2,
        "disks": [DiskSpec(files / "a.img", False, "xvda")],
        "uuid": uuidlib.UUID("5f8e7a3c-1d2b-4c5d-9e8f-0a1b2c3d4e5f"),
        "system_map": files / "System.map", "xenstore_socket": files / "xs",
        "nics": [VifSpec("passt", None, (Forward(8080, 80),))],
    }


def test_a_config_file_builds_and_runs_a_domain(guests, tmp_path):
    """domain_kwargs are what pvhvm.Domain takes (nics aside: Domain takes
    one vif today, as net=/mac=)."""
    (tmp_path / "hello").symlink_to(guests["hello"])
    (tmp_path / "hello.cfg").write_text(
        'name = "from-config"\ntype = "pvh"\nkernel = "hello"\nmemory = 64\n'
        'uuid = "5f8e7a3c-1d2b-4c5d-9e8f-0a1b2c3d4e5f"\n')
    cfg, warnings = load_config(tmp_path / "hello.cfg")
    assert warnings == []
    kwargs = cfg.domain_kwargs()
    assert kwargs.pop("nics") == []
    dom = pvhvm.Domain(**kwargs)
    try:
        outcome = dom.run(timeout=60)
        assert outcome.kind is pvhvm.OutcomeKind.SHUTDOWN
        assert dom.name == "from-config" and str(dom.uuid) == "5f8e7a3c-1d2b-4c5d-9e8f-0a1b2c3d4e5f"
        assert dom.memory_bytes == 64 << 20
        assert dom.console_output
    finally:
        dom.close()


def test_to_text_reads_back(files):
    (files / "a b,c.img").touch()
    cfg, _ = parse(files, 'ramdisk = "initrd.cpio"\ncmdline = "say \\"hi\\"\\n\\\\ \'x\'"\nmemory = 128\n'
                          'maxmem = 512\nvcpus = 2\nmaxvcpus = 3\nuuid = "5f8e7a3c-1d2b-4c5d-9e8f-0a1b2c3d4e5f"\n'
                          'disk = [ "target=a b,c.img", ]\nvif = [ "mac=00:16:3e:00:00:01,forward=udp:53", '
                          '"host=tap:t0" ]\non_crash = "preserve"\ngdb = "localhost:1234"\n'
                          'system_map = "System.map"\nxenstore_socket = "xs.sock"\n')
    text = cfg.to_text()
    again, warnings = parse_config(text, source="saved.cfg", base_dir="/")
    assert again == cfg and warnings == []
    assert parse_config(DomainConfig(name="vm", kernel=files / "vmlinux").to_text())[0] == DomainConfig(
        name="vm", kernel=files / "vmlinux")


_PRINTABLE = st.text(st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("\t\n\r\"'\\#[],;="),
                     max_size=30)


@st.composite
def domain_configs(draw, files: Path):
    names = _PRINTABLE.filter(lambda s: s and not s.isdigit() and not any(ord(c) < 0x20 or c == "\x7f" for c in s))
    memory = draw(st.integers(16, 4096))
    online = draw(st.integers(1, _core.MAX_VCPUS))
    forwards = st.lists(st.builds(Forward, st.integers(1, 65535), st.integers(1, 65535), st.sampled_from(["tcp", "udp"])),
                        max_size=3, unique_by=lambda f: (f.proto, f.host_port))
    vifs = draw(st.lists(st.one_of(
        st.builds(VifSpec, st.just("passt"), st.none(), forwards.map(tuple)),
        st.builds(VifSpec, st.sampled_from(["none", "tap:vif0", "tap:t"]),
                  st.integers(0, 0xFFFFFF).map(lambda n: f"00:16:3e:{n >> 16:02x}:{n >> 8 & 255:02x}:{n & 255:02x}")),
    ), max_size=1))
    paths = st.text(string.ascii_letters + string.digits + " ,._-=", min_size=1, max_size=12).filter(
        lambda s: s.strip() == s and s not in (".", ".."))
    disks = draw(st.lists(st.builds(DiskSpec, paths.map(lambda p: files / p), st.booleans(), st.none(), st.just(False)),
                          max_size=3))
    disks = [d.with_vdev(f"xvd{'abc'[i]}") for i, d in enumerate(disks)]
    actions = st.sampled_from(["destroy", "restart", "preserve", "coredump-destroy", "coredump-restart"])
    return DomainConfig(
        name=draw(names), kernel=files / "vmlinux", ramdisk=draw(st.sampled_from([None, files / "initrd.cpio"])),
        cmdline=draw(_PRINTABLE), memory=memory, maxmem=draw(st.none() | st.integers(memory, memory + 4096)),
        vcpus=draw(st.integers(online, _core.MAX_VCPUS)), online_vcpus=online,
        uuid=draw(st.none() | st.uuids()), vifs=tuple(vifs), disks=tuple(disks),
        on_poweroff=draw(actions), on_reboot=draw(actions), on_watchdog=draw(actions), on_crash=draw(actions),
        on_soft_reset=draw(actions), gdb=draw(st.none() | st.just("127.0.0.1:1234")),
        system_map=draw(st.sampled_from([None, files / "System.map"])),
        xenstore_socket=draw(st.none() | paths.map(lambda p: files / p)),
    )


_ROUND_TRIP_DIR = Path("/tmp") / "pvhvm-test-config-round-trip"


@settings(max_examples=100, deadline=None)
@given(cfg=domain_configs(_ROUND_TRIP_DIR))
def test_any_config_reads_back_from_its_text(cfg):
    _ROUND_TRIP_DIR.mkdir(exist_ok=True)
    for name in ("vmlinux", "initrd.cpio", "System.map"):
        (_ROUND_TRIP_DIR / name).touch()
    again, _ = parse_config(cfg.to_text(), source="saved.cfg")
    assert again == cfg
