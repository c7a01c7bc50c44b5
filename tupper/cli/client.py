"""The CLI's side of the D-Bus API: calls tupperd over the system bus (bus activation starts it).

A small blocking D-Bus client on a plain socket: the CLI makes one or two calls per process, and
importing asyncio and dbus-next cost it more than the calls themselves (tupperd keeps dbus-next, in
tupper.api). It speaks just what the CLI needs: unix-socket addresses, EXTERNAL authentication, unix
fd passing, method calls, and signals that arrive while a call runs. Errors named org.tupper1.Error.*
come back as the matching TupperError.
"""

from __future__ import annotations

import _socket  # the C module under `socket`, which costs a CLI call 2-3 ms more to import (enums, selectors)
import builtins
import os
import struct

from tupper import errors
from tupper.busnames import BUS_NAME, JOB_IFACE, MANAGER_IFACE, MANAGER_PATH, error_from

METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
_FD_SPACE = _socket.CMSG_SPACE(16 * 4)  # room for the descriptors of one read (the bus sends at most a few)


def bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/dbus/system_bus_socket")


class Message:
    """A received message: the parts callers look at (as dbus-next names them)."""

    __slots__ = ("message_type", "serial", "reply_serial", "path", "interface", "member", "error_name", "sender", "signature", "body",
                 "unix_fds")

    def __init__(self, message_type: int, serial: int, fields: dict, body: list, unix_fds: list[int] | None = None) -> None:
        self.message_type = message_type
        self.serial = serial
        self.path = fields.get(1)
        self.interface = fields.get(2)
        self.member = fields.get(3)
        self.error_name = fields.get(4)
        self.reply_serial = fields.get(5)
        self.sender = fields.get(7)
        self.signature = fields.get(8, "")
        self.body = body
        self.unix_fds = unix_fds or []  # received descriptors; an "h" in the body is an index into these


