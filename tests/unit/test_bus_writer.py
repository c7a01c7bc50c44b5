"""tupperd's bus writer waits when the socket is full (EAGAIN); dbus-next 0.2.3's own writer took that for
a lost connection, and tupperd exited under 50 runs at once (bench/scale.py found it)."""

from __future__ import annotations

import asyncio
import socket

from dbus_next import Message
from dbus_next.aio.message_bus import _MessageWriter

from tupper.daemon.api import _PatientWriter


class FakeBus:
    """What a _MessageWriter uses of its MessageBus."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self._negotiate_unix_fd = False
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = loop
        self.unique_name = ":1.1"
        self.lost: Exception | None = None

    def _finalize(self, exc: Exception) -> None:
        self.lost = exc


def signal(i: int) -> Message:
    return Message.new_signal("/org/tupper1", "org.tupper1.Manager", "Progress", "ss", [f"c{i}", "x" * 2000])


async def flood(writer_class: type, count: int = 200) -> tuple[FakeBus, list[asyncio.Future], bytes]:
    """`count` signals written to a socket nobody reads for a while, then read to the end."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    try:
        for s in (ours, theirs):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        bus = FakeBus(ours, loop)
        writer = writer_class(bus)
        sent = [loop.create_future() for _ in range(count)]
        for i, fut in enumerate(sent):
            writer.schedule_write(signal(i), fut)
        await asyncio.sleep(0.1)  # the socket fills up: nobody reads the other end yet
        assert not all(f.done() for f in sent), "the socket never filled up: this test shows nothing"
        received = bytearray()
        deadline = loop.time() + 10
        while bus.lost is None and not all(f.done() for f in sent) and loop.time() < deadline:
            try:
                received += theirs.recv(65536)
            except BlockingIOError:
                await asyncio.sleep(0.001)
        while True:
            try:
                chunk = theirs.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            received += chunk
        loop.remove_writer(bus._fd)
        return bus, sent, bytes(received)
    finally:
        ours.close()
        theirs.close()


def test_a_full_socket_is_waited_for_and_every_message_arrives_whole():
    bus, sent, received = asyncio.run(flood(_PatientWriter))
    assert bus.lost is None
    assert all(f.done() and f.exception() is None for f in sent)
    assert received == b"".join(signal(i)._marshall() for i in range(len(sent)))


def test_dbus_nexts_own_writer_takes_a_full_socket_for_a_lost_connection():
    """The bug _PatientWriter works around; if a dbus-next upgrade fixes it, this test says so."""
    bus, sent, _ = asyncio.run(flood(_MessageWriter))
    assert isinstance(bus.lost, BlockingIOError)
