"""xl-style domain configuration files (xl.cfg(5)), as `pvhvm create CFG`
reads them. docs/config.md describes the format and every key.

The syntax is libxlu's (tools/libs/util/libxlu_cfg_[ly].[ly] in Xen):
``KEY = VALUE`` or ``KEY += VALUE`` statements ended by a newline or ``;``;
a VALUE is a "string", a 'string', a number or a ``[list, of, values,]``
that may span lines; ``#`` starts a comment. Like xl, a number and a string
are the same thing to the parser (``memory = "512"`` is fine); a key's
reader decides what it wants. What xl accepts and pvhvm does not is
refused with a one-line ConfigError naming the file and line.
"""

from __future__ import annotations

import os
import re
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NoReturn

from . import _core
from .devices.disk import DiskError, DiskSpec, assign_vdevs, parse_disk_spec
from .devices.net_host import Forward, NetHostError, parse_forward
from .devices.netback import normalise_mac
from .errors import PvhvmError

# When the file gives none of cmdline, root, extra (xl would pass an empty
# command line, and a PVH Linux would then print nowhere).
DEFAULT_CMDLINE = "console=hvc0 earlyprintk=xen"
DEFAULT_MEMORY_MIB = 256
MIN_MEMORY_MIB = 16  # builder/layout.py's floor

ACTIONS = ("destroy", "restart", "preserve", "coredump-destroy", "coredump-restart")
# xl's defaults, except on_soft_reset (xl: soft-reset, which pvhvm cannot do).
DEFAULT_ACTIONS = {"on_poweroff": "destroy", "on_reboot": "restart", "on_watchdog": "destroy",
                   "on_crash": "destroy", "on_soft_reset": "destroy"}

# xl vif keys that describe dom0's side of a bridge or QEMU's emulated card;
# pvhvm's host side is passt or a TAP device, so they mean nothing here.
_XL_VIF_KEYS_WITHOUT_MEANING = frozenset({
    "bridge", "script", "model", "ip", "gatewaydev", "netdev", "vifname", "backend", "rate", "mtu",
    "devid", "forwarddev", "accel", "trusted",
})
VIF_HOSTS_HELP = "passt, tap:NAME or none"


class ConfigError(PvhvmError):
    """A domain configuration file pvhvm cannot use ("FILE:LINE: why", one line)."""


@dataclass(frozen=True)
class VifSpec:
    """One network card: its host side ("passt", "tap:NAME" or "none" for a
    card with no link), its MAC (None: Xen's OUI and random, as xl picks)
    and the host ports passt forwards to the guest."""

    host: str = "passt"
    mac: str | None = None
    forwards: tuple[Forward, ...] = ()

    def to_spec(self) -> str:
        words = [f"host={self.host}"]
        if self.mac is not None:
            words.append(f"mac={self.mac}")
        words += [f"forward={_forward_text(f)}" for f in self.forwards]
        return ",".join(words)