class Client:
    def __init__(self) -> None:
        address = bus_address()
        self.serial = 0
        self.handlers: list = []
        self._buf = bytearray()
        self._fds: list[int] = []  # descriptors received and not yet claimed by a message
        self._unanswered: set[int] = set()  # calls sent without waiting (Hello, AddMatch): an error reply still raises
        try:
            self.sock = _connect(address)
            self._authenticate()
        except (OSError, ValueError) as exc:
            raise errors.Failed(f"cannot connect to the system bus at {address}: {exc}",
                                hint="start one (make setup does: dbus-daemon --system --fork), or use tupper --direct") from None

    def _authenticate(self) -> None:
        # Pipelined, as sd-bus does: AUTH, fd passing and BEGIN in one write, then Hello.
        uid = str(os.geteuid()).encode().hex().encode()
        self.sock.sendall(b"\0AUTH EXTERNAL " + uid + b"\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\n")
        hello = self._send("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello")
        reply = self._line()
        if not reply.startswith(b"OK "):
            raise ValueError(f"the bus refused authentication: {reply.decode(errors='replace')}")
        self._line()  # AGREE_UNIX_FD, or ERROR: then only exec (which passes fds) cannot work
        self._unanswered.add(hello)  # its reply (our unique name) comes before the first call's

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            self._fill()
        line, _, rest = bytes(self._buf).partition(b"\r\n")
        self._buf = bytearray(rest)
        return line

    def _fill(self) -> None:
        chunk, ancillary, _flags, _address = self.sock.recvmsg(65536, _FD_SPACE, _socket.MSG_CMSG_CLOEXEC)
        for level, kind, data in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                self._fds += struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4])
        if not chunk:
            raise ConnectionError("the bus closed the connection")
        self._buf += chunk

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self.sock.close()

    # ---- messages ---------------------------------------------------------------------------

    def _send(self, destination: str, path: str, interface: str, member: str, signature: str = "", body: list | None = None,
              unix_fds: builtins.list[int] | None = None) -> int:
        self.serial += 1
        payload = bytearray()
        if signature:
            _marshal(payload, signature, body or [])
        fields: list[tuple[int, str, str | int]] = [(1, "o", path), (2, "s", interface), (3, "s", member), (6, "s", destination)]
        if signature:
            fields.append((8, "g", signature))
        if unix_fds:
            fields.append((9, "u", len(unix_fds)))
        header = bytearray(struct.pack("<cBBBII", b"l", METHOD_CALL, 0, 1, len(payload), self.serial))
        _marshal(header, "a(yv)", [[[code, (sig, value)] for code, sig, value in fields]])
        header += bytes(-len(header) % 8)
        data = bytes(header + payload)
        sent = 0
        if unix_fds:  # the descriptors travel with the first bytes of the message
            sent = self.sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(unix_fds)}i", *unix_fds))])
        self.sock.sendall(data[sent:])
        return self.serial

    def _receive(self) -> Message:
        while len(self._buf) < 16:
            self._fill()
        e = "<" if self._buf[0:1] == b"l" else ">"  # the sender's byte order: "l"ittle or "B"ig
        _endian, mtype, _flags, _version, body_len, serial, fields_len = struct.unpack_from(e + "cBBBIII", self._buf)
        header_len = 16 + fields_len + (-(16 + fields_len) % 8)
        while len(self._buf) < header_len + body_len:
            self._fill()
        data = bytes(self._buf[: header_len + body_len])
        del self._buf[: header_len + body_len]
        (raw_fields,), _ = _unmarshal(data, 12, "a(yv)", e)
        fields = {code: value for code, (_sig, value) in raw_fields}
        signature = fields.get(8, "")
        body = _unmarshal(data[header_len:], 0, signature, e)[0] if signature else []
        count = fields.get(9, 0)  # the descriptors came with the message's first bytes
        fds, self._fds = self._fds[:count], self._fds[count:]
        return Message(mtype, serial, fields, body, fds)

    def _reply(self, serial: int) -> Message:
        """Wait for the reply to `serial`; signals that come first go to the handlers."""
        while True:
            msg = self._receive()
            if msg.message_type in (METHOD_RETURN, ERROR) and msg.reply_serial == serial:
                return msg
            self._settle(msg)
            for fd in msg.unix_fds:  # nobody asked for these
                os.close(fd)
            if msg.message_type == SIGNAL:
                for handler in self.handlers:
                    handler(msg)

    def call(self, member: str, signature: str = "", body: list | None = None, *, path: str = MANAGER_PATH,
             interface: str = MANAGER_IFACE, unix_fds: list[int] | None = None, destination: str = BUS_NAME,
             meanwhile=None) -> list:
        return self.call_fds(member, signature, body, path=path, interface=interface, unix_fds=unix_fds, destination=destination,
                             meanwhile=meanwhile)[0]

    def call_fds(self, member: str, signature: str = "", body: list | None = None, *, path: str = MANAGER_PATH,
                 interface: str = MANAGER_IFACE, unix_fds: list[int] | None = None,
                 destination: str = BUS_NAME, meanwhile=None) -> tuple[list, list[int]]:
        """call, and the descriptors the reply carries (the caller's to close). `meanwhile()`: work of the
        caller's done once the call is sent, while tupperd works on it."""
        serial = self._send(destination, path, interface, member, signature, body, unix_fds)
        if meanwhile is not None:
            meanwhile()
        reply = self._reply(serial)
        if reply.message_type == ERROR:
            for fd in reply.unix_fds:
                os.close(fd)
            raise _error(reply)
        return reply.body, reply.unix_fds

    def _settle(self, msg: Message) -> None:
        """The reply to a call sent without waiting: an error raises (as if the call had waited)."""
        if msg.message_type in (METHOD_RETURN, ERROR) and msg.reply_serial in self._unanswered:
            self._unanswered.discard(msg.reply_serial)
            if msg.message_type == ERROR:
                raise _error(msg)

    def subscribe(self, rule: str, handler) -> None:
        """Receive signals matching `rule` (a D-Bus match rule) while calls run. Not waited for: the bus
        handles messages in order, so the match holds before the next call is handled."""
        self._unanswered.add(self._send("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s", [rule]))
        self.handlers.append(handler)

    def wait_forever(self) -> None:
        """Hand signals to the handlers until the bus goes away."""
        try:
            while True:
                msg = self._receive()
                self._settle(msg)
                if msg.message_type == SIGNAL:
                    for handler in self.handlers:
                        handler(msg)
        except ConnectionError:
            return

    # ---- the verbs ----------------------------------------------------------------------------

    def run(self, spec_path: str, name: str | None, keep_failed: bool, wait: bool = True, cold: bool = False,
            meanwhile=None) -> dict:
        """Run answers at once with the job; Wait answers when it has ended (with the run's result, or
        its error). wait=False: only the job, as {name, job}. cold: RunWith's option (no warm pool).
        meanwhile: as call's, once Wait is sent (while the container starts)."""
        if cold:
            options = {"keep_failed": ("b", keep_failed), "cold": ("b", True)}
            container, job = self.call("RunWith", "ssa{sv}", [spec_path, name or "", options])
        else:
            container, job = self.call("Run", "ssb", [spec_path, name or "", keep_failed])
        return self.wait(job, meanwhile) if wait else {"container": container, "job": job}

    def wait(self, job: str, meanwhile=None) -> dict:
        return _plain("a{sv}", self.call("Wait", path=job, interface=JOB_IFACE, meanwhile=meanwhile)[0])

    def _job_verb(self, member: str, signature: str, body: list, wait: bool) -> str:
        job = self.call(member, signature, body)[0]
        return self.wait(job)["state"] if wait else job

    def list(self) -> builtins.list[dict]:
        return _json(self.call("ListJSON")[0])

    def status(self, name: str) -> dict:
        return _json(self.call("GetJSON", "s", [name])[0])

    def start(self, name: str, wait: bool = True) -> str:
        """The container's state once started (wait=False: the job's object path, at once)."""
        return self._job_verb("Start", "s", [name], wait)

    def stop(self, name: str, timeout: float | None, wait: bool = True) -> str:
        return self._job_verb("Stop", "sd", [name, -1.0 if timeout is None else float(timeout)], wait)

    def inspect(self, name: str) -> dict:
        return _json(self.call("InspectJSON", "s", [name])[0])

    def restart(self, name: str, timeout: float | None, wait: bool = True) -> str:
        return self._job_verb("Restart", "sd", [name, -1.0 if timeout is None else float(timeout)], wait)

    def kill(self, name: str, signal_number: int) -> str:
        return self.call("Kill", "si", [name, signal_number])[0]

    def remove(self, name: str, force: bool) -> None:
        self.call("Remove", "sb", [name, force])

    def shutdown_all(self) -> builtins.list[str]:
        return self.call("Shutdown", "b", [True])[0]

    def rotate_secret(self, secret: str) -> builtins.list[str]:
        return self.call("RotateSecret", "s", [secret])[0]

    def secret_holders(self) -> builtins.list[builtins.list[str]]:
        return self.call("SecretHolders")[0]

    def upgrade(self, name: str, component: str, version: str) -> dict:
        return _json(self.call("Upgrade", "sss", [name, component, version])[0])

    def stats(self, names: builtins.list[str]) -> builtins.list[dict]:
        return _json(self.call("Stats", "as", [names])[0])

    def update(self, name: str, component: str | None, changes: dict[str, str]) -> dict:
        limits, notes, applied = self.call("Update", "ssa{ss}", [name, component or "", changes])[0]
        return {"resources": limits, "notes": notes, "applied": applied}

    def network_create(self, name: str, subnet: str | None, ipv6: str | None) -> dict:
        return _network(self.call("CreateNetwork", "sss", [name, subnet or "", ipv6 or ""])[0])

    def network_list(self) -> builtins.list[dict]:
        return [_network(n) for n in self.call("ListNetworks")[0]]

    def network_remove(self, name: str) -> None:
        self.call("RemoveNetwork", "s", [name])

    def pool_set(self, image: str, size: int) -> dict:
        return _plain("a{sv}", self.call("SetPool", "su", [image, size])[0])

    def pool_list(self) -> builtins.list[dict]:
        return _plain("aa{sv}", self.call("ListPools")[0])

    def pool_remove(self, image: str) -> builtins.list[str]:
        return list(self.call("RemovePool", "s", [image])[0])

    def open_shell(self, name: str, *, user: str | None, argv: builtins.list[str] | None, env: dict[str, str] | None,
                   workdir: str | None, term: str, rows: int, cols: int) -> tuple[int, str]:
        """(the terminal's master, the session's id)."""
        body, fds = self.call_fds("OpenShell", "ssasa{ss}ssqq", [name, user or "", argv or [], env or {}, workdir or "", term, rows, cols])
        master = fds.pop(body[0])
        for fd in fds:
            os.close(fd)
        return master, body[1]

    def shell_exit(self, session: str) -> int:
        return self.call("ShellExit", "s", [session])[0]

    def exec(self, name: str, argv: builtins.list[str], fds: tuple[int, int, int] = (0, 1, 2), *, env: dict[str, str] | None = None,
             user: str | None = None, workdir: str | None = None) -> int:
        if env or user or workdir:
            return self.call("ExecWith", "sasa{ss}sshhh", [name, argv, env or {}, user or "", workdir or "", 0, 1, 2], unix_fds=list(fds))[0]
        return self.call("Exec", "sashhh", [name, argv, 0, 1, 2], unix_fds=list(fds))[0]


