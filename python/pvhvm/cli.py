"""The `pvhvm` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__, _core
from .api import MAX_VCPUS, Domain, HypercallRecord, OutcomeKind
from .builder import load_elf
from .errors import PvhvmError
from .terminal import Detached, Terminal, parse_escape

EXIT_BAD_INPUT = 2

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="A Xen hypervisor in user space for PVH guests, on the Unicorn CPU emulator.",
)


def _fail(message: str) -> typer.Exit:
    print(f"pvhvm: {message}", file=sys.stderr)
    return typer.Exit(EXIT_BAD_INPUT)


def _version(value: bool) -> None:
    if value:
        major, minor = _core.XEN_VERSION
        print(f"pvhvm {__version__} (presents Xen {major}.{minor})")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    pass


DEFAULT_CMDLINE = "console=hvc0 earlyprintk=xen"
# On the default guest's kernel command line, this makes its /init start a
# shell on the console after the marker (images.DEFAULT_INIT). Without it, as
# for Domain(...) from Python, /init prints the marker and powers off.
SHELL_FLAG = "pvhvm.shell"


def _vcpus(spec: str) -> int:
    try:
        n = int(spec, 10)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_VCPUS:
        raise _fail(f"--vcpus must be a number from 1 to {MAX_VCPUS}, not {spec!r}")
    return n


def _guest_arch(name: str) -> str:
    from .images import GUEST_ARCHES

    if name not in GUEST_ARCHES:
        raise _fail(f"--arch must be {' or '.join(GUEST_ARCHES)}, not {name!r}")
    return name


ARCH_HELP = "The default guest's architecture: amd64 (linux-image-cloud-amd64) or i386 (linux-image-686-pae)."


def _escape_key(spec: str) -> bytes | None:
    try:
        return parse_escape(spec)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


@app.command()
def boot(
    kernel: Annotated[
        Optional[Path],
        typer.Argument(help="PVH kernel image (ELF, e.g. vmlinux). Default: Debian's cloud kernel, "
                       "fetched and cached by `pvhvm fetch-guest`.", show_default=False),
    ] = None,
    initrd: Annotated[Optional[Path], typer.Option(help="Initial ramdisk, passed as the first module.")] = None,
    cmdline: Annotated[str, typer.Option(help="Kernel command line.")] = DEFAULT_CMDLINE,
    memory: Annotated[int, typer.Option(help="Guest memory in MiB.")] = 256,
    vcpus: Annotated[
        str, typer.Option("--vcpus", metavar="N", help=f"Virtual CPUs, 1 to {MAX_VCPUS} (xl's vcpus).")
    ] = "1",
    trace: Annotated[bool, typer.Option("--trace", help="Print every hypercall to stderr.")] = False,
    timeout: Annotated[Optional[float], typer.Option(help="Give up after this many seconds.")] = None,
    system_map: Annotated[
        Optional[Path], typer.Option("--system-map", help="System.map to name addresses in crash reports.")
    ] = None,
    xenstore_socket: Annotated[
        Optional[Path],
        typer.Option("--xenstore-socket", metavar="PATH",
                     help="Serve the domain's xenstore to host tools on this Unix socket, as xenstored "
                     "does for dom0 (XENSTORED_PATH=PATH xenstore-ls /local/domain/1)."),
    ] = None,
    net: Annotated[
        str, typer.Option("--net", metavar="passt|tap:NAME|none|auto",
                          help="The network card (vif 0): passt user-mode networking (no root; DHCP, the host "
                          "reachable at the gateway), a TAP interface (root), or none. auto: passt if it is "
                          "installed.")
    ] = "auto",
    forward: Annotated[
        Optional[list[str]], typer.Option("--forward", "-p", metavar="HOSTPORT[:GUESTPORT]",
                                          help="With passt: 127.0.0.1:HOSTPORT on the host reaches GUESTPORT in "
                                          "the guest (tcp:/udp: prefix; repeatable).")
    ] = None,
    disk: Annotated[
        Optional[list[str]], typer.Option("--disk", "-d", metavar="PATH[,ro][,vdev=xvdb]",
                                          help="A raw disk image, served by blkback as xvda, xvdb, … in order "
                                          "(repeatable). xl's spec works too: 'format=raw, vdev=xvda, "
                                          "access=rw, target=PATH'.")
    ] = None,
    root: Annotated[
        Optional[str], typer.Option("--root", metavar="DEV",
                                    help="Boot from this disk: adds root=DEV rw to the command line (e.g. "
                                    "/dev/xvda; the default guest's initramfs loads xen-blkfront, mounts it and "
                                    "starts its /sbin/init).")
    ] = None,
    escape_char: Annotated[
        str, typer.Option("--escape-char", metavar="KEY",
                          help="The key that detaches from the console and ends pvhvm, when stdin is a "
                          "terminal: ^X caret notation, one ASCII character, or `none`.")
    ] = "^]",
    arch: Annotated[
        Optional[str], typer.Option("--arch", metavar="amd64|i386",
                                    help=ARCH_HELP + " Only without KERNEL.", show_default=False)
    ] = None,
) -> None:
    """Boot KERNEL as a PVH domU, with its console (hvc0) on stdin and stdout,
    as `xl console` would attach it.

    With no KERNEL, boots the default guest: Debian's linux-image-cloud-amd64
    with a busybox initramfs whose /init prints a marker, runs a shell on the
    console (job control included; `pvhvm.shell` is added to the command
    line for that) and powers off when the shell exits (`exit`, Ctrl-D,
    `poweroff -f`). `--arch i386` boots the 32-bit default guest instead:
    Debian's linux-image-686-pae with an i386 busybox.

    stdin a terminal (and stdout or stderr one too): it is put in raw mode
      and every key goes to the guest (Ctrl-C, Ctrl-Z, Ctrl-D included).
      Ctrl-] (--escape-char) detaches: the domain is destroyed and pvhvm
      exits 130. The terminal is restored however pvhvm ends (SIGTERM exits
      143, SIGHUP 129).
    stdin a pipe, a file, /dev/null or closed: its bytes are typed into the
      guest; at end of input the guest's shell gets Ctrl-D at its next
      prompt, so it exits and the default guest powers off: `pvhvm boot
      </dev/null` ends after the marker with status 0, and `printf
      'uname -r\\n' | pvhvm boot` runs one command. A terminal on stdin
      counts as empty input when pvhvm runs in the background or when both
      stdout and stderr are redirected away from terminals.

    Exit status: 0 the guest powered off; 1 it crashed (SHUTDOWN_crash,
    triple fault, emulator error); 2 bad input; 3 reboot; 4 suspend;
    5 watchdog; 6 soft reset; 7 hung (halted or blocked with nothing to wake
    it); 8 --timeout expired; 130 interrupted (Ctrl-C from outside, or
    detached with the escape key); 129 SIGHUP; 143 SIGTERM.
    """
    escape = _escape_key(escape_char)
    nr_vcpus = _vcpus(vcpus)
    if arch is not None:
        arch = _guest_arch(arch)
        if kernel is not None:
            raise _fail("--arch picks the default guest; a KERNEL's ELF header already says what it is")
    term = Terminal(escape=escape)

    def show(rec: HypercallRecord) -> None:
        print(f"trace: {rec}", file=sys.stderr, end=term.eol)

    if net == "auto":
        from .devices.net_host import find_passt

        net = "passt" if find_passt() else "none"
    if root is not None:
        cmdline = f"{cmdline} root={root} rw"
    try:
        if kernel is None:
            from .images import prepare_default_guest

            guest = prepare_default_guest(arch=arch or "amd64")
            kernel = guest.vmlinux
            initrd = initrd or guest.initrd
            flags = [SHELL_FLAG] + (["pvhvm.net"] if net != "none" else [])
            cmdline = " ".join([cmdline, *(f for f in flags if f not in cmdline.split())]).strip()
        dom = Domain(kernel, initrd=initrd, cmdline=cmdline, memory_mib=memory, console=term.write,
                     trace=show if trace else None, system_map=system_map, xenstore_socket=xenstore_socket,
                     net=net, net_forwards=forward or (), vcpus=nr_vcpus, disks=disk or ())
    except (PvhvmError, _core.CoreError) as e:
        raise _fail(str(e)) from None
    if xenstore_socket is not None:
        print(f"pvhvm: xenstore on {xenstore_socket} (export XENSTORED_PATH={xenstore_socket})",
              file=sys.stderr, end=term.eol)
    try:
        with term.attach(dom):
            outcome = dom.run(timeout=timeout)
    except KeyboardInterrupt:
        print("\npvhvm: interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
    except Detached as d:
        # The domain goes with this process: pvhvm is its hypervisor.
        print(f"\npvhvm: {d.reason}", file=sys.stderr)
        raise typer.Exit(d.status) from None
    finally:
        dom.close()
    if outcome.crashed or outcome.kind in (OutcomeKind.HUNG, OutcomeKind.TIMEOUT):
        print(dom.crash_report(), file=sys.stderr)
    print(f"pvhvm: domain {outcome}", file=sys.stderr)
    raise typer.Exit(outcome.exit_status)


@app.command()
def inspect(
    kernel: Annotated[Path, typer.Argument(help="Kernel image (ELF).", show_default=False)],
) -> None:
    """Show a kernel's entry points, loadable segments and Xen ELF notes."""
    try:
        img = load_elf(kernel)
    except PvhvmError as e:
        raise _fail(str(e)) from None
    print(f"{img.path}: ELF{img.elf_class} {'x86-64' if img.machine == 62 else 'i386'}")
    print(f"  ELF entry:        {img.entry:#x}")
    pvh = img.phys32_entry
    print(f"  PVH entry:        {pvh:#x}" if pvh is not None else "  PVH entry:        none (not bootable by pvhvm)")
    pv = img.note("ENTRY")
    if pv is not None:
        print(f"  PV entry:         {pv.describe()}")
    print("  segments (paddr, memsz, filesz):")
    for s in img.segments:
        print(f"    {s.paddr:#012x}  {s.memsz:#10x}  {s.filesz:#10x}")
    print("  Xen notes:" if img.notes else "  Xen notes:        none")
    for n in img.notes:
        print(f"    {n.name:<20} {n.describe()}")


