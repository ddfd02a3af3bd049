"""Background domains from Python and the CLI: create, connect, list.

    >>> import pvhvm
    >>> web = pvhvm.create("web.cfg")          # a domain process in the background
    >>> [d["name"] for d in pvhvm.list_domains()]
    ['web']
    >>> web = pvhvm.connect("web")
    >>> web.mem_set(128); web.reboot(); web.destroy()
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import protocol, runtime
from .runtime import ToolstackError

# How long a domain process may take to build its domain and say so.
START_TIMEOUT = 120.0


def log_dir() -> Path:
    """Domain processes' logs, as xl's /var/log/xen/xl-NAME.log."""
    if os.environ.get("PVHVM_LOG_DIR"):
        return Path(os.environ["PVHVM_LOG_DIR"])
    if os.geteuid() == 0:
        return Path("/var/log/pvhvm")
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "pvhvm" / "log"


def log_path(name: str) -> Path:
    return log_dir() / f"{name}.log"


class DomainHandle:
    """A connection to one background domain's control socket. Every method
    is one command of the control protocol (docs/control-protocol.md)."""

    def __init__(self, name: str, *, root: Path | None = None, timeout: float = 60.0,
                 started: dict | None = None) -> None:
        """Connects at once, or with `started` (what a domain process just
        said of itself) at the first command: a domain may end before that."""
        self.name = runtime.check_name(name)
        self.paths = runtime.Paths(root or runtime.runtime_dir(), name)
        self._timeout = timeout
        self.sock: socket.socket | None = None
        self._next_id = 0
        self.domid: int | None = None
        self.pid: int | None = None
        self.commands: list[str] = []
        if started is not None:
            self.domid, self.pid = started.get("domid"), started.get("pid")
        else:
            self._connect()

    def _connect(self) -> socket.socket:
        if self.sock is not None:
            return self.sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self._timeout)
        try:
            sock.connect(str(self.paths.socket))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            runtime.sweep(self.paths.root)
            raise ToolstackError(f"no domain named {self.name!r} (`pvhvm list` shows the domains)") from None
        self.sock = sock
        self._file = sock.makefile("rb")
        greeting = self._read().get("pvhvm")
        if not isinstance(greeting, dict):
            self.close()
            raise ToolstackError(f"{self.paths.socket}: not a pvhvm control socket")
        self.domid = greeting.get("domid")
        self.pid = greeting.get("pid")
        self.commands = greeting.get("commands", [])
        return sock

    def _read(self) -> dict:
        try:
            line = self._file.readline(protocol.MAX_LINE + 1)
        except socket.timeout:
            raise ToolstackError(f"domain {self.name} did not answer in time") from None
        except (ConnectionResetError, BrokenPipeError):
            line = b""  # the process ended while we spoke
        except OSError as e:
            raise ToolstackError(f"domain {self.name}: {e.strerror or e}") from None
        if not line:
            raise ToolstackError(f"domain {self.name} went away")
        try:
            return protocol.decode(line)
        except ValueError as e:
            raise ToolstackError(f"domain {self.name}: bad reply: {e}") from None

    def call(self, command: str, **arguments: Any) -> Any:
        """Send one command; its `return` value, or ToolstackError with the
        error's description."""
        sock = self._connect()
        self._next_id += 1
        ident = self._next_id
        message: dict = {"execute": command, "id": ident}
        if arguments:
            message["arguments"] = arguments
        try:
            sock.sendall(protocol.encode(message))
        except (ConnectionResetError, BrokenPipeError):
            raise ToolstackError(f"domain {self.name} went away") from None
        except OSError as e:
            raise ToolstackError(f"domain {self.name}: {e.strerror or e}") from None
        while True:
            reply = self._read()
            if reply.get("id") != ident:
                continue  # an answer to a command before ours (never, one at a time)
            if "error" in reply:
                raise ToolstackError(str(reply["error"].get("desc", reply["error"])))
            return reply.get("return")

    def close(self) -> None:
        if self.sock is not None:
            self._file.close()
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "DomainHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the commands ------------------------------------------------------

    def info(self) -> dict:
        return self.call("query-domain")

    def vcpu_list(self) -> list[dict]:
        return self.call("query-vcpus")

    def shutdown(self, action: str = "poweroff", *, wait: bool = False, timeout: float | None = None) -> dict | None:
        """As `xl shutdown [-w]`: ask the guest to power off (or `action`);
        with `wait`, return once it has ended: the outcome and what was done
        about it (destroyed, restarted, preserved)."""
        self.call("shutdown", action=action)
        return self.wait(timeout) if wait else None

    def reboot(self, *, wait: bool = False, timeout: float | None = None) -> dict | None:
        return self.shutdown("reboot", wait=wait, timeout=timeout)

    def wait(self, timeout: float | None = None) -> dict:
        """Until the domain next ends: {"outcome", "action"}; a domain
        process that exits meanwhile counts as destroyed."""
        sock = self._connect()
        sock.settimeout(timeout)
        try:
            return self.call("wait")
        except ToolstackError as e:
            if "went away" in str(e):
                return {"outcome": "destroyed", "action": "destroy"}
            raise
        finally:
            if self.sock is not None:
                self.sock.settimeout(self._timeout)

    def destroy(self, timeout: float = 30.0) -> None:
        """As `xl destroy`: the domain is gone (its process ended, its
        files removed) when this returns."""
        try:
            self.call("destroy")
        except ToolstackError as e:
            if "went away" not in str(e):
                raise
        self._wait_gone(timeout)

    def _wait_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while runtime.is_held(self.paths.lock):
            if time.monotonic() > deadline:
                raise ToolstackError(f"domain {self.name} (pid {self.pid}) did not end within {timeout} s")
            time.sleep(0.02)
        runtime.sweep(self.paths.root)

    def pause(self) -> None:
        self.call("pause")

    def unpause(self) -> None:
        self.call("unpause")

    def dmesg(self) -> str:
        return self.call("dmesg")["text"]

    def mem_set(self, mib: int) -> None:
        self.call("mem-set", mib=mib)

    def save(self, path: str | os.PathLike, *, keep_running: bool = False) -> int:
        """As `xl save [-c]`: the domain saved to `path` (absolute, as the
        domain process sees it) and, unless `keep_running`, destroyed."""
        result = self.call("save", path=str(Path(path).absolute()), keep_running=keep_running)
        if not keep_running:
            self._wait_gone(30.0)
        return result["size"]

    def network_attach(self, host: str = "passt", *, mac: str | None = None, forwards=()) -> dict:
        return self.call("network-attach", host=host, mac=mac, forwards=list(forwards))

    def network_detach(self, devid: int) -> None:
        self.call("network-detach", devid=devid)

    def block_attach(self, spec: str) -> str:
        return self.call("block-attach", spec=spec)["vdev"]

    def block_detach(self, vdev: str) -> None:
        self.call("block-detach", vdev=vdev)

    def context(self, vcpu: int | None = None, system_map: str | os.PathLike | None = None) -> str:
        args: dict = {"vcpu": vcpu}
        if system_map is not None:
            args["system_map"] = str(Path(system_map).absolute())
        return self.call("context", **args)["text"]

    def dump_core(self, path: str | os.PathLike) -> None:
        self.call("dump-core", path=str(Path(path).absolute()))

    def set_console_size(self, rows: int, cols: int) -> None:
        """Tell the guest's shell the size of the terminal its console is on."""
        self.call("console-size", rows=rows, cols=cols)

    def console(self, force: bool = False) -> socket.socket:
        """Attach to the console: the returned socket carries the guest's
        console both ways until closed (the domain goes on)."""
        self.call("console", force=force)
        assert self.sock is not None
        self.sock.settimeout(None)
        return self.sock