@dataclass(frozen=True)
class DomainConfig:
    """A domain as its config file describes it; paths are absolute.
    `vcpus` is how many vCPUs the domain has (xl's maxvcpus), and
    `online_vcpus` how many of them are up at boot (xl's vcpus)."""

    name: str
    kernel: Path
    ramdisk: Path | None = None
    cmdline: str = DEFAULT_CMDLINE
    memory: int = DEFAULT_MEMORY_MIB
    maxmem: int | None = None
    vcpus: int = 1
    online_vcpus: int = 1
    uuid: uuidlib.UUID | None = None
    vifs: tuple[VifSpec, ...] = ()
    disks: tuple[DiskSpec, ...] = ()
    on_poweroff: str = DEFAULT_ACTIONS["on_poweroff"]
    on_reboot: str = DEFAULT_ACTIONS["on_reboot"]
    on_watchdog: str = DEFAULT_ACTIONS["on_watchdog"]
    on_crash: str = DEFAULT_ACTIONS["on_crash"]
    on_soft_reset: str = DEFAULT_ACTIONS["on_soft_reset"]
    gdb: str | None = None
    system_map: Path | None = None
    xenstore_socket: Path | None = None

    def domain_kwargs(self) -> dict:
        """Keyword arguments for pvhvm.Domain(...)."""
        return {
            "kernel": self.kernel,
            "initrd": self.ramdisk,
            "cmdline": self.cmdline,
            "memory_mib": self.memory,
            "maxmem_mib": self.maxmem,
            "name": self.name,
            "vcpus": self.vcpus,
            "disks": list(self.disks),
            "uuid": self.uuid,
            "system_map": self.system_map,
            "xenstore_socket": self.xenstore_socket,
            "nics": list(self.vifs),
        }

    def to_text(self) -> str:
        """This configuration as an xl config file that parse_config reads
        back into an equal DomainConfig."""
        out = ["# pvhvm domain configuration (xl.cfg(5) syntax, see docs/config.md)",
               f"name = {_quote(self.name)}", 'type = "pvh"']
        if self.uuid is not None:
            out.append(f"uuid = {_quote(str(self.uuid))}")
        out.append(f"kernel = {_quote(str(self.kernel))}")
        if self.ramdisk is not None:
            out.append(f"ramdisk = {_quote(str(self.ramdisk))}")
        out.append(f"cmdline = {_quote(self.cmdline)}")
        out.append(f"memory = {self.memory}")
        if self.maxmem is not None:
            out.append(f"maxmem = {self.maxmem}")
        out.append(f"vcpus = {self.online_vcpus}")
        if self.vcpus != self.online_vcpus:
            out.append(f"maxvcpus = {self.vcpus}")
        if self.vifs:
            out += ["vif = ["] + [f"    {_quote(v.to_spec())}," for v in self.vifs] + ["]"]
        if self.disks:
            out += ["disk = ["] + [f"    {_quote(_disk_text(d))}," for d in self.disks] + ["]"]
        for key in DEFAULT_ACTIONS:
            out.append(f"{key} = {_quote(getattr(self, key))}")
        if self.gdb is not None:
            out.append(f"gdb = {_quote(self.gdb)}")
        if self.system_map is not None:
            out.append(f"system_map = {_quote(str(self.system_map))}")
        if self.xenstore_socket is not None:
            out.append(f"xenstore_socket = {_quote(str(self.xenstore_socket))}")
        return "\n".join(out) + "\n"


