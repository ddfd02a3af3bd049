"""The `pvhvm` command line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Callable, NoReturn, Optional

import typer

from . import __version__, _core, savefile
from .api import EXIT_STATUS, MAX_VCPUS, Domain, HypercallRecord, Outcome, OutcomeKind, ShutdownReason
from .builder import load_elf
from .errors import PvhvmError
from .terminal import CURSOR_QUERY, Detached, Terminal, end_on_signals, parse_escape, signals_held

EXIT_BAD_INPUT = 2

APP_SETTINGS = dict(
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="A Xen hypervisor in user space for PVH guests, on the Unicorn CPU emulator.",
)
app = typer.Typer(**APP_SETTINGS)


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


# -- what `boot` and `restore` share: the console session, saves, exit status


def _save_path(option: str, path: Path | None) -> Path | None:
    """A file to save to, checked before the guest runs: a typo must not
    lose a guest that suspends an hour later."""
    if path is None:
        return None
    if path.is_dir():
        raise _fail(f"{option} {path}: is a directory")
    if not path.parent.is_dir():
        raise _fail(f"{option} {path}: no such directory {path.parent}")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise _fail(f"{option} {path}: cannot write in {path.parent}")
    return path


def _why(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


def _mib_on_disk(path: Path) -> str:
    # The RAM image is sparse: what the file takes, not its length.
    return f"{os.stat(path).st_blocks * 512 / (1 << 20):.1f}"


def _trace_printer(term: Terminal):
    """`--trace`: each hypercall on stderr, on lines of their own."""

    def show(rec: HypercallRecord) -> None:
        print(f"trace: {rec}", file=sys.stderr, end=term.eol)

    return show


def _say(term: Terminal, message: str) -> None:
    """One line of pvhvm's own while the console is attached: on a line of
    its own on a terminal, where the guest's output may have left the cursor
    mid-line."""
    lead = term.eol if sys.stderr.isatty() else ""
    print(f"{lead}pvhvm: {message}", file=sys.stderr, end=term.eol, flush=True)


class _SaveSignal:
    """SIGUSR1: save the running domain. The handler only notes it; the
    run loop saves between runs of the core, never inside the handler."""

    def __init__(self) -> None:
        self.pending = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.pending = True

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None


# What the default guest's /init prints before anything else (images.INIT_START).
INIT_MARKER = b"PVHVM-INIT-OK"


class _FirstPromptSnapshot:
    """`boot --snapshot` without a cached snapshot: the console output is
    watched for the default guest's shell first waiting at its prompt after
    /init's marker (busybox's line editor then asks for the cursor
    position), and the domain is saved to `path` at that moment. The
    terminal's input is held until then, so the saved guest has read none
    of it."""

    def __init__(self, path: Path, term: Terminal) -> None:
        self.path = path
        self.term = term
        self.done = False
        self._at_prompt = False
        self._after_marker = False
        self._tail = b""
        term.hold_input()

    def write(self, data: bytes) -> None:
        """The domain's console sink: on to the terminal, and watched."""
        self.term.write(data)
        if self._at_prompt:
            return
        seen = self._tail + data
        if not self._after_marker:
            at = seen.find(INIT_MARKER)
            if at < 0:
                self._tail = seen[-(len(INIT_MARKER) - 1):]
                return
            self._after_marker = True
            seen = seen[at + len(INIT_MARKER):]
        self._at_prompt = CURSOR_QUERY in seen
        self._tail = seen[-(len(CURSOR_QUERY) - 1):]

    @property
    def due(self) -> bool:
        return self._at_prompt and not self.done

    def take(self, dom: Domain) -> None:
        self.done = True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            dom.save(self.path)  # written beside it and renamed: never half a snapshot
            _prune_snapshots(self.path)
            _say(self.term, f"snapshot saved to {self.path} ({_mib_on_disk(self.path)} MiB on disk); "
                            "`pvhvm boot --snapshot` starts from it next time")
        except (OSError, PvhvmError) as e:
            _say(self.term, f"no snapshot saved: {_why(e)}")
        # A fresh prompt under that line, then what was typed meanwhile.
        self.term.nudge()
        self.term.release_input()