def connect(name: str) -> DomainHandle:
    """A handle on the background domain `name` (created by `pvhvm create`
    or `pvhvm.create`)."""
    return DomainHandle(name)


def list_domains() -> list[dict]:
    """Every live background domain's `query-domain`, by domain id. Files
    of domain processes that died are removed on the way."""
    root = runtime.runtime_dir()
    out = []
    for name in runtime.sweep(root):
        try:
            with DomainHandle(name, root=root, timeout=5.0) as handle:
                out.append(handle.info())
        except ToolstackError:
            rec = runtime.read_record(runtime.Paths(root, name))
            out.append({"name": name, "domid": rec.get("domid"), "pid": rec.get("pid"), "state": "------",
                        "unresponsive": True})
    return sorted(out, key=lambda d: (d.get("domid") is None, d.get("domid") or 0))


def _start(launch: dict) -> DomainHandle:
    name = runtime.check_name(launch["name"])
    log = log_path(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    ready_r, ready_w = os.pipe()
    try:
        with open(log, "wb") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "pvhvm.toolstack.daemon", "--ready-fd", str(ready_w)],
                                    stdin=subprocess.PIPE, stdout=logf, stderr=logf, pass_fds=[ready_w],
                                    start_new_session=True, cwd="/")
        os.close(ready_w)
        ready_w = -1
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(launch).encode())
        proc.stdin.close()
        answer = b""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            import select

            readable, _, _ = select.select([ready_r], [], [], 0.5)
            if readable:
                chunk = os.read(ready_r, 65536)
                if not chunk:
                    break
                answer += chunk
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
    try:
        message = json.loads(answer) if answer.strip() else None
    except ValueError:
        message = None
    if not isinstance(message, dict) or "error" in (message or {}):
        if isinstance(message, dict):
            proc.wait(10)
            raise ToolstackError(str(message["error"]))
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
        raise ToolstackError(f"the domain process of {name!r} failed to start"
                             + (f": {tail[0]}" if tail else "") + f" (log: {log})")
    _children.append(proc)
    return DomainHandle(name, started=message)


# Domain processes started from this process: reaped once they end, so a
# long-lived Python program does not collect zombies.
_children: list[subprocess.Popen] = []


def _reap() -> None:
    _children[:] = [p for p in _children if p.poll() is None]


def create(config: str | os.PathLike, *, name: str | None = None) -> DomainHandle:
    """As `xl create`: start the domain an xl-style config file describes
    in a process of its own; a handle on it. ConfigError for a bad config,
    ToolstackError if the name is taken or the domain cannot be built."""
    from ..config import load_config

    _reap()
    path = Path(config)
    cfg, warnings = load_config(path)
    if any(v.host == "passt" for v in cfg.vifs):
        from ..devices.net_host import network_warning

        warning = network_warning("passt", "passt")
        if warning:
            warnings.append(f"{cfg.name}: {warning}")
    for w in warnings:
        print(f"pvhvm: {w}", file=sys.stderr)
    return _start({"name": name or cfg.name, "config": cfg.to_text(), "source": str(path),
                   "base_dir": str(path.absolute().parent)})


def restore_in_background(path: str | os.PathLike, *, name: str | None = None) -> DomainHandle:
    """As `xl restore`: a saved domain continued in a process of its own."""
    from .. import savefile

    _reap()
    path = Path(path).absolute()
    if name is None:
        image = savefile.read(path)
        try:
            name = image.meta["domain"]["name"]
        except (KeyError, TypeError):
            raise savefile.SaveFileError(f"{path}: damaged (no domain name)") from None
        finally:
            image.close()
    return _start({"name": name, "restore": str(path)})
