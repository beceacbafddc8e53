"""replayer.link.RecorderLink against the guest's side of the channel (recorder.channel.AgentSide,
the agent's own protocol core) over a real socket pair: what arrives together with the answer a
caller waits for is kept for the next call, never dropped."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from recorder.channel import AgentSide, Attached, CheckRequested, Expected, LogFrame
from recorder.logformat import Key, LogEncoder, LogHeader
from replayer.link import RecorderLink

pytestmark = pytest.mark.timeout(30)
HEADER = LogHeader(1280, 800, "us", "test", 0, "test")


class _Guest(threading.Thread):
    """The agent's end: answers the attach, and sends one log frame in the same write as every
    check answer and every echo (as the real agent does when both are ready at once)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.agent = AgentSide(agent_version="test", width=1280, height=800, keymap="us")
        self.enc = LogEncoder(HEADER)
        self.agent.add_frame(0, self.enc.start().data)
        self.seq = 0

    def _frame(self) -> None:
        self.seq += 1
        [frame] = self.enc.add(Key(self.seq * 1000, 38, True)) + self.enc.flush()
        self.agent.add_frame(frame.seq, frame.data)

    def run(self) -> None:
        while data := self.sock.recv(65536):
            for ev in self.agent.receive_data(data):
                if isinstance(ev, CheckRequested):
                    self.agent.checked(ev.req_id, b"D" * 8)
                    self._frame()
                elif isinstance(ev, Expected):
                    self.agent.captured(Key(0, 38, True))
                    self._frame()
                elif isinstance(ev, Attached):
                    pass
            while out := self.agent.data_to_send():
                self.sock.sendall(out)


class _Machine:
    name = "fake"

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def open_recorder(self, timeout: float = 10.0) -> socket.socket:
        return self.sock


@pytest.fixture
def link() -> Iterator[RecorderLink]:
    host, guest = socket.socketpair()
    g = _Guest(guest)
    g.start()
    rl = RecorderLink(_Machine(host))  # type: ignore[arg-type]  # only open_recorder and name are used
    rl.open()
    yield rl
    rl.close()
    guest.close()
    g.join(5)


def _frames_until(link: RecorderLink, seq: int) -> list[int]:
    got: list[int] = []
    while not got or got[-1] < seq:
        events = link.poll(5)
        assert events, f"frame {seq} never came (got {got})"
        got += [e.seq for e in events if isinstance(e, LogFrame)]
    return got


def test_a_frame_that_came_with_a_check_answer_is_not_lost(link: RecorderLink) -> None:
    assert _frames_until(link, 0) == [0]
    assert link.check(0, 0, 8, 8, 5) == b"D" * 8
    assert _frames_until(link, 1) == [1]          # it came in the same read as the answer


def test_a_frame_that_came_with_an_echo_is_not_lost(link: RecorderLink) -> None:
    assert _frames_until(link, 0) == [0]
    key = Key(0, 38, True)
    link.expect(1, key)
    assert link.wait_echo(1, 5)
    assert _frames_until(link, 1) == [1]
