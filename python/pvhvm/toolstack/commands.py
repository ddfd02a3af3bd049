"""The xl-like commands of the CLI: background domains by name.

Registered on cli.py's typer app by `register(app)`. Each command is one
call of the control protocol through `client.DomainHandle`, and prints what
xl would print.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import PvhvmError
from ..terminal import Detached
from . import client
from .runtime import ToolstackError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1

TOOLSTACK_EXIT_HELP = """\
    Exit status: 0 done; 1 the domain could not do it (ended, paused,
    refused); 2 bad input (no such domain, a bad argument or config)."""


def _fail(message: str, status: int = EXIT_BAD_INPUT) -> typer.Exit:
    print(f"pvhvm: {message}", file=sys.stderr)
    return typer.Exit(status)


def _handle(name: str) -> client.DomainHandle:
    try:
        return client.connect(name)
    except ToolstackError as e:
        raise _fail(str(e)) from None


def _call(name: str, method: str, *args, **kw):
    handle = _handle(name)
    try:
        return getattr(handle, method)(*args, **kw)
    except (ToolstackError, PvhvmError) as e:
        raise _fail(str(e), EXIT_FAILED) from None
    finally:
        handle.close()


def _mib(spec: str) -> int:
    """xl mem-set's sizes: 128, 128m, 1g, 131072k (MiB without a suffix)."""
    m = re.fullmatch(r"(\d+)([kKmMgGtT]?)[bB]?", spec.strip())
    if not m:
        raise _fail(f"{spec!r} is not a memory size (e.g. 256, 256m, 1g)")
    n, unit = int(m.group(1)), m.group(2).lower()
    kib = n * {"k": 1, "m": 1024, "g": 1 << 20, "t": 1 << 30, "": 1024}[unit]
    if kib % 1024:
        raise _fail(f"{spec!r}: pvhvm sets memory in whole MiB")
    return kib // 1024


def _with_exit_help(fn):
    fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n\n" + TOOLSTACK_EXIT_HELP
    return fn


