"""A small blocking D-Bus client on a plain socket: tupper's CLI speaks to tupperd with it, and the
runtime asks a booting container's bus whether systemd is on it yet (tupper.container.systemd).

It speaks just what they need: unix-socket addresses, EXTERNAL authentication, unix fd passing, method
calls, and signals that arrive while a call runs. Its waits are socket reads, which release Python's
GIL (pystemd's sd-bus calls keep it). Errors named org.tupper1.Error.* come back as the matching
TupperError; others as a TupperError carrying the D-Bus error's name and text.
"""

from __future__ import annotations

import _socket  # the C module under `socket`, which costs a CLI call 2-3 ms more to import (enums, selectors)
import builtins
import os
import struct

from tupper.busnames import BUS_NAME, MANAGER_IFACE, MANAGER_PATH

METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
_FD_SPACE = _socket.CMSG_SPACE(16 * 4)  # room for the descriptors of one read (the bus sends at most a few)
BUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")  # the bus itself: destination, path, interface


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


class Connection:
    """One connection to a D-Bus bus at `address` (unix:path= or unix:abstract=), authenticated (EXTERNAL),
    Hello sent. `timeout`: seconds any one read or write may wait (None: no limit); TimeoutError after."""

    def __init__(self, address: str, timeout: float | None = None) -> None:
        self.serial = 0
        self.handlers: list = []
        self._buf = bytearray()
        self._fds: list[int] = []  # descriptors received and not yet claimed by a message
        self._unanswered: set[int] = set()  # calls sent without waiting (Hello, AddMatch): an error reply still raises
        self.sock = _connect(address)
        try:
            self.sock.settimeout(timeout)
            self._authenticate()
        except BaseException:
            self.sock.close()
            raise

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
            raise self._error(reply)
        return reply.body, reply.unix_fds

    def set_timeout(self, timeout: float | None) -> None:
        """Seconds any one read or write may wait from now on (None: no limit)."""
        self.sock.settimeout(timeout)

    def _error(self, reply: Message) -> Exception:
        """The exception an error reply raises: BusError here (the CLI's Client maps tupperd's names)."""
        return BusError(reply.error_name or "", _error_text(reply))

    def wait_message(self, timeout: float) -> bool:
        """Take the next message (a signal to the handlers), waiting at most `timeout` seconds for it,
        without the GIL (a socket read); False where none came."""
        if not self._complete():
            previous = self.sock.gettimeout()
            self.sock.settimeout(max(timeout, 0.0001))
            try:
                self._fill()
            except TimeoutError:
                return False
            finally:
                self.sock.settimeout(previous)
            if not self._complete():
                return True  # part of one came: the caller looks again (the rest follows at once)
        msg = self._receive()
        self._settle(msg)
        for fd in msg.unix_fds:
            os.close(fd)
        if msg.message_type == SIGNAL:
            for handler in self.handlers:
                handler(msg)
        return True

    def _complete(self) -> bool:
        """A whole message is in the buffer."""
        if len(self._buf) < 16:
            return False
        e = "<" if self._buf[0:1] == b"l" else ">"
        body_len, fields_len = struct.unpack_from(e + "I", self._buf, 4)[0], struct.unpack_from(e + "I", self._buf, 12)[0]
        return len(self._buf) >= 16 + fields_len + (-(16 + fields_len) % 8) + body_len

    def _settle(self, msg: Message) -> None:
        """The reply to a call sent without waiting: an error raises (as if the call had waited)."""
        if msg.message_type in (METHOD_RETURN, ERROR) and msg.reply_serial in self._unanswered:
            self._unanswered.discard(msg.reply_serial)
            if msg.message_type == ERROR:
                raise self._error(msg)

    def subscribe(self, rule: str, handler) -> None:
        """Receive signals matching `rule` (a D-Bus match rule) while calls run. Not waited for: the bus
        handles messages in order, so the match holds before the next call is handled."""
        self.add_match(rule)
        self.handlers.append(handler)

    def add_match(self, rule: str) -> None:
        """Have the bus route the signals matching `rule` here (to the handlers); not waited for, as subscribe."""
        self._unanswered.add(self._send(*BUS, "AddMatch", "s", [rule]))

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


class BusError(Exception):
    """An error reply: its D-Bus name and text."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{text} ({name})")
        self.name, self.text = name, text


def _error_text(reply: Message) -> str:
    return reply.body[0] if reply.body and isinstance(reply.body[0], str) else (reply.error_name or "an error without a name")


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


def plain(signature: str, value):
    """A received value without its variants: a{sv} becomes a dict of plain values, and so on down."""
    if signature == "v":
        return plain(value[0], value[1])
    if signature.startswith("a{"):
        inner = _split(signature[2:-1])[1]
        return {k: plain(inner, v) for k, v in value.items()}
    if signature.startswith("a"):
        return [plain(signature[1:], v) for v in value]
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
