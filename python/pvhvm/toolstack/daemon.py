"""A background domain: the process `pvhvm create` starts for one domain.

It claims the domain's name in the runtime directory, builds the domain
(or restores it), serves the control socket and runs the domain until it
is destroyed, carrying out on_poweroff/on_reboot/on_watchdog/on_crash as
xl does. Started as `python -m pvhvm.toolstack.daemon --ready-fd N` with a
JSON launch record on stdin; it writes one JSON line to the ready fd, the
domain's id or why it could not start, and then runs on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .. import __version__
from ..api import Domain, Outcome, OutcomeKind, ShutdownReason
from ..errors import PvhvmError
from . import protocol, runtime
from .protocol import BAD_STATE, INVALID_ARGUMENT, CommandError
from .server import ControlServer, Request

COMMANDS = ["query-domain", "query-vcpus", "console", "console-size", "wait", "shutdown", "reboot", "destroy", "pause",
            "unpause", "dmesg", "mem-set", "save", "network-attach", "network-detach", "block-attach",
            "block-detach", "context", "dump-core"]

# What each end of a domain is called in its config (xl's on_* keys).
ACTIONS = ("destroy", "restart", "preserve", "coredump-destroy", "coredump-restart")


def dump_dir() -> Path:
    """Where coredump-* actions write core files: xl's /var/lib/xen/dump as
    root, else $XDG_STATE_HOME/pvhvm/dump."""
    env = os.environ.get("PVHVM_DUMP_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/pvhvm/dump")
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "pvhvm" / "dump"


def end_key(outcome: Outcome) -> str:
    """Which on_* setting an outcome is governed by."""
    if outcome.kind is OutcomeKind.SHUTDOWN and outcome.reason is not None:
        return {ShutdownReason.POWEROFF: "on_poweroff", ShutdownReason.REBOOT: "on_reboot",
                ShutdownReason.WATCHDOG: "on_watchdog", ShutdownReason.SOFT_RESET: "on_soft_reset",
                ShutdownReason.SUSPEND: "on_suspend"}.get(outcome.reason, "on_crash")
    if outcome.kind is OutcomeKind.HUNG:
        return "on_hang"
    return "on_crash"


def state_letters(dom: Domain) -> str:
    """xl list's State column: r b p s c d."""
    flags = ["-"] * 6
    outcome = dom.outcome
    if outcome is None and dom.paused:
        pass  # neither running nor blocked: "--p---", as xl shows a paused domain
    elif outcome is None:
        if any(dom.vcpu_status(v)["activity"] == "running" for v in range(dom.vcpus)):
            flags[0] = "r"
        else:
            flags[1] = "b"
    elif outcome.kind is OutcomeKind.HUNG:
        flags[1] = "b"
    elif outcome.crashed:
        flags[4] = "c"
    else:
        flags[3] = "s"
    if dom.paused:
        flags[2] = "p"
    return "".join(flags)


