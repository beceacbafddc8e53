"""bench/linksend.py: the timed TCP transfer, for real on loopback."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.linksend import ACK, HEADER, MAX_TRANSFER_BYTES, parse_addr, send, serve, serve_one


def test_parse_addr() -> None:
    assert parse_addr("10.231.0.2:7701") == ("10.231.0.2", 7701)
    for bad in ("10.231.0.2", ":7701", "host:0", "host:70000", "host:x"):
        with pytest.raises(ValueError):
            parse_addr(bad)


def test_transfers_arrive_whole_and_are_timed() -> None:
    sizes = [0, 1, 3 << 20]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        t = threading.Thread(target=serve, args=(listener,), kwargs={"count": len(sizes)}, daemon=True)
        t.start()
        results = [send("127.0.0.1", port, n) for n in sizes]
        t.join(10)
    assert [r.bytes for r in results] == sizes
    assert all(r.seconds > 0 for r in results)


def test_receiver_refuses_an_absurd_header() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(HEADER.pack(MAX_TRANSFER_BYTES + 1))
        with pytest.raises(ValueError):
            serve_one(b)


def test_receiver_acks_only_after_every_byte() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(HEADER.pack(5) + b"abc")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionError):
            serve_one(b)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(HEADER.pack(5) + b"abcde")
        assert serve_one(b) == 5
        assert a.recv(1) == ACK
