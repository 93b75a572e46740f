"""``bkv_server.service``'s one-write transport (logic only, with an
in-memory recording transport; the real servers run it in every fleet test):
a response's head and body leave in one send, in order, and nothing written
before a close is lost."""

from __future__ import annotations

import asyncio

from bkv_server.service import _OneWrite, _one_write_protocol


class RecordingTransportFake:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 8100) if name == "sockname" else default


async def test_writes_in_one_tick_leave_as_one_send_in_order():
    fake = RecordingTransportFake()
    t = _OneWrite(fake, asyncio.get_running_loop())
    t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    t.write(b"{}")
    assert fake.sent == []  # not yet: the tick is not over
    await asyncio.sleep(0)
    assert fake.sent == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    t.write(b"next")
    await asyncio.sleep(0)
    assert fake.sent[1:] == [b"next"]


async def test_a_close_sends_what_was_written_first():
    fake = RecordingTransportFake()
    t = _OneWrite(fake, asyncio.get_running_loop())
    t.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    t.close()
    assert fake.sent == [b"HTTP/1.1 400 Bad Request\r\n\r\n"] and fake.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert len(fake.sent) == 1


async def test_nothing_is_written_to_a_transport_already_closing():
    fake = RecordingTransportFake()
    t = _OneWrite(fake, asyncio.get_running_loop())
    t.write(b"late")
    fake.closed = True  # the peer went away meanwhile
    await asyncio.sleep(0)
    assert fake.sent == []


def test_everything_else_is_the_transport_itself():
    fake = RecordingTransportFake()
    t = _OneWrite(fake, asyncio.new_event_loop())
    assert t.get_extra_info("sockname") == ("127.0.0.1", 8100)
    assert issubclass(_one_write_protocol(), asyncio.Protocol)