def _network(fields: list) -> dict:
    """A network as the D-Bus API gives it, (sssssa{ss}as), as `network ls --json` shows it."""
    name, subnet, subnet6, bridge, gateway, running, containers = fields
    return {"name": name, "subnet": subnet, "subnet6": subnet6 or None, "bridge": bridge, "gateway": gateway,
            "running": dict(running), "containers": list(containers)}


def _json(text: str):
    import json

    return json.loads(text)


def _error(reply: Message) -> errors.TupperError:
    text: str = reply.body[0] if reply.body and isinstance(reply.body[0], str) else (reply.error_name or "an error without a name")
    return error_from(reply.error_name, text)


# ---- addresses ----------------------------------------------------------------------------------


def _connect(address: str) -> _socket.socket:
    """Connect to the first usable address of a D-Bus address list (unix:path= or unix:abstract=)."""
    last: Exception = ValueError(f"no unix socket in the address {address!r}")
    for entry in address.split(";"):
        transport, _, params = entry.partition(":")
        if transport != "unix":
            continue
        keys = dict(p.split("=", 1) for p in params.split(",") if "=" in p)
        if "path" in keys:
            target = _unescape(keys["path"])
        elif "abstract" in keys:
            target = "\0" + _unescape(keys["abstract"])
        else:
            continue
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            sock.connect(target)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last