def load_config(path: str | os.PathLike) -> tuple[DomainConfig, list[str]]:
    """parse_config on a file; relative paths in it are taken from its directory."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text") from None
    return parse_config(text, source=str(path), base_dir=path.parent)


def parse_config(text: str, *, source: str = "<config>",
                 base_dir: str | os.PathLike | None = None) -> tuple[DomainConfig, list[str]]:
    """The DomainConfig an xl config text describes, and warnings (one line
    each: unknown keys, xl settings that mean nothing here). `source` names
    the text in messages; relative paths are taken from `base_dir` (the
    current directory if None). Raises ConfigError."""
    base = Path(os.path.abspath(base_dir if base_dir is not None else os.getcwd()))
    settings = _Parser(text, source).parse()
    return _Reader(settings, source, base).read()


# --------------------------------------------------------------------------- syntax


@dataclass
class _Token:
    kind: str  # "ident", "number", "string", "nl", "eof" or the punctuation itself
    text: str
    line: int


@dataclass
class _Value:
    """An atom (`text`; xl keeps numbers as text too) or a list (`items`)."""

    line: int
    text: str | None = None
    items: list[_Value] | None = None


@dataclass
class _Setting:
    key: str
    value: _Value
    line: int
    appended: bool  # set with +=: xl then refuses to read it as a number


_IDENT = re.compile(r"[a-z][._0-9a-z]*")
_NUMBER = re.compile(r"[0-9][0-9a-fx]*")
_QUOTED = {'"': re.compile(r'"((?:[^"\\\n]|\\.)*)"'), "'": re.compile(r"'((?:[^'\\\n]|\\.)*)'")}
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
            "v": "\v"}
_PUNCTUATION = "[],;="
# Where xl's lexer stops and says the file looks like Python (old xm configs).
_PYTHONISH = "+-.():"


def _error(source: str, line: int | None, message: str) -> ConfigError:
    return ConfigError(f"{source}:{line}: {message}" if line is not None else f"{source}: {message}")


class _Parser:
    """libxlu's grammar, by recursive descent:
    file = { [KEY ("=" | "+=") value] (NEWLINE | ";") } [KEY ("=" | "+=") value];
    value = atom | "[" {NEWLINE} [value {NEWLINE} {"," {NEWLINE} value {NEWLINE}} ["," {NEWLINE}]] "]"."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        # libxlu refuses a CR; files edited on Windows are common enough to take.
        self.tokens = list(self._lex(text.replace("\r\n", "\n")))
        self.pos = 0

    def fail(self, line: int, message: str) -> NoReturn:
        raise _error(self.source, line, message)

    def _lex(self, text: str) -> Iterator[_Token]:
        pos, line, end = 0, 1, len(text)
        while pos < end:
            c = text[pos]
            if c in " \t":
                pos += 1
            elif c == "\n":
                yield _Token("nl", c, line)
                line += 1
                pos += 1
            elif c == "#":
                newline = text.find("\n", pos)
                pos = end if newline < 0 else newline
            elif text.startswith("+=", pos):
                yield _Token("+=", "+=", line)
                pos += 2
            elif c in _PUNCTUATION:
                yield _Token(c, c, line)
                pos += 1
            elif c in _QUOTED:
                m = _QUOTED[c].match(text, pos)
                if m is None:
                    self.fail(line, f"unterminated string {text[pos:].split(chr(10), 1)[0]!r}")
                yield _Token("string", self._dequote(m.group(1), line), line)
                pos = m.end()
            elif (m := _IDENT.match(text, pos)) is not None:
                yield _Token("ident", m.group(), line)
                pos = m.end()
            elif (m := _NUMBER.match(text, pos)) is not None:
                yield _Token("number", m.group(), line)
                pos = m.end()
            else:
                word = re.match(r"[^ \t\n]*", text[pos:]).group()
                hint = ""
                if c in _PYTHONISH:
                    hint = " (an xl config is not Python: values are \"strings\", numbers or [lists])"
                elif c.isupper():
                    hint = " (keys are lower case)"
                self.fail(line, f"syntax error near {word!r}{hint}")
        yield _Token("eof", "", line)

    def _dequote(self, body: str, line: int) -> str:
        if "\\" not in body and "\0" not in body:
            return body
        if "\0" in body:
            self.fail(line, "a NUL character in a string")
        out, i = [], 0
        while i < len(body):
            c = body[i]
            if c != "\\":
                out.append(c)
                i += 1
                continue
            escaped = body[i + 1]  # the string's pattern has a character after every backslash
            if escaped in _ESCAPES:
                out.append(_ESCAPES[escaped])
            elif escaped == "x" or escaped in "01234567":
                # libxlu parses \xHH and \NNN but writes nothing for them.
                self.fail(line, f"numeric escape \\{escaped}… in a string: xl drops those; write the character itself")
            else:
                self.fail(line, f"invalid escape \\{escaped} in a string")
            i += 2
        return "".join(out)

    @staticmethod
    def _describe(tok: _Token) -> str:
        if tok.kind == "nl":
            return "the end of the line"
        if tok.kind == "eof":
            return "the end of the file"
        if tok.kind == "string":
            return f"the string {tok.text!r}"
        return repr(tok.text)

    def _skip_newlines(self) -> None:
        while self.tokens[self.pos].kind == "nl":
            self.pos += 1

    def parse(self) -> dict[str, _Setting]:
        settings: dict[str, _Setting] = {}
        while True:
            tok = self.tokens[self.pos]
            if tok.kind == "eof":
                return settings
            if tok.kind in ("nl", ";"):
                self.pos += 1
                continue
            if tok.kind != "ident":
                self.fail(tok.line, f"expected a key, found {self._describe(tok)}")
            op = self.tokens[self.pos + 1]
            if op.kind not in ("=", "+="):
                self.fail(op.line, f"expected = or += after {tok.text}, found {self._describe(op)}")
            self.pos += 2
            value = self._value()
            self._store(settings, tok.text, value, op.kind == "+=", tok.line)
            end = self.tokens[self.pos]
            if end.kind not in ("nl", ";", "eof"):
                self.fail(end.line, f"expected the end of the statement after {tok.text}'s value, "
                                    f"found {self._describe(end)}")

    def _value(self) -> _Value:
        tok = self.tokens[self.pos]
        if tok.kind in ("string", "number"):
            self.pos += 1
            return _Value(tok.line, text=tok.text)
        if tok.kind != "[":
            self.fail(tok.line, f"expected a value (a \"string\", a number or a [list]), found {self._describe(tok)}")
        self.pos += 1
        items: list[_Value] = []
        while True:
            self._skip_newlines()
            if self.tokens[self.pos].kind == "eof":
                self.fail(tok.line, "the list opened here has no ]")
            if self.tokens[self.pos].kind == "]":
                break
            items.append(self._value())
            self._skip_newlines()
            sep = self.tokens[self.pos]
            if sep.kind == ",":
                self.pos += 1
            elif sep.kind != "]":
                if sep.kind == "eof":
                    self.fail(tok.line, "the list opened here has no ]")
                self.fail(sep.line, f"expected , or ] in the list, found {self._describe(sep)}")
        self.pos += 1
        return _Value(tok.line, items=items)

    def _store(self, settings: dict[str, _Setting], key: str, value: _Value, appended: bool, line: int) -> None:
        prev = settings.get(key)
        if appended and prev is not None:
            if (prev.value.items is None) != (value.items is None):
                self.fail(line, f"{key} +=: cannot add a [list] to a \"string\" or a \"string\" to a [list]")
            if value.items is None:
                value = _Value(value.line, text=prev.value.text + value.text)
            else:
                value = _Value(value.line, items=prev.value.items + value.items)
        # A later setting replaces an earlier one, as in xl; its line is the one reported.
        settings.pop(key, None)
        settings[key] = _Setting(key, value, line, appended)