class DomainProcess:
    def __init__(self, launch: dict, claim: runtime.Claim) -> None:
        from ..config import parse_config

        self.claim = claim
        self.launch = launch
        self.config = None
        if launch.get("config") is not None:
            self.config, _ = parse_config(launch["config"], source=launch.get("source", "<config>"),
                                          base_dir=Path(launch.get("base_dir", ".")))
        self.name = claim.paths.name
        self.dom: Domain | None = None
        self.finished = False
        self.exit_status = 0
        self.last_outcome: str | None = None
        self.restarts = 0
        self.server = ControlServer(claim.paths.socket, self._greeting, COMMANDS)
        self.server.hub.to_guest = self._to_guest
        self.gdb_address: str | None = None  # where the config's gdb= stub listens
        self.console_size: tuple[int, int] | None = None  # the attached terminal's, kept over a restart

    # -- building -----------------------------------------------------------

    def _action(self, key: str) -> str:
        if key == "on_hang":  # a hung domain stays, blocked, as under Xen
            return "preserve"
        if key == "on_suspend":  # a suspended domain waits to be saved or destroyed
            return "preserve"
        default = {"on_reboot": "restart", "on_soft_reset": "restart"}.get(key, "destroy")
        if self.config is None:
            return default
        return getattr(self.config, key, None) or default

    def build(self) -> Domain:
        domid = runtime.next_domid(self.claim.paths.root)
        self.claim.record(domid)
        if self.dom is None and self.launch.get("restore"):
            dom = Domain.restore(self.launch["restore"], console=self.server.hub.output, name=self.name,
                                 domid=domid)
            if self.config is None and dom.config_text is not None:
                from ..config import parse_config

                self.config, _ = parse_config(dom.config_text, source=f"{self.launch['restore']} (config)",
                                              base_dir=Path("/"))
        else:
            assert self.config is not None
            kwargs = {**self.config.domain_kwargs(), "name": self.name}  # --name may rename it
            dom = Domain(**kwargs, domid=domid, console=self.server.hub.output)
            dom.config_text = self.config.to_text()
            online = getattr(self.config, "online_vcpus", None)
            if online is not None and online < dom.vcpus:
                dom.set_online_vcpus(online)
        if self.console_size is not None:
            dom.set_console_size(*self.console_size)
        dom.add_reader(self.server, self.server.serve)
        gdb = self.config.gdb if self.config is not None else None
        if gdb:
            try:
                server = dom.serve_gdb(gdb)
            except (ValueError, OSError) as e:
                dom.close()
                raise PvhvmError(f"gdb = {gdb!r}: {e.strerror if isinstance(e, OSError) else e}") from None
            self.gdb_address = f"{server.host}:{server.port}"
            print(f"pvhvm: gdb stub for {self.name} on {self.gdb_address}", file=sys.stderr, flush=True)
        self.dom = dom
        return dom

    def _greeting(self) -> dict:
        dom = self.dom
        return {"version": __version__, "name": self.name, "domid": dom.domid if dom else None,
                "pid": os.getpid()}

    def _to_guest(self, data: bytes) -> None:
        if self.dom is not None and self.dom.outcome is None:
            self.dom.send_console_input(data)

    # -- running ------------------------------------------------------------

    def run(self) -> int:
        while not self.finished:
            dom = self.dom
            assert dom is not None
            if dom.outcome is None:
                dom.run_until(lambda: self.server.has_requests or self.finished)
                if dom.outcome is not None:
                    self.on_end(dom.outcome)
            else:
                self.server.serve(1.0)  # a SIGTERM is seen within a second
            for request in self.server.take_requests():
                self.handle(request)
        return self.exit_status

    def on_end(self, outcome: Outcome) -> None:
        dom = self.dom
        assert dom is not None
        self.last_outcome = str(outcome)
        key = end_key(outcome)
        action = self._action(key)
        print(f"pvhvm: domain {self.name} (domid {dom.domid}): {outcome}; {key}={action}", file=sys.stderr,
              flush=True)
        if outcome.crashed:
            print(dom.crash_report(), file=sys.stderr, flush=True)
        if action.startswith("coredump-"):
            self._coredump(dom)
            action = action[len("coredump-"):]
        for waiter in self.server.waiters:
            waiter.reply({"outcome": str(outcome), "action": action})
        self.server.waiters.clear()
        if action == "restart":
            self.restarts += 1
            self._close_domain()
            try:
                self.build()
            except (PvhvmError, OSError) as e:
                print(f"pvhvm: cannot restart {self.name}: {e}", file=sys.stderr, flush=True)
                self.finished = True
                self.exit_status = 1
            else:
                self.server.hub.output(b"")
        elif action == "destroy":
            self.finished = True
            self.exit_status = outcome.exit_status
        # preserve: the ended domain stays for ctx, dump-core and destroy

    def _coredump(self, dom: Domain) -> None:
        if not hasattr(dom, "dump_core"):
            print("pvhvm: no core dump: this pvhvm cannot write one", file=sys.stderr, flush=True)
            return
        where = dump_dir()
        stamp = time.strftime("%Y-%m-%d-%H%M%S")
        path = where / f"{self.name}-{dom.domid}-{stamp}.core"
        try:
            where.mkdir(parents=True, exist_ok=True)
            dom.dump_core(path)
            print(f"pvhvm: core dumped to {path}", file=sys.stderr, flush=True)
        except (OSError, PvhvmError) as e:
            print(f"pvhvm: no core dump: {e}", file=sys.stderr, flush=True)

    def _close_domain(self) -> None:
        if self.dom is not None:
            try:
                self.dom.remove_reader(self.server)
            except (KeyError, ValueError):
                pass
            self.dom.close()

    def close(self) -> None:
        self._close_domain()
        self.server.close()
        self.claim.release()

    # -- requests ------------------------------------------------------------

    def handle(self, request: Request) -> None:
        if request.refusal is not None or request.command is None:
            request.fail(*(request.refusal or ("no command", protocol.GENERIC)))
            return
        handler = getattr(self, "cmd_" + request.command.replace("-", "_"))
        try:
            result = handler(request.arguments)
        except CommandError as e:
            request.fail(e.desc, e.cls)
            return
        except (PvhvmError, ValueError, OSError) as e:
            request.fail(str(e))
            return
        except Exception as e:  # a bug here must not take the domain down
            traceback.print_exc()
            request.fail(f"internal error: {e!r}")
            return
        if result is _DEFERRED:
            return
        if result is _CONSOLE:
            request.reply()
            self.server.hub.attach(request.conn)
            return
        if result is _WAIT:
            self.server.waiters.append(request)
            return
        request.reply(result)

    def _running(self) -> Domain:
        dom = self.dom
        assert dom is not None
        if dom.outcome is not None:
            raise CommandError(f"domain {self.name} has ended ({dom.outcome}); `pvhvm destroy {self.name}` "
                               "removes it", BAD_STATE)
        return dom

    def cmd_query_domain(self, args: dict) -> dict:
        dom = self.dom
        assert dom is not None
        mem = dom.memory_status if dom.outcome is None else {"target": 0, "current": 0, "maxmem": 0}
        cpu_ns = sum(dom.vcpu_status(v)["runstate_ns"][0] for v in range(dom.vcpus))
        online = sum(1 for v in range(dom.vcpus) if dom.vcpu_status(v)["online"])
        return {"name": self.name, "domid": dom.domid, "uuid": str(dom.uuid), "state": state_letters(dom),
                "memory_kib": mem, "vcpus": dom.vcpus, "online_vcpus": online, "cpu_time": cpu_ns / 1e9,
                "outcome": None if dom.outcome is None else str(dom.outcome), "paused": dom.paused,
                "pid": os.getpid(), "restarts": self.restarts, "last_outcome": self.last_outcome,
                "kernel": str(dom.kernel_path), "cmdline": dom.cmdline, "gdb": self.gdb_address}

    def cmd_query_vcpus(self, args: dict) -> list:
        dom = self.dom
        assert dom is not None
        out = []
        for v in range(dom.vcpus):
            st = dom.vcpu_status(v)
            out.append({"vcpu": v, "online": st["online"], "activity": st["activity"],
                        "runstate": st["runstate"], "time": st["runstate_ns"][0] / 1e9})
        return out

    def cmd_console(self, args: dict):
        hub = self.server.hub
        if hub.client is not None and not hub.client.closed:
            if not args.get("force"):
                raise CommandError(f"the console of {self.name} is attached elsewhere", BAD_STATE)
            hub.client.close()
        return _CONSOLE

    def cmd_console_size(self, args: dict) -> None:
        """The attached terminal's size, for the guest's shell (Domain.set_console_size)."""
        rows, cols = _int(args, "rows"), _int(args, "cols")
        self._running().set_console_size(rows, cols)
        self.console_size = (rows, cols)

    def cmd_wait(self, args: dict):
        """Answered when the domain next ends (its outcome and what was done)."""
        dom = self.dom
        assert dom is not None
        if dom.outcome is not None:
            return {"outcome": str(dom.outcome), "action": self._action(end_key(dom.outcome))}
        return _WAIT

    def cmd_shutdown(self, args: dict) -> None:
        action = args.get("action", "poweroff")
        if action not in ("poweroff", "reboot", "halt", "suspend"):
            raise CommandError(f"shutdown action must be poweroff, reboot, halt or suspend, not {action!r}",
                               INVALID_ARGUMENT)
        dom = self._running()
        if dom.paused:
            raise CommandError(f"domain {self.name} is paused: `pvhvm unpause {self.name}` first", BAD_STATE)
        dom.request_shutdown(action)

    def cmd_reboot(self, args: dict) -> None:
        self.cmd_shutdown({"action": "reboot"})

    def cmd_destroy(self, args: dict) -> None:
        self.finished = True
        self.exit_status = 0

    def cmd_pause(self, args: dict) -> None:
        self._running().pause()

    def cmd_unpause(self, args: dict) -> None:
        self._running().unpause()

    def cmd_dmesg(self, args: dict) -> dict:
        dom = self.dom
        assert dom is not None
        return {"text": dom.hypervisor_console.decode("utf-8", "replace")}

    def cmd_mem_set(self, args: dict) -> None:
        self._running().set_memory_target(_int(args, "mib"))

    def cmd_save(self, args: dict) -> dict:
        dom = self.dom
        assert dom is not None
        path = _text(args, "path")
        size = dom.save(path)
        if not args.get("keep_running", False):
            self.finished = True  # xl save: the saved domain goes
        return {"path": path, "size": size}

    def cmd_network_attach(self, args: dict) -> dict:
        dom = self._running()
        forwards = args.get("forwards", [])
        if not isinstance(forwards, list) or not all(isinstance(f, str) for f in forwards):
            raise CommandError("forwards must be a list of strings", INVALID_ARGUMENT)
        vif = dom.attach_nic(args.get("host", "passt"), mac=args.get("mac"), forwards=forwards)
        return {"devid": vif.devid, "mac": vif.mac}

    def cmd_network_detach(self, args: dict) -> None:
        self._running().detach_nic(_int(args, "devid"))

    def cmd_block_attach(self, args: dict) -> dict:
        disk = self._running().attach_disk(_text(args, "spec"))
        return {"vdev": disk.vdev}

    def cmd_block_detach(self, args: dict) -> None:
        self._running().detach_disk(_text(args, "vdev"))

    def cmd_context(self, args: dict) -> dict:
        dom = self.dom
        assert dom is not None
        vcpu = args.get("vcpu")
        if vcpu is not None and (isinstance(vcpu, bool) or not isinstance(vcpu, int)
                                 or not 0 <= vcpu < dom.vcpus):
            raise CommandError(f"vcpu must be 0 to {dom.vcpus - 1}", INVALID_ARGUMENT)
        if dom.outcome is None and not dom.paused:
            raise CommandError(f"domain {self.name} is running: `pvhvm pause {self.name}` first "
                               "(registers are only still while it stands)", BAD_STATE)
        system_map = args.get("system_map")
        if hasattr(dom, "context"):
            return {"text": dom.context(vcpu, system_map=system_map) if system_map else dom.context(vcpu)}
        return {"text": dom.crash_report()}

    def cmd_dump_core(self, args: dict) -> dict:
        dom = self.dom
        assert dom is not None
        path = _text(args, "path")
        if dom.outcome is None and not dom.paused:
            raise CommandError(f"domain {self.name} is running: `pvhvm pause {self.name}` first", BAD_STATE)
        dom.dump_core(path)
        return {"path": path}