def _unescape(value: str) -> str:
    if "%" not in value:
        return value
    from urllib.parse import unquote

    return unquote(value)


def _plain(signature: str, value):
    """A received value without its variants: a{sv} becomes a dict of plain values, and so on down."""
    if signature == "v":
        return _plain(value[0], value[1])
    if signature.startswith("a{"):
        inner = _split(signature[2:-1])[1]
        return {k: _plain(inner, v) for k, v in value.items()}
    if signature.startswith("a"):
        return [_plain(signature[1:], v) for v in value]
    return value


# ---- marshalling (sent little-endian, received in either order; every type but unix fds' payloads) ----

_FIXED = {"y": ("B", 1), "b": ("I", 4), "n": ("h", 2), "q": ("H", 2), "i": ("i", 4), "u": ("I", 4), "h": ("I", 4),
          "x": ("q", 8), "t": ("Q", 8), "d": ("d", 8)}
_ALIGN = {"s": 4, "o": 4, "g": 1, "a": 4, "(": 8, "{": 8, "v": 1, **{k: size for k, (_, size) in _FIXED.items()}}


def _split(signature: str) -> list[str]:
    """A signature as its list of complete types."""
    out, i = [], 0
    while i < len(signature):
        j = _end(signature, i)
        out.append(signature[i:j])
        i = j
    return out