def register(app: typer.Typer) -> None:  # noqa: C901 - one definition per command
    @app.command()
    @_with_exit_help
    def create(
        config: Annotated[Path, typer.Argument(metavar="CFG", help="An xl-style domain config file "
                                               "(docs/config.md).", show_default=False)],
        console: Annotated[bool, typer.Option("-c", "--console", help="Attach to its console once created.")]
        = False,
        name: Annotated[Optional[str], typer.Option("--name", help="Another name than the config's.",
                                                    show_default=False)] = None,
    ) -> None:
        """Create a domain from CFG and run it in the background, as `xl
        create`: it lives in a process of its own until destroyed, reached by
        name (`pvhvm list`, `console`, `shutdown` …). Its messages go to
        ~/.local/state/pvhvm/log/NAME.log (/var/log/pvhvm as root)."""
        try:
            handle = client.create(config, name=name)
        except (ToolstackError, PvhvmError) as e:
            raise _fail(str(e)) from None
        except OSError as e:
            raise _fail(f"{config}: {e.strerror or e}") from None
        print(f"pvhvm: domain {handle.name} created (domid {handle.domid}, pid {handle.pid})", file=sys.stderr)
        if console:
            _attach(handle, "^]")

    @app.command("list")
    def list_(
        long: Annotated[bool, typer.Option("-l", "--long", help="Everything known, as JSON.")] = False,
    ) -> None:
        """List the background domains, as `xl list`: name, id, memory (MiB),
        vCPUs, state and CPU time. State: r running, b blocked, p paused,
        s shut down, c crashed (kept by on_crash="preserve"). Files left by
        domain processes that died are removed on the way."""
        domains = client.list_domains()
        if long:
            print(json.dumps(domains, indent=2))
            return
        print(f"{'Name':<32} {'ID':>5} {'Mem':>6} {'VCPUs':>5} {'State':>8} {'Time(s)':>9}")
        for d in domains:
            mem = d.get("memory_kib", {}).get("current", 0) // 1024
            vcpus = d.get("online_vcpus", "?")
            cpu = f"{d['cpu_time']:.1f}" if "cpu_time" in d else "?"
            print(f"{d['name']:<32} {d.get('domid') or '?':>5} {mem:>6} {vcpus:>5} {d['state']:>8} {cpu:>9}")

    @app.command()
    def console(
        name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)],
        escape_char: Annotated[str, typer.Option("--escape-char", metavar="KEY",
                                                 help="The key that detaches (^X, one character, none).")]
        = "^]",
        force: Annotated[bool, typer.Option("--force", help="Take the console from a client attached "
                                            "elsewhere.")] = False,
    ) -> None:
        """Attach to NAME's console, as `xl console`. Ctrl-] (--escape-char)
        detaches; the domain goes on running and can be attached again.
        Exit status: 0 detached or the domain ended; 2 no such domain or
        its console is attached elsewhere."""
        _attach(_handle(name), escape_char, force=force)

    def _attach(handle: client.DomainHandle, escape_char: str, force: bool = False) -> None:
        from ..terminal import parse_escape
        from .console import ConsoleTerminal, attach

        try:
            escape = parse_escape(escape_char)
        except ValueError as e:
            raise _fail(str(e)) from None
        try:
            sock = handle.console(force=force)
        except ToolstackError as e:
            raise _fail(str(e)) from None
        term = ConsoleTerminal(escape=escape)

        def set_size(rows: int, cols: int) -> None:
            try:
                with client.connect(handle.name) as other:
                    other.call("console-size", rows=rows, cols=cols)
            except ToolstackError:
                pass  # an ended domain has no shell to tell

        try:
            why = attach(sock, term, set_size)
        except Detached as d:
            print(f"\npvhvm: {d.reason}; domain {handle.name} goes on running "
                  f"(`pvhvm console {handle.name}` attaches again)", file=sys.stderr)
            raise typer.Exit(0 if d.status == 130 else d.status) from None
        except KeyboardInterrupt:
            print(f"\npvhvm: interrupted; domain {handle.name} goes on running", file=sys.stderr)
            raise typer.Exit(0) from None
        finally:
            handle.close()
        print(f"\npvhvm: {why}", file=sys.stderr)

    @app.command()
    @_with_exit_help
    def reboot(name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)],
               wait: Annotated[bool, typer.Option("-w", "--wait", help="Wait until it has gone down.")] = False,
               ) -> None:
        """Ask NAME's guest to reboot, as `xl reboot`; with on_reboot="restart"
        (the default) the domain is built again from its config."""
        result = _call(name, "reboot", wait=wait)
        if result:
            print(f"pvhvm: domain {name}: {result['outcome']}; {result['action']}", file=sys.stderr)

    @app.command()
    @_with_exit_help
    def destroy(name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)]) -> None:
        """End NAME at once, as `xl destroy`: no shutdown in the guest; its
        process, files and devices go (disk images synced and unlocked)."""
        _call(name, "destroy")

    @app.command()
    @_with_exit_help
    def pause(name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)]) -> None:
        """Stop NAME's vCPUs, as `xl pause` (state p); its time goes on."""
        _call(name, "pause")

    @app.command()
    @_with_exit_help
    def unpause(name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)]) -> None:
        """Let a paused NAME run again, as `xl unpause`."""
        _call(name, "unpause")

    @app.command()
    @_with_exit_help
    def dmesg(name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)]) -> None:
        """The hypervisor console of NAME (what its guest wrote with
        console_io: early printk, Xen's messages), as `xl dmesg`."""
        sys.stdout.write(_call(name, "dmesg"))

    @app.command("vcpu-list")
    @_with_exit_help
    def vcpu_list(name: Annotated[Optional[str], typer.Argument(metavar="[NAME]", show_default=False)] = None
                  ) -> None:
        """The vCPUs of NAME (or of every domain), as `xl vcpu-list`: state
        r running, b blocked or halted, -p- offline, and CPU time."""
        names = [name] if name else [d["name"] for d in client.list_domains() if not d.get("unresponsive")]
        print(f"{'Name':<32} {'ID':>5} {'VCPU':>5} {'State':>6} {'Time(s)':>9}  Activity")
        for n in names:
            handle = _handle(n)
            try:
                domid = handle.domid
                vcpus = handle.vcpu_list()
            except ToolstackError as e:
                raise _fail(str(e), EXIT_FAILED) from None
            finally:
                handle.close()
            for v in vcpus:
                state = "-p-" if not v["online"] else "r--" if v["activity"] == "running" else "-b-"
                print(f"{n:<32} {domid:>5} {v['vcpu']:>5} {state:>6} {v['time']:>9.1f}  {v['activity']}")

    @app.command("mem-set")
    @_with_exit_help
    def mem_set(name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)],
                size: Annotated[str, typer.Argument(metavar="MEM", help="MiB, or with a suffix: 256m, 1g.",
                                                    show_default=False)]) -> None:
        """Set NAME's memory target, as `xl mem-set`: its balloon driver gives
        memory back or takes it again, up to maxmem."""
        _call(name, "mem_set", _mib(size))

    @app.command()
    @_with_exit_help
    def save(name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)],
             file: Annotated[Path, typer.Argument(metavar="FILE", show_default=False)],
             keep: Annotated[bool, typer.Option("-c", "--checkpoint", help="Leave the domain running "
                                                "(xl save -c).")] = False) -> None:
        """Save NAME to FILE and destroy it, as `xl save`; `pvhvm restore FILE`
        (--background to run it as before) continues it."""
        size = _call(name, "save", file, keep_running=keep)
        print(f"pvhvm: {name} saved to {file} ({size} bytes)", file=sys.stderr)

    @app.command("network-attach")
    @_with_exit_help
    def network_attach(
        name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)],
        spec: Annotated[Optional[list[str]], typer.Argument(metavar="[KEY=VALUE]...",
                                                            help="host=passt|tap:NAME, mac=, forward= "
                                                            "(repeatable), as in a vif spec.",
                                                            show_default=False)] = None,
    ) -> None:
        """Plug a network card into NAME, as `xl network-attach`; the guest's
        netfront sees it appear. Prints its devid."""
        host, mac, forwards = "passt", None, []
        for item in spec or []:
            for part in item.split(","):
                key, sep, value = part.strip().partition("=")
                if not sep:
                    raise _fail(f"{part!r}: expected KEY=VALUE (host=, mac=, forward=)")
                if key == "host":
                    host = value
                elif key == "mac":
                    mac = value
                elif key == "forward":
                    forwards.append(value)
                else:
                    raise _fail(f"unknown vif key {key!r} (host=, mac=, forward=)")
        result = _call(name, "network_attach", host, mac=mac, forwards=forwards)
        print(result["devid"])

    @app.command("network-detach")
    @_with_exit_help
    def network_detach(name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)],
                       devid: Annotated[int, typer.Argument(metavar="DEVID", show_default=False)]) -> None:
        """Unplug network card DEVID from NAME, as `xl network-detach`."""
        _call(name, "network_detach", devid)

    @app.command("block-attach")
    @_with_exit_help
    def block_attach(name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)],
                     spec: Annotated[str, typer.Argument(metavar="DISKSPEC", help="PATH[,ro][,vdev=xvdb] or "
                                                         "xl's 'format=raw, vdev=xvdb, access=rw, target=PATH'.",
                                                         show_default=False)]) -> None:
        """Plug a disk into NAME, as `xl block-attach`; prints its vdev."""
        print(_call(name, "block_attach", _absolute_target(spec)))

    @app.command("block-detach")
    @_with_exit_help
    def block_detach(name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)],
                     vdev: Annotated[str, typer.Argument(metavar="VDEV", show_default=False)]) -> None:
        """Unplug disk VDEV (xvdb, or its number) from NAME, as `xl block-detach`."""
        _call(name, "block_detach", vdev)

    @app.command()
    @_with_exit_help
    def ctx(name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)],
            vcpu: Annotated[Optional[int], typer.Option("--vcpu", help="Only this vCPU.")] = None,
            system_map: Annotated[Optional[Path], typer.Option("--system-map", "-s",
                                                               help="Name addresses with this System.map.")]
            = None) -> None:
        """Registers and a stack walk with symbols for each vCPU of a paused
        or crashed (on_crash="preserve") NAME, as `xenctx -s System.map`."""
        print(_call(name, "context", vcpu, system_map))

    @app.command("dump-core")
    @_with_exit_help
    def dump_core(name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)],
                  file: Annotated[Path, typer.Argument(metavar="FILE", show_default=False)]) -> None:
        """Write NAME's memory and vCPUs to FILE as an ELF core file that gdb
        and crash read, as `xl dump-core` (the domain must be paused or
        ended)."""
        _call(name, "dump_core", file)
        print(f"pvhvm: core of {name} written to {file}", file=sys.stderr)


def _absolute_target(spec: str) -> str:
    """A disk spec whose image path is made absolute: the domain process
    does not run in this directory."""
    if "target=" in spec:
        return re.sub(r"target=([^,]+)", lambda m: "target=" + str(Path(m.group(1).strip()).absolute()), spec)
    path, sep, rest = spec.partition(",")
    return str(Path(path).absolute()) + sep + rest