_DEFERRED, _CONSOLE, _WAIT = object(), object(), object()


def _int(args: dict, key: str) -> int:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CommandError(f"{key} must be a number", INVALID_ARGUMENT)
    return value


def _text(args: dict, key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise CommandError(f"{key} must be a string", INVALID_ARGUMENT)
    return value


class _Terminated(BaseException):
    """SIGTERM while the domain is being built (no run loop to notice a flag yet)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _report(fd: int, message: dict) -> None:
    try:
        os.write(fd, json.dumps(message).encode() + b"\n")
        os.close(fd)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pvhvm-domain")
    parser.add_argument("--ready-fd", type=int, required=True)
    opts = parser.parse_args(argv)
    ready = opts.ready_fd
    launch: dict[str, Any] = json.loads(sys.stdin.read())
    # Signals of a terminal do not concern a background domain; SIGTERM destroys it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    process: DomainProcess | None = None

    def on_term_while_building(signum, frame) -> None:
        # Unwinds the build: passt stopped, the name and its files let go.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean-up must not be cut short
        raise _Terminated(signum)

    def on_term(signum, frame) -> None:
        assert process is not None
        process.finished = True
        process.exit_status = 128 + signum
        if process.dom is not None:
            process.dom.wake()

    signal.signal(signal.SIGTERM, on_term_while_building)
    try:
        claim = runtime.claim(launch["name"])
        try:
            process = DomainProcess(launch, claim)
            dom = process.build()
            signal.signal(signal.SIGTERM, on_term)  # from now on the run loop sees it
        except BaseException:
            if process is not None:
                process.close()
            else:
                claim.release()
            raise
    except (PvhvmError, OSError, ValueError) as e:
        _report(ready, {"error": str(e)})
        return 2
    except _Terminated as e:
        _report(ready, {"error": f"terminated by signal {e.signum} while starting"})
        return 128 + e.signum

    print(f"pvhvm: domain {process.name} (domid {dom.domid}) started, pid {os.getpid()}", file=sys.stderr,
          flush=True)
    _report(ready, {"name": process.name, "domid": dom.domid, "pid": os.getpid()})
    try:
        status = process.run()
    finally:
        process.close()
    print(f"pvhvm: domain {process.name} destroyed", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
