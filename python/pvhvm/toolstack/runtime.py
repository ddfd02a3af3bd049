"""Where background domains live on the host: the runtime directory.

    $XDG_RUNTIME_DIR/pvhvm/ (or /run/pvhvm as root, or /tmp/pvhvm-UID)
        lock          flock'd while a domain id is handed out
        next-domid    the next domain id (ids only increase, as under Xen)
        NAME.lock     held (flock) by NAME's domain process for its life;
                      it holds {"pid", "domid"}
        NAME.sock     NAME's control socket (protocol.py)
        NAME.log      the domain process's own messages

A name is taken while its .lock is held, so a domain process that dies
(even by SIGKILL) frees its name at once: whoever finds the lock free
removes what the process left (`sweep`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import PvhvmError

# xl's names: what a file name and a xenstore node take without quoting.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
FIRST_DOMID = 1
# DOMID_FIRST_RESERVED: ids wrap below it, skipping those in use.
DOMID_LIMIT = 0x7FF0


class ToolstackError(PvhvmError):
    """A toolstack operation failed: no such domain, name taken, a domain
    process that does not answer …"""


def runtime_dir() -> Path:
    """The directory of background domains (created 0700 if missing)."""
    env = os.environ.get("PVHVM_RUNTIME_DIR")
    if env:
        path = Path(env)
    elif os.geteuid() == 0:
        path = Path("/run/pvhvm")
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "pvhvm"
    else:
        path = Path(f"/tmp/pvhvm-{os.geteuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ToolstackError(f"bad domain name {name!r}: letters, digits and _.+- (up to 64), "
                             "starting with a letter or digit")
    return name


@dataclass(frozen=True)
class Paths:
    """One domain's files in the runtime directory."""

    root: Path
    name: str

    @property
    def lock(self) -> Path:
        return self.root / f"{self.name}.lock"

    @property
    def socket(self) -> Path:
        return self.root / f"{self.name}.sock"

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    def remove(self) -> None:
        for p in (self.socket, self.lock):
            p.unlink(missing_ok=True)


class Claim:
    """A domain name held by this process (its .lock flock'd), released by
    `release()` or when the process ends."""

    def __init__(self, paths: Paths, fd: int) -> None:
        self.paths = paths
        self._fd = fd

    def record(self, domid: int) -> None:
        data = json.dumps({"pid": os.getpid(), "domid": domid}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd >= 0:
            self.paths.remove()
            os.close(self._fd)
            self._fd = -1


def is_held(lock: Path) -> bool:
    """Whether a live process holds `lock`."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def sweep(root: Path | None = None) -> list[str]:
    """Remove what dead domain processes left behind; the live names, sorted."""
    root = root or runtime_dir()
    live = []
    for lock in sorted(root.glob("*.lock")):
        name = lock.name[: -len(".lock")]
        if lock.name == "lock":
            continue
        if is_held(lock):
            live.append(name)
        else:
            Paths(root, name).remove()
    # A socket without its lock: a process killed between the two.
    for sock in root.glob("*.sock"):
        name = sock.name[: -len(".sock")]
        if name not in live and not is_held(root / f"{name}.lock"):
            sock.unlink(missing_ok=True)
    return live


class _DirLock:
    def __init__(self, root: Path) -> None:
        self._fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def __enter__(self) -> "_DirLock":
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def claim(name: str, root: Path | None = None) -> Claim:
    """Take `name` for this process; ToolstackError if a live domain has it."""
    root = root or runtime_dir()
    paths = Paths(root, check_name(name))
    with _DirLock(root):
        fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ToolstackError(f"a domain named {name!r} already exists") from None
        paths.socket.unlink(missing_ok=True)  # a dead predecessor's
        return Claim(paths, fd)


def domids_in_use(root: Path) -> set[int]:
    used = set()
    for lock in root.glob("*.lock"):
        try:
            used.add(int(json.loads(lock.read_text() or "{}").get("domid", 0)))
        except (OSError, ValueError, AttributeError):
            pass
    return used


def next_domid(root: Path | None = None) -> int:
    """A new domain id: one more than the last handed out on this host
    (as Xen's ids increase), wrapping below DOMID_FIRST_RESERVED and skipping
    those of live domains."""
    root = root or runtime_dir()
    counter = root / "next-domid"
    with _DirLock(root):
        try:
            domid = int(counter.read_text().strip())
        except (OSError, ValueError):
            domid = FIRST_DOMID
        used = domids_in_use(root)
        for _ in range(DOMID_LIMIT):
            if not FIRST_DOMID <= domid < DOMID_LIMIT:
                domid = FIRST_DOMID
            if domid not in used:
                break
            domid += 1
        else:
            raise ToolstackError("no free domain id")
        tmp = counter.with_suffix(".tmp")
        tmp.write_text(f"{domid + 1}\n")
        tmp.replace(counter)
        return domid


def read_record(paths: Paths) -> dict:
    try:
        rec = json.loads(paths.lock.read_text() or "{}")
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}