# --------------------------------------------------------------------------- keys


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
# strtol(…, 0)'s spellings, which is how xl reads numbers.
_INTEGER = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|[0-9]+)\Z")


class _Reader:
    def __init__(self, settings: dict[str, _Setting], source: str, base_dir: Path) -> None:
        self.settings = settings
        self.source = source
        self.base_dir = base_dir
        self.used: set[str] = set()
        self.warnings: list[tuple[int, str]] = []

    def fail(self, line: int | None, message: str) -> NoReturn:
        raise _error(self.source, line, message)

    def warn(self, line: int | None, message: str) -> None:
        where = f"{self.source}:{line}" if line is not None else self.source
        self.warnings.append((line or 0, f"{where}: {message}"))

    def get(self, key: str) -> _Setting | None:
        self.used.add(key)
        return self.settings.get(key)

    def string(self, key: str) -> tuple[str, int] | None:
        s = self.get(key)
        if s is None:
            return None
        if s.value.items is not None:
            self.fail(s.line, f"{key} must be a single value, not a list")
        return s.value.text, s.line

    def number(self, key: str, low: int, high: int, unit: str = "") -> tuple[int, int] | None:
        s = self.string(key)
        if s is None:
            return None
        text, line = s
        if self.settings[key].appended:
            self.fail(line, f"{key}: += does not work on numbers")
        m = _INTEGER.match(text)
        if m is None:
            self.fail(line, f"{key} must be a number, not {text!r}")
        sign, digits = m.groups()
        if digits[:2].lower() == "0x":
            n = int(digits, 16)
        elif len(digits) > 1 and digits[0] == "0":
            self.fail(line, f"{key} = {text}: xl reads a number with a leading 0 as octal; write it without the 0")
        else:
            n = int(digits, 10)
        n = -n if sign == "-" else n
        if not low <= n <= high:
            self.fail(line, f"{key} must be from {low} to {high}{unit}, not {n}")
        return n, line

    def items(self, key: str) -> tuple[list[tuple[str, int]], int] | None:
        s = self.get(key)
        if s is None:
            return None
        if s.value.items is None:
            self.fail(s.line, f"{key} must be a [list], e.g. {key} = [ {_quote(s.value.text)} ]")
        out = []
        for item in s.value.items:
            if item.items is not None:
                self.fail(item.line, f"{key}: a list inside the list")
            out.append((item.text, item.line))
        return out, s.line

    def path(self, key: str, text: str, line: int) -> Path:
        if not text:
            self.fail(line, f"{key} is empty")
        try:
            p = Path(text).expanduser()
        except RuntimeError as e:  # ~user with no such user
            self.fail(line, f"{key} {text!r}: {e}")
        return Path(os.path.abspath(self.base_dir / p))

    def file(self, key: str, what: str) -> Path | None:
        s = self.string(key)
        if s is None:
            return None
        p = self.path(key, *s)
        if not p.is_file():
            self.fail(s[1], f"{key}: no such {what} {p}" if not p.exists() else f"{key}: {p} is not a file")
        return p

    def read(self) -> tuple[DomainConfig, list[str]]:
        self._check_type()
        name = self.string("name")
        if name is None:
            self.fail(None, 'no name = "..." (xl needs one too)')
        self._check_name(*name)
        kernel = self.file("kernel", "kernel")
        if kernel is None:
            self.fail(None, 'no kernel = "PATH": pvhvm boots a PVH kernel directly (no firmware, no bootloader)')
        uuid = self._uuid()
        memory = self.number("memory", MIN_MEMORY_MIB, _core.MAX_RAM >> 20, " MiB")
        memory_mib = memory[0] if memory else DEFAULT_MEMORY_MIB
        maxmem = self.number("maxmem", MIN_MEMORY_MIB, _core.MAX_RAM >> 20, " MiB")
        if maxmem is not None and maxmem[0] < memory_mib:
            self.fail(maxmem[1], f"maxmem ({maxmem[0]} MiB) is below memory ({memory_mib} MiB)")
        online = self.number("vcpus", 1, _core.MAX_VCPUS)
        online_vcpus = online[0] if online else 1
        most = self.number("maxvcpus", 1, _core.MAX_VCPUS)
        if most is not None and most[0] < online_vcpus:
            self.fail(most[1], f"maxvcpus ({most[0]}) is below vcpus ({online_vcpus})")
        config = DomainConfig(
            name=name[0],
            kernel=kernel,
            ramdisk=self.file("ramdisk", "ramdisk"),
            cmdline=self._cmdline(),
            memory=memory_mib,
            maxmem=maxmem[0] if maxmem else None,
            vcpus=most[0] if most else online_vcpus,
            online_vcpus=online_vcpus,
            uuid=uuid,
            vifs=self._vifs(),
            disks=self._disks(),
            **{key: self._action(key) for key in DEFAULT_ACTIONS},
            gdb=self._gdb(),
            system_map=self.file("system_map", "System.map"),
            xenstore_socket=self._optional_path("xenstore_socket"),
        )
        for s in self.settings.values():
            if s.key not in self.used:
                self.warn(s.line, f"unknown key {s.key!r} ignored")
        return config, [message for _, message in sorted(self.warnings, key=lambda w: w[0])]

    def _check_type(self) -> None:
        only_pvh = 'pvhvm runs PVH guests only (type = "pvh")'
        builder = self.string("builder")
        if builder is not None:
            self.fail(builder[1], f"builder = {builder[0]!r}: {only_pvh}")
        kind = self.string("type")
        if kind is not None and kind[0] != "pvh":
            self.fail(kind[1], f"type = {kind[0]!r}: {only_pvh}")
        pvh = self.number("pvh", -(1 << 63), (1 << 63) - 1)  # xl's old flag: any non-zero is true
        if pvh is not None and pvh[0] == 0:
            self.fail(pvh[1], f"pvh = 0: {only_pvh}")
        if kind is None and pvh is None:
            # xl builds a PV guest then; a kernel that boots PV also has a PVH entry these days.
            self.warn(None, 'no type = "pvh": xl would build a PV guest, pvhvm builds a PVH one')

    def _check_name(self, name: str, line: int) -> None:
        if not name:
            self.fail(line, "name is empty")
        if any(ord(c) < 0x20 or c == "\x7f" for c in name):
            self.fail(line, f"name {name!r} has control characters")
        if name.isdigit():
            self.fail(line, f"name {name!r} is a number: xl's commands would take it for a domain id")

    def _uuid(self) -> uuidlib.UUID | None:
        s = self.string("uuid")
        if s is None:
            return None
        if not _UUID.match(s[0]):
            self.fail(s[1], f"uuid {s[0]!r} is not of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (hex digits)")
        return uuidlib.UUID(s[0])

    def _cmdline(self) -> str:
        cmdline, root, extra = self.string("cmdline"), self.string("root"), self.string("extra")
        if cmdline is not None:
            for ignored in (root, extra):
                if ignored is not None:
                    self.warn(ignored[1], "root= and extra= are ignored in favour of cmdline= (as xl does)")
                    break
            return cmdline[0]
        if root is not None and extra is not None:
            return f"root={root[0]} {extra[0]}"
        if root is not None:
            return f"root={root[0]}"
        if extra is not None:
            return extra[0]
        return DEFAULT_CMDLINE

    def _action(self, key: str) -> str:
        s = self.string(key)
        if s is None:
            return DEFAULT_ACTIONS[key]
        action, line = s
        if action in ACTIONS:
            return action
        if action in ("rename-restart", "soft-reset"):
            self.fail(line, f"{key} = {action!r} is an xl action pvhvm does not have ({', '.join(ACTIONS)})")
        self.fail(line, f"{key}: unknown action {action!r} ({', '.join(ACTIONS)})")

    def _gdb(self) -> str | None:
        s = self.string("gdb")
        if s is None:
            return None
        spec, line = s
        from .gdbstub import parse_address  # the stub's own reading: [HOST:]PORT, 0 picks a free port

        try:
            parse_address(spec)
        except ValueError:
            self.fail(line, f"gdb = {spec!r}: want \"[HOST:]PORT\" (e.g. \"127.0.0.1:1234\")")
        return spec

    def _optional_path(self, key: str) -> Path | None:
        s = self.string(key)
        return None if s is None else self.path(key, *s)

    def _vifs(self) -> tuple[VifSpec, ...]:
        listed = self.items("vif")
        if listed is None:
            return ()
        vifs = tuple(self._vif(spec, line) for spec, line in listed[0])
        macs = [v.mac for v in vifs if v.mac is not None]
        if len(set(macs)) != len(macs):
            self.fail(listed[1], "vif: two cards with one MAC address")
        ports = [(f.proto, f.host_port) for v in vifs for f in v.forwards]
        if len(set(ports)) != len(ports):
            self.fail(listed[1], "vif: one host port forwarded twice")
        return vifs

    def _vif(self, spec: str, line: int) -> VifSpec:
        host, mac, forwards = "passt", None, []
        for word in spec.split(","):
            word = word.strip()
            if not word:
                continue
            key, eq, value = (part.strip() for part in word.partition("="))
            if not eq:
                self.fail(line, f"vif {spec!r}: {word!r} is not KEY=VALUE")
            if key == "host":
                if value not in ("passt", "none") and not (value.startswith("tap:") and _tap_name_ok(value[4:])):
                    self.fail(line, f"vif {spec!r}: host={value!r}: want {VIF_HOSTS_HELP} (NAME: 1 to 15 bytes)")
                host = value
            elif key == "mac":
                try:
                    mac = normalise_mac(value)
                except ValueError as e:
                    self.fail(line, f"vif {spec!r}: {e}")
            elif key == "forward":
                try:
                    forwards.append(parse_forward(value))
                except NetHostError as e:
                    self.fail(line, f"vif {spec!r}: {e}")
            elif key == "type":
                if value == "ioemu":
                    self.warn(line, "vif type=ioemu ignored: pvhvm has no emulated card, the guest gets a PV vif")
                elif value != "vif":
                    self.fail(line, f"vif {spec!r}: type must be vif or ioemu, not {value!r}")
            elif key in _XL_VIF_KEYS_WITHOUT_MEANING or key.startswith("colo_"):
                self.warn(line, f"vif {key}= ignored: pvhvm's host side is passt or a TAP device (host=)")
            else:
                self.fail(line, f"vif {spec!r}: unknown key {key!r} (pvhvm's: host=, mac=, forward=)")
        if forwards and host != "passt":
            self.fail(line, f"vif {spec!r}: forward= needs host=passt")
        return VifSpec(host, mac, tuple(forwards))

    def _disks(self) -> tuple[DiskSpec, ...]:
        listed = self.items("disk")
        if listed is None:
            return ()
        specs = []
        for spec, line in listed[0]:
            try:
                d = parse_disk_spec(spec)
            except DiskError as e:
                self.fail(line, str(e))
            path = str(d.path)
            for legacy in ("file:", "phy:"):  # xl's old target prefixes
                if path.startswith(legacy):
                    path = path[len(legacy):]
            specs.append(DiskSpec(self.path("disk", path, line), d.readonly, d.vdev, d.cdrom))
        try:
            return tuple(assign_vdevs(specs))
        except DiskError as e:
            self.fail(listed[1], f"disk: {e}")


def _tap_name_ok(name: str) -> bool:
    # Linux's IFNAMSIZ less the NUL; ',' would end the vif spec.
    return 0 < len(name.encode()) <= 15 and not any(c in name for c in "/, \t\n")


def _forward_text(f: Forward) -> str:
    return f"{'udp:' if f.proto == 'udp' else ''}{f.host_port}:{f.guest_port}"


def _disk_text(d: DiskSpec) -> str:
    words = ["format=raw"]
    if d.vdev is not None:
        words.append(f"vdev={d.vdev}")
    words.append("access=ro" if d.readonly else "access=rw")
    if d.cdrom:
        words.append("devtype=cdrom")
    words.append(f"target={d.path}")  # last: the rest of the spec is the path
    return ", ".join(words)


def _quote(text: str) -> str:
    """`text` as a double-quoted xl string. Newlines must be escaped (a string
    is one line); other control characters may stay as they are."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


__all__ = ["ConfigError", "DomainConfig", "VifSpec", "parse_config", "load_config", "DEFAULT_CMDLINE", "ACTIONS"]
