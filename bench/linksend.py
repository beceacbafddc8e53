"""Time how long a link takes to carry N bytes: a tiny TCP sender and receiver.

The transfer baselines (plain state transfer, full image, rsync, Merkle diff without replay) are
measured as byte counts on one host; their time on a shaped link is the time these real bytes take
over it. The receiver answers one byte once it has them all, so a transfer's time runs from the
sender's connect to that answer: handshake, slow start, serialisation and the last RTT included.

    python -m bench.linksend recv --listen 10.231.0.2:7701          # prints "ready", serves until killed
    python -m bench.linksend send --to 10.231.0.2:7701 --bytes 1000000 5000000   # prints JSON
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

HEADER = struct.Struct(">Q")
CHUNK = 1 << 20
"""Bytes per send/recv call."""
MAX_TRANSFER_BYTES = 16 << 30
"""Largest transfer a receiver accepts (a bound on a malformed header)."""
CONNECT_TIMEOUT_S = 10.0
IO_TIMEOUT_S = 900.0
"""Longest a transfer may stall (10 Mbit/s carries ~1 GiB in this time)."""
ACK = b"\x01"


@dataclass(frozen=True)
class Timed:
    bytes: int
    seconds: float


def parse_addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad address {value!r}: expected HOST:PORT")
    return host, int(port)


def _recv_exact(conn: socket.socket, n: int) -> int:
    """Read and drop ``n`` bytes; returns how many arrived before the peer closed."""
    got = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while got < n:
        k = conn.recv_into(view, min(CHUNK, n - got))
        if k == 0:
            break
        got += k
    return got


def serve_one(conn: socket.socket) -> int:
    """One transfer: header, payload, ack. Returns the payload size."""
    conn.settimeout(IO_TIMEOUT_S)
    head = bytearray()
    while len(head) < HEADER.size:
        piece = conn.recv(HEADER.size - len(head))
        if not piece:
            raise ConnectionError("peer closed before the header")
        head += piece
    (n,) = HEADER.unpack(bytes(head))
    if n > MAX_TRANSFER_BYTES:
        raise ValueError(f"transfer of {n} bytes refused (limit {MAX_TRANSFER_BYTES})")
    if _recv_exact(conn, n) != n:
        raise ConnectionError("peer closed mid-transfer")
    conn.sendall(ACK)
    return int(n)


def serve(listener: socket.socket, *, count: int | None = None) -> None:
    """Serve transfers one after another (``count`` of them, or until killed)."""
    done = 0
    while count is None or done < count:
        conn, _ = listener.accept()
        with conn:
            try:
                serve_one(conn)
            except (OSError, ValueError) as e:
                print(f"linksend: {e}", file=sys.stderr, flush=True)
        done += 1


def send(host: str, port: int, nbytes: int, *, payload: bytes | None = None) -> Timed:
    """Send ``nbytes`` (incompressible: zstd output is) and wait for the ack; time it all."""
    data = memoryview(payload if payload is not None else os.urandom(CHUNK))
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as s:
        s.settimeout(IO_TIMEOUT_S)
        s.sendall(HEADER.pack(nbytes))
        left = nbytes
        while left > 0:
            k = min(left, len(data))
            s.sendall(data[:k])
            left -= k
        if s.recv(1) != ACK:
            raise ConnectionError("no ack from the receiver")
    return Timed(nbytes, time.monotonic() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.linksend", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--listen", required=True, metavar="HOST:PORT")
    s = sub.add_parser("send")
    s.add_argument("--to", required=True, metavar="HOST:PORT")
    s.add_argument("--bytes", type=int, nargs="+", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "recv":
        host, port = parse_addr(args.listen)
        with socket.create_server((host, port)) as listener:
            print("ready", flush=True)
            serve(listener)
        return 0
    host, port = parse_addr(args.to)
    payload = os.urandom(CHUNK)
    print(json.dumps([asdict(send(host, port, n, payload=payload)) for n in args.bytes]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
