"""The access log gathers lines and writes them together, whatever the stream's buffering."""

from __future__ import annotations

import io

from twisted.internet.task import Clock

from rpxy.logs import AccessLog
from rpxy.message import ConnectionInfo, RequestHead

CONN = ConnectionInfo(peer_ip="192.0.2.7", peer_port=40000, local_port=443, tls=True)


class CountingStream(io.StringIO):
    """An unbuffered stream (stdout under PYTHONUNBUFFERED): each write is a system call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def record(log: AccessLog, path: bytes = b"/x") -> None:
    head = RequestHead(b"GET", path, b"3", [(b"user-agent", b"t")], b"a.test")
    log.record(CONN, head, "a.test", 200, upstream="http://127.0.0.1:8080")


def test_lines_are_written_together_once_a_second():
    clock, stream = Clock(), CountingStream()
    log = AccessLog(stream, clock)
    for i in range(50):
        record(log, f"/r{i}".encode())
    assert stream.writes == 0 and stream.getvalue() == ""
    clock.advance(1.0)
    lines = stream.getvalue().splitlines()
    assert stream.writes == 1 and len(lines) == 50
    assert lines[0].endswith('https://a.test/r0 "t", "" "http://127.0.0.1:8080"')
    assert " <- 192.0.2.7:40000 -- GET /r49 HTTP/3 -- 200 OK -- " in lines[49]


def test_a_full_buffer_is_written_without_waiting_and_close_writes_the_rest():
    clock, stream = Clock(), CountingStream()
    log = AccessLog(stream, clock)
    long_path = b"/" + b"p" * 1000  # twice in a line (path and URL)
    for _ in range(40):  # 40 lines of ~2.1 KB: past 64 KiB once
        record(log, long_path)
    assert stream.writes == 1
    written = len(stream.getvalue().splitlines())
    assert 30 <= written < 40
    log.close()  # shutdown: nothing is lost
    assert len(stream.getvalue().splitlines()) == 40
    assert not clock.getDelayedCalls()


def test_without_a_reactor_each_line_is_written_at_once():
    stream = CountingStream()
    log = AccessLog(stream)
    record(log)
    assert stream.writes == 1 and stream.getvalue().count("\n") == 1