def _run_until_end(dom: Domain, term: Terminal, timeout: float | None, deadline: float | None,
                   save_to: Path | None, usr1: _SaveSignal, snapshot: _FirstPromptSnapshot | None) -> Outcome:
    """Run `dom` until it ends or `deadline` (`timeout` s after the session began) passes."""

    def host_work() -> bool:
        return usr1.pending or (snapshot is not None and snapshot.due)

    while dom.run_until(host_work, None if deadline is None else max(0.0, deadline - time.monotonic())):
        if usr1.pending:
            usr1.pending = False
            if save_to is None:
                _say(term, "SIGUSR1: nothing was saved (start pvhvm with --save-to FILE to save on SIGUSR1)")
            else:
                try:
                    dom.save(save_to)
                    _say(term, f"saved to {save_to} ({_mib_on_disk(save_to)} MiB on disk); the guest goes on, "
                               f"`pvhvm restore {save_to}` continues it from there")
                except (OSError, PvhvmError) as e:
                    _say(term, f"SIGUSR1: cannot save to {save_to}: {_why(e)}")
        if snapshot is not None and snapshot.due:
            snapshot.take(dom)
    if dom.outcome is None:  # with a condition, run_until leaves the timeout to its caller
        dom.outcome = Outcome(OutcomeKind.TIMEOUT, message=f"no shutdown within {timeout} s")
    return dom.outcome


def _suspended(dom: Domain, save_on_suspend: Path | None) -> int:
    """The guest asked to be suspended: save it where --save-on-suspend says."""
    nothing_saved = EXIT_STATUS[ShutdownReason.SUSPEND]
    if save_on_suspend is None:
        print("pvhvm: guest suspended; nothing was saved (use --save-on-suspend FILE)", file=sys.stderr)
        return nothing_saved
    try:
        dom.save(save_on_suspend)
    except (OSError, PvhvmError) as e:
        print(f"pvhvm: guest suspended; nothing was saved: cannot save to {save_on_suspend}: {_why(e)}",
              file=sys.stderr)
        return nothing_saved
    print(f"pvhvm: guest suspended; saved to {save_on_suspend} ({_mib_on_disk(save_on_suspend)} MiB on disk); "
          f"`pvhvm restore {save_on_suspend}` continues it", file=sys.stderr)
    return 0


def _ended_while_building(e: BaseException, dom: Domain | None, usr1: _SaveSignal) -> typer.Exit:
    """SIGINT, SIGTERM or SIGHUP before the session began: what was built goes."""
    with signals_held():
        usr1.close()
        if dom is not None:
            dom.close()
    if isinstance(e, Detached):
        print(f"pvhvm: {e.reason}", file=sys.stderr)
        return typer.Exit(e.status)
    print("pvhvm: interrupted", file=sys.stderr)
    return typer.Exit(130)