@app.command()
def shutdown(
    socket_path: Annotated[Path, typer.Argument(metavar="SOCKET", help="The domain's --xenstore-socket.")],
    reboot: Annotated[bool, typer.Option("--reboot", help="Ask for a reboot instead of a power-off.")] = False,
    domid: Annotated[int, typer.Option(help="The domain's id.")] = 1,
) -> None:
    """Ask a running domain to shut down cleanly, as `xl shutdown` does: write
    its control/shutdown node through the xenstore socket it was booted with
    (`pvhvm boot --xenstore-socket SOCKET`). The guest powers off (or
    reboots) itself; `pvhvm boot` then exits 0 (or 3)."""
    from .xenstore.client import xs_write

    try:
        xs_write(socket_path, f"/local/domain/{domid}/control/shutdown", "reboot" if reboot else "poweroff")
    except PvhvmError as e:
        raise _fail(str(e)) from None


@app.command("fetch-guest")
def fetch_guest(
    force: Annotated[bool, typer.Option("--force", help="Download and rebuild even if cached.")] = False,
    rootfs: Annotated[
        bool,
        typer.Option("--rootfs", help="Also build (or find cached) a Debian 12 root disk image with systemd "
                     "for this kernel; boot it with root=LABEL=pvhvm-root."),
    ] = False,
    arch: Annotated[str, typer.Option("--arch", metavar="amd64|i386", help=ARCH_HELP)] = "amd64",
) -> None:
    """Fetch and prepare the default guest (Debian's cloud kernel and a busybox
    initramfs) into the cache; print where the files are. `--arch i386`
    prepares the 32-bit one (`pvhvm boot --arch i386` boots it)."""
    arch = _guest_arch(arch)
    if rootfs and arch != "amd64":
        raise _fail("--rootfs is for the amd64 guest only (its root disk carries that kernel's modules)")
    from .images import prepare_default_guest

    try:
        g = prepare_default_guest(force=force, arch=arch)
    except PvhvmError as e:
        raise _fail(str(e)) from None
    print(f"kernel:  {g.kernel_version} ({g.kernel_package}, {g.arch})")
    print(f"vmlinux: {g.vmlinux}")
    print(f"initrd:  {g.initrd}")
    print(f"System.map: {g.system_map or 'not in the package (Debian ships it in the -dbg package)'}")
    if rootfs:
        from .rootfs import prepare_debian_rootfs

        try:
            image = prepare_debian_rootfs(force=force)
        except PvhvmError as e:
            raise _fail(str(e)) from None
        print(f"rootfs:  {image.path} ({image.size_mib} MiB ext4, label {image.label}, "
              f"modules of {image.kernel_release})")