def _end(sig: str, i: int) -> int:
    c = sig[i]
    if c == "a":
        return _end(sig, i + 1)
    if c in "({":
        depth, j = 0, i
        while True:
            if sig[j] in "({":
                depth += 1
            elif sig[j] in ")}":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
    return i + 1


def _pad(buf: bytearray, align: int) -> None:
    buf += bytes(-len(buf) % align)


def _marshal(buf: bytearray, signature: str, values: list) -> None:
    for t, v in zip(_split(signature), values, strict=True):
        _put(buf, t, v)


def _put(buf: bytearray, t: str, v) -> None:
    c = t[0]
    if c in _FIXED:
        fmt, size = _FIXED[c]
        _pad(buf, size)
        buf += struct.pack("<" + fmt, int(bool(v)) if c == "b" else v)
    elif c in "so":
        data = v.encode()
        _pad(buf, 4)
        buf += struct.pack("<I", len(data)) + data + b"\0"
    elif c == "g":
        data = v.encode()
        buf += bytes([len(data)]) + data + b"\0"
    elif c == "v":
        sig, value = v
        _put(buf, "g", sig)
        _put(buf, sig, value)
    elif c == "a":
        inner = t[1:]
        _pad(buf, 4)
        at = len(buf)
        buf += bytes(4)
        _pad(buf, _ALIGN[inner[0]])
        start = len(buf)
        items = v.items() if inner[0] == "{" else v
        for item in items:
            _put(buf, inner, item)
        struct.pack_into("<I", buf, at, len(buf) - start)
    elif c in "({":
        _pad(buf, 8)
        for st, sv in zip(_split(t[1:-1]), v, strict=True):
            _put(buf, st, sv)
    else:
        raise ValueError(f"cannot marshal D-Bus type {t!r}")


def _unmarshal(data: bytes, pos: int, signature: str, e: str = "<") -> tuple[list, int]:
    out = []
    for t in _split(signature):
        value, pos = _get(data, pos, t, e)
        out.append(value)
    return out, pos


def _get(data: bytes, pos: int, t: str, e: str):
    c = t[0]
    if c in _FIXED:
        fmt, size = _FIXED[c]
        pos += -pos % size
        (value,) = struct.unpack_from(e + fmt, data, pos)
        return (bool(value) if c == "b" else value), pos + size
    if c in "so":
        pos += -pos % 4
        (n,) = struct.unpack_from(e + "I", data, pos)
        return data[pos + 4 : pos + 4 + n].decode(), pos + 5 + n
    if c == "g":
        n = data[pos]
        return data[pos + 1 : pos + 1 + n].decode(), pos + 2 + n
    if c == "v":  # (signature, value), as dbus-next's Variant(signature, value)
        sig, pos = _get(data, pos, "g", e)
        value, pos = _get(data, pos, sig, e)
        return (sig, value), pos
    if c == "a":
        inner = t[1:]
        pos += -pos % 4
        (n,) = struct.unpack_from(e + "I", data, pos)
        pos += 4
        pos += -pos % _ALIGN[inner[0]]
        end = pos + n
        items = []
        while pos < end:
            item, pos = _get(data, pos, inner, e)
            items.append(item)
        return (dict(items) if inner[0] == "{" else items), pos
    if c in "({":
        pos += -pos % 8
        values, pos = _unmarshal(data, pos, t[1:-1], e)
        return (tuple(values) if c == "{" else values), pos
    raise ValueError(f"cannot unmarshal D-Bus type {t!r}")