def _run_console(dom: Domain, term: Terminal, usr1: _SaveSignal, *, timeout: float | None,
                 xenstore_socket: Path | None, save_to: Path | None, save_on_suspend: Path | None,
                 snapshot: _FirstPromptSnapshot | None = None, nudge: bool = False,
                 rebuild: Callable[[], Domain] | None = None) -> NoReturn:
    """Run `dom` with its console on `term` until it ends, then exit with
    its status: the session of `pvhvm boot` and `pvhvm restore`. A guest
    that reboots is built again by `rebuild` (on_reboot="restart"), with the
    console still attached; without it pvhvm exits 3."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        if xenstore_socket is not None:
            print(f"pvhvm: xenstore on {xenstore_socket} (export XENSTORED_PATH={xenstore_socket})",
                  file=sys.stderr, end=term.eol)
        try:
            with term.attach(dom):
                if nudge:
                    term.nudge()
                while True:
                    outcome = _run_until_end(dom, term, timeout, deadline, save_to, usr1, snapshot)
                    if rebuild is None or outcome.reason is not ShutdownReason.REBOOT:
                        break
                    _say(term, f"domain {dom.name} rebooted; building it again (on_reboot=restart)")
                    dom.close()
                    try:
                        dom = rebuild()
                    except (PvhvmError, _core.CoreError) as e:
                        _say(term, f"cannot restart: {e}")
                        raise typer.Exit(EXIT_BAD_INPUT) from None
                    term.switch_domain(dom)
            if outcome.kind is OutcomeKind.SHUTDOWN and outcome.reason is ShutdownReason.SUSPEND:
                raise typer.Exit(_suspended(dom, save_on_suspend))
        except KeyboardInterrupt:
            print("\npvhvm: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except Detached as d:
            # The domain goes with this process: pvhvm is its hypervisor.
            print(f"\npvhvm: {d.reason}", file=sys.stderr)
            raise typer.Exit(d.status) from None
    finally:
        with signals_held():
            usr1.close()
            dom.close()
    if outcome.crashed or outcome.kind is OutcomeKind.HUNG:
        print(dom.crash_report(), file=sys.stderr)
    print(f"pvhvm: domain {outcome}", file=sys.stderr)
    if dom.last_profile is not None and dom.profile_path is not None:
        print(f"pvhvm: profile of {dom.last_profile.samples} samples in {dom.profile_path} "
              f"(pvhvm profile {dom.profile_path})", file=sys.stderr)
    raise typer.Exit(outcome.exit_status)


# Snapshots kept besides the newest (another kernel, command line, core build …).
SNAPSHOTS_KEPT = 3


def _prune_snapshots(newest: Path) -> None:
    """Drop all but the most recent snapshots: each one is the size of the
    guest's used memory, and a new core build or option set makes another."""
    others = sorted((p for p in newest.parent.glob("default-guest-*.save") if p != newest),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[SNAPSHOTS_KEPT:]:
        old.unlink(missing_ok=True)


def _snapshot_path(guest, initrd: Path, cmdline: str, memory: int, maxmem: int | None, vcpus: int,
                   net: str) -> Path:
    """Where `boot --snapshot` keeps the default guest at its shell prompt
    for these settings: in the cache, named by a hash of everything the
    saved state depends on."""
    from .images import cache_dir

    try:
        if initrd == guest.initrd:
            # The cache's own initrd: its name is the hash of what it was built from.
            initrd_id = f"{initrd.name} {initrd.stat().st_size}"
        else:
            digest = hashlib.sha256()
            with open(initrd, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            initrd_id = digest.hexdigest()
        core = os.stat(_core.__file__)
    except OSError as e:
        raise _fail(f"{e.filename}: {_why(e)}") from None
    inputs = {
        # The cache's vmlinux is extracted from this package, as it says.
        "kernel": [guest.kernel_package, guest.arch, guest.kernel_version, guest.payload_compression],
        "initrd": initrd_id,
        "cmdline": cmdline,
        "memory": memory,
        "maxmem": memory if maxmem is None else maxmem,
        "vcpus": vcpus,
        "net": net,
        # Another build of pvhvm may save its core's state differently.
        "pvhvm": [__version__, savefile.FORMAT, core.st_size, core.st_mtime_ns],
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "snapshots" / f"default-guest-{key}.save"


SAVE_TO_HELP = ("On SIGUSR1 (kill -USR1 PID), save the running domain to FILE and go on (`pvhvm restore FILE` "
                "continues from there; each signal overwrites FILE).")
SAVE_ON_SUSPEND_HELP = ("When the guest suspends itself (SHUTDOWN_suspend: on its own, or asked by `suspend` "
                        "written to its control/shutdown, as `xl save` asks), save it to FILE and exit 0; "
                        "`pvhvm restore FILE` continues it. Without it a suspend saves nothing and exits 4.")
ESCAPE_HELP = ("The key that detaches from the console and ends pvhvm, when stdin is a terminal: ^X caret "
               "notation, one ASCII character, or `none`.")
XENSTORE_SOCKET_HELP = ("Serve the domain's xenstore to host tools on this Unix socket, as xenstored does for dom0 "
                        "(XENSTORED_PATH=PATH xenstore-ls /local/domain/1).")
FORWARD_HELP = ("With passt: 127.0.0.1:HOSTPORT on the host reaches GUESTPORT in the guest (tcp:/udp: prefix; "
                "repeatable).")
EXIT_STATUS_HELP = """\
    Exit status: 0 the guest powered off (or suspended and was saved by
    --save-on-suspend); 1 it crashed (SHUTDOWN_crash, triple fault, emulator
    error); 2 bad input; 3 reboot (not rebuilt: --on-reboot destroy);
    4 suspend (nothing saved); 5 watchdog; 6 soft reset; 7 hung (halted or blocked with nothing to wake it);
    8 --timeout expired; 130 interrupted (Ctrl-C from outside, or detached
    with the escape key); 129 SIGHUP; 143 SIGTERM."""


@app.command()
def boot(
    kernel: Annotated[
        Optional[Path],
        typer.Argument(help="PVH kernel image (ELF, e.g. vmlinux, or a bzImage, e.g. vmlinuz). Default: Debian's "
                       "cloud kernel, fetched and cached by `pvhvm fetch-guest`.", show_default=False),
    ] = None,
    initrd: Annotated[Optional[Path], typer.Option(help="Initial ramdisk, passed as the first module.")] = None,
    cmdline: Annotated[str, typer.Option(help="Kernel command line.")] = DEFAULT_CMDLINE,
    memory: Annotated[int, typer.Option(help="Guest memory in MiB (xl's memory: the balloon's target).")] = 256,
    maxmem: Annotated[
        Optional[int],
        typer.Option(help="Most memory the guest may balloon up to, in MiB (xl's maxmem). Default: --memory."),
    ] = None,
    vcpus: Annotated[
        str, typer.Option("--vcpus", metavar="N", help=f"Virtual CPUs, 1 to {MAX_VCPUS} (xl's vcpus).")
    ] = "1",
    trace: Annotated[bool, typer.Option("--trace", help="Print every hypercall to stderr.")] = False,
    timeout: Annotated[Optional[float], typer.Option(help="Give up after this many seconds.")] = None,
    system_map: Annotated[
        Optional[Path], typer.Option("--system-map", help="System.map to name addresses in crash reports.")
    ] = None,
    xenstore_socket: Annotated[
        Optional[Path], typer.Option("--xenstore-socket", metavar="PATH", help=XENSTORE_SOCKET_HELP)
    ] = None,
    net: Annotated[
        str, typer.Option("--net", metavar="passt|tap:NAME|none|auto",
                          help="The network card (vif 0): passt user-mode networking (no root; DHCP, the host "
                          "reachable at the gateway), a TAP interface (root), or none. auto: passt if it is "
                          "installed.")
    ] = "auto",
    forward: Annotated[
        Optional[list[str]], typer.Option("--forward", "-p", metavar="HOSTPORT[:GUESTPORT]", help=FORWARD_HELP)
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
    escape_char: Annotated[str, typer.Option("--escape-char", metavar="KEY", help=ESCAPE_HELP)] = "^]",
    arch: Annotated[
        Optional[str], typer.Option("--arch", metavar="amd64|i386",
                                    help=ARCH_HELP + " Only without KERNEL.", show_default=False)
    ] = None,
    save_to: Annotated[Optional[Path], typer.Option("--save-to", metavar="FILE", help=SAVE_TO_HELP)] = None,
    save_on_suspend: Annotated[
        Optional[Path], typer.Option("--save-on-suspend", metavar="FILE", help=SAVE_ON_SUSPEND_HELP)
    ] = None,
    gdb: Annotated[
        Optional[str], typer.Option("--gdb", metavar="[HOST:]PORT",
                                    help="Serve the GDB remote protocol for the guest on HOST:PORT (127.0.0.1 "
                                    "without HOST; port 0 picks one): `gdb vmlinux -ex 'target remote :PORT'`. "
                                    "Breakpoints, steps, registers, memory through the guest's page tables, "
                                    "vCPUs as threads.", show_default=False)
    ] = None,
    gdb_wait: Annotated[
        bool, typer.Option("--gdb-wait", help="With --gdb: the guest waits at its first instruction until gdb "
                           "continues it (QEMU's -S).")
    ] = False,
    on_reboot: Annotated[
        str, typer.Option("--on-reboot", metavar="restart|destroy",
                          help="When the guest reboots: build it again with the console still attached "
                          "(restart, as xl's default), or end with status 3 (destroy).")
    ] = "restart",
    snapshot: Annotated[
        bool, typer.Option("--snapshot",
                           help="Start the default guest (no KERNEL) from a snapshot at its shell prompt, in "
                           "about a second: the first boot with these settings (kernel, initrd, command line, "
                           "memory, maxmem, vCPUs, --net, pvhvm's build) saves it in the cache ($PVHVM_CACHE) "
                           "when the prompt first appears; later ones restore it. Not with --disk.")
    ] = False,
    profile: Annotated[
        Optional[Path], typer.Option("--profile", metavar="FILE",
                                     help="Sample where the guest's time goes and write it to FILE when the "
                                     "domain ends: folded stacks by boot phase (flamegraph.pl and speedscope "
                                     "read them) and FILE.json, the phase timeline. `pvhvm profile FILE` shows "
                                     "them.")
    ] = None,
    profile_hz: Annotated[
        int, typer.Option("--profile-hz", metavar="HZ", help="With --profile: samples a second, 1 to 20000.")
    ] = 1000,
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

    Saving: SIGUSR1 saves the running domain to --save-to FILE (the guest
    goes on); a guest that suspends itself is saved to --save-on-suspend
    FILE. `pvhvm restore FILE` continues either.

    {exit_status}
    """
    escape = _escape_key(escape_char)
    nr_vcpus = _vcpus(vcpus)
    if on_reboot not in ("restart", "destroy"):
        raise _fail(f"--on-reboot must be restart or destroy, not {on_reboot!r}")
    if gdb_wait and gdb is None:
        raise _fail("--gdb-wait goes with --gdb")
    if arch is not None:
        arch = _guest_arch(arch)
        if kernel is not None:
            raise _fail("--arch picks the default guest; a KERNEL's ELF header already says what it is")
    if snapshot and kernel is not None:
        raise _fail("--snapshot is for the default guest (no KERNEL): it is saved at its shell prompt")
    if snapshot and disk:
        raise _fail("--snapshot cannot go with --disk: the disk's contents would not match the saved guest's")
    save_to = _save_path("--save-to", save_to)
    save_on_suspend = _save_path("--save-on-suspend", save_on_suspend)
    profile = _save_path("--profile", profile)
    if not 1 <= profile_hz <= 20_000:
        raise _fail(f"--profile-hz must be from 1 to 20000, not {profile_hz}")
    if snapshot and profile is not None:
        raise _fail("--profile cannot go with --snapshot: a restored guest does not boot")
    term = Terminal(escape=escape)
    end_on_signals()

    show = _trace_printer(term)
    from .devices import net_host

    requested_net = net
    if net == "auto":
        net = "passt" if net_host.find_passt() else "none"
    net_warning = net_host.network_warning(requested_net, net)  # said once the domain is built
    net_host.set_warning_sink(lambda message: _say(term, message))  # e.g. a TAP nothing answers DHCP on
    if root is not None:
        cmdline = f"{cmdline} root={root} rw"
    usr1 = _SaveSignal()
    dom: Domain | None = None
    first_prompt: _FirstPromptSnapshot | None = None
    try:
        if kernel is None:
            from .images import prepare_default_guest

            guest = prepare_default_guest(arch=arch or "amd64")
            kernel = guest.vmlinux
            initrd = initrd or guest.initrd
            flags = [SHELL_FLAG] + (["pvhvm.net"] if net != "none" else [])
            cmdline = " ".join([cmdline, *(f for f in flags if f not in cmdline.split())]).strip()
            if snapshot:
                cached = _snapshot_path(guest, initrd, cmdline, memory, maxmem, nr_vcpus, net)
                dom = _restore_snapshot(cached, term, trace=show if trace else None,
                                        xenstore_socket=xenstore_socket, forward=forward)
                if dom is None:
                    first_prompt = _FirstPromptSnapshot(cached, term)

        # The flags as a domain config: what `pvhvm create` would read from a file.
        config = _boot_config(kernel, initrd, cmdline, memory, maxmem, nr_vcpus, net, forward, disk, system_map,
                              xenstore_socket, on_reboot)

        def build(console=term.write) -> Domain:
            dom = Domain(**config.domain_kwargs(), console=console, trace=show if trace else None)
            dom.config_text = config.to_text()
            if profile is not None:
                dom.start_profile(profile, profile_hz)
            if gdb is not None:
                serve_gdb(dom, gdb, wait=gdb_wait, say=lambda m: print(f"pvhvm: {m}", file=sys.stderr,
                                                                       end=term.eol))
            return dom

        if dom is None:
            dom = build(first_prompt.write) if first_prompt is not None else build()
        if net_warning is not None:
            print(f"pvhvm: {net_warning}", file=sys.stderr)
    except (PvhvmError, _core.CoreError) as e:
        usr1.close()
        raise _fail(str(e)) from None
    except (KeyboardInterrupt, Detached) as e:
        raise _ended_while_building(e, dom, usr1) from None
    # Restored from the snapshot, the shell waits at a prompt nobody saw: a fresh one.
    _run_console(dom, term, usr1, timeout=timeout, xenstore_socket=xenstore_socket, save_to=save_to,
                 save_on_suspend=save_on_suspend, snapshot=first_prompt, nudge=snapshot and first_prompt is None,
                 rebuild=build if on_reboot == "restart" else None)


boot.__doc__ = boot.__doc__.replace("    {exit_status}", EXIT_STATUS_HELP)


def serve_gdb(dom: Domain, address: str, *, wait: bool, say: Callable[[str], None]) -> None:
    """`--gdb`: the GDB stub on `address`, said where; with `wait` the
    domain stands still until gdb continues it. PvhvmError if it cannot
    listen there (the domain is closed)."""
    try:
        server = dom.serve_gdb(address)
    except (ValueError, OSError) as e:
        dom.close()
        raise PvhvmError(f"--gdb {address}: {_why(e)}") from None
    if wait:
        dom.pause()
    host = server.host if ":" not in server.host else f"[{server.host}]"
    say(f"gdb stub on {host}:{server.port}"
        + (", the guest waits for it" if wait else "")
        + f" (gdb {dom.kernel_path} -ex 'target remote {host}:{server.port}')")


def _boot_config(kernel: Path, initrd: Path | None, cmdline: str, memory: int, maxmem: int | None, vcpus: int,
                 net: str, forward: list[str] | None, disk: list[str] | None, system_map: Path | None,
                 xenstore_socket: Path | None, on_reboot: str):
    """`pvhvm boot`'s flags as the settings of a config file (pvhvm.config)."""
    from .config import DomainConfig, VifSpec
    from .devices.disk import assign_vdevs, parse_disk_spec
    from .devices.net_host import parse_forward

    forwards = tuple(parse_forward(f) for f in forward or ())
    if forwards and net != "passt":
        raise PvhvmError("port forwards need --net passt")
    return DomainConfig(
        name="pvhvm", kernel=Path(kernel).absolute(), ramdisk=Path(initrd).absolute() if initrd else None,
        cmdline=cmdline, memory=memory, maxmem=maxmem, vcpus=vcpus, online_vcpus=vcpus,
        vifs=() if net == "none" else (VifSpec(net, None, forwards),),
        disks=tuple(dataclasses.replace(d, path=Path(d.path).absolute())
                    for d in assign_vdevs([parse_disk_spec(d) for d in disk or ()])),
        system_map=Path(system_map).absolute() if system_map else None,
        xenstore_socket=Path(xenstore_socket).absolute() if xenstore_socket else None, on_reboot=on_reboot)


def _restore_snapshot(path: Path, term: Terminal, *, trace, xenstore_socket: Path | None,
                      forward: list[str] | None) -> Domain | None:
    """The cached snapshot at `path` restored, or None if there is none
    (or none that this pvhvm can use: it is then dropped, and made again)."""
    if not path.is_file():
        return None
    try:
        return Domain.restore(path, console=term.write, trace=trace, xenstore_socket=xenstore_socket,
                              net_forwards=tuple(forward or ()))
    except savefile.SaveFileError as e:
        print(f"pvhvm: the cached snapshot cannot be used ({e}); booting afresh", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None


@app.command()
def restore(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A save file (`pvhvm boot --save-to` or "
                                         "--save-on-suspend, Domain.save).", show_default=False)],
    name: Annotated[
        Optional[str], typer.Option("--name", help="The domain's name (default: the saved one).",
                                    show_default=False)
    ] = None,
    trace: Annotated[bool, typer.Option("--trace", help="Print every hypercall to stderr.")] = False,
    timeout: Annotated[Optional[float], typer.Option(help="Give up after this many seconds.")] = None,
    xenstore_socket: Annotated[
        Optional[Path], typer.Option("--xenstore-socket", metavar="PATH", help=XENSTORE_SOCKET_HELP)
    ] = None,
    forward: Annotated[
        Optional[list[str]], typer.Option("--forward", "-p", metavar="HOSTPORT[:GUESTPORT]",
                                          help=FORWARD_HELP + " Default: the saved domain's (which it may "
                                          "still hold, if it runs on).")
    ] = None,
    escape_char: Annotated[str, typer.Option("--escape-char", metavar="KEY", help=ESCAPE_HELP)] = "^]",
    save_to: Annotated[Optional[Path], typer.Option("--save-to", metavar="FILE", help=SAVE_TO_HELP)] = None,
    save_on_suspend: Annotated[
        Optional[Path], typer.Option("--save-on-suspend", metavar="FILE", help=SAVE_ON_SUSPEND_HELP)
    ] = None,
    background: Annotated[
        bool, typer.Option("--background", "-b", help="Run it in the background, as `xl restore` and `pvhvm "
                           "create` do: reached by name (`pvhvm list`, `pvhvm console NAME` …).")
    ] = False,
) -> None:
    """Continue a saved domain from FILE, with its console attached as
    `pvhvm boot` attaches it (same keys, piped input, exit statuses), or
    in the background with --background.

    Everything comes back as it was saved: vCPUs, memory, event channels,
    xenstore, devices (disks are opened again; the network's host side is
    started afresh, so the guest's open connections are gone but its address
    stays). A guest saved as it suspended itself is told its suspend was
    cancelled and goes on. The console shows only what the guest writes from
    now on: press Enter for a shell's prompt. A file that cannot be used
    (missing, not a save, truncated, damaged, from another pvhvm format) is
    one line on stderr and status 2.

    {exit_status}
    """
    escape = _escape_key(escape_char)
    save_to = _save_path("--save-to", save_to)
    save_on_suspend = _save_path("--save-on-suspend", save_on_suspend)
    if background:
        from .toolstack import restore_in_background

        try:
            handle = restore_in_background(file, name=name)
        except PvhvmError as e:
            raise _fail(str(e)) from None
        print(f"pvhvm: domain {handle.name} restored (domid {handle.domid}, pid {handle.pid})", file=sys.stderr)
        return
    term = Terminal(escape=escape)
    end_on_signals()

    show = _trace_printer(term)
    usr1 = _SaveSignal()
    try:
        dom = Domain.restore(file, console=term.write, trace=show if trace else None, name=name,
                             xenstore_socket=xenstore_socket, net_forwards=forward)
    except (PvhvmError, _core.CoreError) as e:
        usr1.close()
        raise _fail(str(e)) from None
    except (KeyboardInterrupt, Detached) as e:
        raise _ended_while_building(e, None, usr1) from None
    _run_console(dom, term, usr1, timeout=timeout, xenstore_socket=xenstore_socket, save_to=save_to,
                 save_on_suspend=save_on_suspend, rebuild=_rebuilder(dom, term.write, show if trace else None))


def _rebuilder(dom: Domain, console, trace) -> Callable[[], Domain] | None:
    """For a restored domain that reboots: built again from the config it
    was made from (a save by the toolstack keeps it), else none."""
    if dom.config_text is None:
        return None
    from .config import parse_config

    config, _ = parse_config(dom.config_text, source=f"the saved config of {dom.name}", base_dir=Path("/"))
    if config.on_reboot != "restart":
        return None

    def build() -> Domain:
        rebuilt = Domain(**{**config.domain_kwargs(), "name": dom.name}, domid=dom.domid, console=console,
                         trace=trace)
        rebuilt.config_text = dom.config_text
        return rebuilt

    return build


restore.__doc__ = restore.__doc__.replace("    {exit_status}", EXIT_STATUS_HELP)


@app.command()
def inspect(
    kernel: Annotated[Path, typer.Argument(help="Kernel image (ELF, or a bzImage).", show_default=False)],
) -> None:
    """Show a kernel's entry points, loadable segments and Xen ELF notes
    (an ELF vmlinux, or a bzImage with the vmlinux inside).

    Exit status: 0 shown; 2 not a kernel pvhvm can read (one line says why)."""
    try:
        img = load_elf(kernel)
    except PvhvmError as e:
        raise _fail(str(e)) from None
    from_bzimage = f" (in a bzImage, {img.compression} payload)" if img.compression else ""
    print(f"{img.path}: ELF{img.elf_class} {'x86-64' if img.machine == 62 else 'i386'}{from_bzimage}")
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


@app.command("profile")
def profile_cmd(
    file: Annotated[Path, typer.Argument(help="A profile from `pvhvm boot --profile FILE`.", show_default=False)],
    top: Annotated[int, typer.Option("--top", metavar="N", help="Functions shown per phase.")] = 10,
    svg: Annotated[
        Optional[Path], typer.Option("--svg", metavar="OUT", help="Also draw it as a flame graph (SVG) in OUT.")
    ] = None,
) -> None:
    """Show where a profiled guest's time went: the phase timeline (process
    start, first guest instruction, first hypercall, first console line,
    Xen clocksource, first user-space instruction, init, end), then the
    functions that took the most samples in each phase.

    Exit status: 0 shown; 2 FILE missing or not a profile (one line says why)."""
    from .profile import Profile

    try:
        prof = Profile.read(file)
    except (OSError, ValueError) as e:
        raise _fail(f"{file}: {_why(e)}") from None
    if not prof.folded:
        raise _fail(f"{file}: no samples in it (not a profile from pvhvm boot --profile?)")
    print(prof.report(top=max(top, 1)))
    if svg is not None:
        svg = _save_path("--svg", svg)
        svg.write_text(prof.svg())
        print(f"flame graph: {svg}")


@app.command()
def shutdown(
    target: Annotated[str, typer.Argument(metavar="NAME|SOCKET", help="A background domain's name, or the "
                                          "--xenstore-socket of a `pvhvm boot`.", show_default=False)],
    wait: Annotated[bool, typer.Option("-w", "--wait", help="Wait until the domain has gone down.")] = False,
    reboot: Annotated[bool, typer.Option("--reboot", help="Ask for a reboot instead of a power-off.")] = False,
    domid: Annotated[int, typer.Option(help="With SOCKET: the domain's id.")] = 1,
) -> None:
    """Ask a domain to shut down cleanly, as `xl shutdown` does: write its
    control/shutdown node; the guest powers off (or reboots) itself.

    NAME: a background domain (`pvhvm create`); -w waits until it is down.
    SOCKET: the xenstore socket a foreground `pvhvm boot --xenstore-socket
    SOCKET` serves; that `pvhvm boot` then exits 0.

    Exit status: 0 asked (and with -w, done); 1 the domain could not be
    asked (ended, paused); 2 no such domain or socket."""
    from .xenstore.client import xs_write

    if "/" in target or Path(target).is_socket():
        try:
            xs_write(Path(target), f"/local/domain/{domid}/control/shutdown", "reboot" if reboot else "poweroff")
        except PvhvmError as e:
            raise _fail(str(e)) from None
        return
    from .toolstack import commands

    result = commands._call(target, "shutdown", "reboot" if reboot else "poweroff", wait=wait)
    if result:
        print(f"pvhvm: domain {target}: {result['outcome']}; {result['action']}", file=sys.stderr)


@app.command("fetch-guest")
def fetch_guest(
    force: Annotated[bool, typer.Option("--force", help="Download and rebuild even if cached.")] = False,
    rootfs: Annotated[
        bool,
        typer.Option("--rootfs", help="Also build (or find cached) a Debian 12 root disk image with systemd "
                     "for this kernel; boot it with root=LABEL=pvhvm-root."),
    ] = False,
    arch: Annotated[str, typer.Option("--arch", metavar="amd64|i386", help=ARCH_HELP)] = "amd64",
    config: Annotated[
        Optional[str],
        typer.Option("--config", metavar="NAME", help="Print an xl-style config for the default guest named "
                     "NAME instead (`pvhvm fetch-guest --config web > web.cfg; pvhvm create web.cfg`).",
                     show_default=False),
    ] = None,
) -> None:
    """Fetch and prepare the default guest (Debian's cloud kernel and a busybox
    initramfs) into the cache; print where the files are. `--arch i386`
    prepares the 32-bit one (`pvhvm boot --arch i386` boots it). With
    --config NAME, print a domain config for it (docs/config.md): its shell
    on the console, passt networking if passt is installed, 256 MiB.

    Exit status: 0 ready; 2 it could not be fetched or prepared (one line
    says why: the network, a missing tool, a bad package)."""
    arch = _guest_arch(arch)
    if rootfs and arch != "amd64":
        raise _fail("--rootfs is for the amd64 guest only (its root disk carries that kernel's modules)")
    from .images import prepare_default_guest

    try:
        g = prepare_default_guest(force=force, arch=arch)
    except PvhvmError as e:
        raise _fail(str(e)) from None
    if config is not None:
        print(_default_guest_config(g, config), end="")
        return
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


def _default_guest_config(guest, name: str) -> str:
    from .config import DomainConfig, VifSpec
    from .devices.net_host import find_passt
    from .toolstack.runtime import ToolstackError, check_name

    try:
        check_name(name)
    except ToolstackError as e:
        raise _fail(str(e)) from None
    net = find_passt() is not None
    flags = [SHELL_FLAG] + (["pvhvm.net"] if net else [])
    config = DomainConfig(name=name, kernel=guest.vmlinux, ramdisk=guest.initrd,
                          cmdline=" ".join([DEFAULT_CMDLINE, *flags]), memory=256,
                          vifs=(VifSpec("passt"),) if net else ())
    return (f"# The default guest ({guest.kernel_package}, {guest.arch}) with a shell on "
            f"its console:\n# `pvhvm create` this file, then `pvhvm console {name}`.\n" + config.to_text())


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
    `pvhvm boot --disk DEST --root LABEL=pvhvm-root`.

    Exit status: 0 built or found; 2 it could not be built or copied, or
    DEST exists."""
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


# What each offset the self-test finds is for, in the order it reports them.
SELF_TEST_CHECKS = {
    "data_offset": "the CPU state inside Unicorn's saved contexts (where pvhvm edits segment caches, CPL, "
                   "pending exceptions)",
    "error_code": "an exception's error code, found by raising a #GP with a known code",
    "exception_is_int": "whether an exception came from INT n (a software interrupt's return address)",
    "old_exception": "the previous exception, reset after each delivery so that a second fault is not "
                     "taken for a double fault",
    "xcr0": "XCR0, found with XSETBV and checked with XGETBV (a save keeps every task's SSE state)",
    "tsc_offset": "the TSC offset RDTSC adds, checked with RDTSC (a restored guest's TSC goes on)",
}


@app.command("self-test")
def self_test() -> None:
    """Check that this Unicorn build holds what pvhvm's workarounds need
    (docs/unicorn.md): it runs small guests on the engine that raise known
    faults, XSETBV and RDTSC, and finds where Unicorn keeps what its API
    does not show. No domain can start if this fails.

    Exit status: 0 every check held; 1 one did not (the message says which)."""
    try:
        offsets = _core.self_test()
    except _core.CoreError as e:
        print(f"pvhvm: self-test failed: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    print(f"ok: this Unicorn build holds all {len(offsets)} things pvhvm relies on:")
    for key, value in offsets.items():
        print(f"  {SELF_TEST_CHECKS.get(key, key)}: found at offset {value}")


def _register_toolstack() -> None:
    from .toolstack.commands import register

    register(app)


_register_toolstack()


def main() -> None:
    # Before running a command typer reads every command's parameters from
    # its signature: 30-40 ms of each `pvhvm boot`'s start for the 25 of
    # them. A command named first on the command line runs from an app
    # that has only it (the same group, options and messages).
    name = sys.argv[1] if len(sys.argv) > 1 else None
    chosen = [c for c in app.registered_commands
              if (c.name or typer.main.get_command_name(c.callback.__name__)) == name]
    if len(chosen) == 1:
        solo = typer.Typer(**APP_SETTINGS)
        solo.registered_callback = app.registered_callback
        solo.registered_commands = chosen
        solo(prog_name="pvhvm")
    else:
        app(prog_name="pvhvm")