@app.command()
def rootfs(
    dest: Annotated[
        Optional[Path],
        typer.Argument(help="Write a sparse copy of the image here (the guest writes to its disk; the cached "
                       "original stays as built).", show_default=False),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild the image even if cached.")] = False,
) -> None:
    """Build (once, about a minute: mmdebstrap and mke2fs -d, nothing is
    mounted) or find in the cache a Debian 12 root disk with systemd for the
    default guest's kernel, and print its path. Boot it with
    `pvhvm boot --disk DEST --root LABEL=pvhvm-root`."""
    if dest is not None and dest.exists():
        raise _fail(f"{dest}: already exists; not overwriting it")
    from .rootfs import prepare_debian_rootfs

    try:
        image = prepare_debian_rootfs(force=force)
    except PvhvmError as e:
        raise _fail(str(e)) from None
    if dest is None:
        print(image.path)
        return
    import subprocess

    copy = subprocess.run(["cp", "--sparse=always", str(image.path), str(dest)], capture_output=True, text=True)
    if copy.returncode != 0:
        raise _fail(f"{dest}: cannot copy the image: {copy.stderr.strip().splitlines()[-1:] or '?'}")
    print(dest)


@app.command("self-test")
def self_test() -> None:
    """Check that this Unicorn build supports pvhvm's workarounds."""
    try:
        offsets = _core.self_test()
    except _core.CoreError as e:
        print(f"pvhvm: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    print("ok: " + ", ".join(f"{k}={v}" for k, v in offsets.items()))


def main() -> None:
    app(prog_name="pvhvm")
