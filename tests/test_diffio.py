"""migration.diffio: the asyncio adapter keeps the event loop free while the target patches,
rehashes and commits, and a cancellation waits for the work under way, then aborts.

The responsiveness test is measured the way a migration feels it: a real websocket connection on
loopback whose peer (a server in a thread of its own) pings it, while the loop's target patches
and verifies a 512 MiB image through real file sinks. The same transfer with the work run on the
loop (what ``_pump_diff`` did before the adapter) misses the deadline: that control shows the
workload is large enough for the test to fail."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import numpy as np
import pytest
from diffpair import KEY, PAGE, rand
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from differ.blocks import RawImageSource
from differ.memsource import MemoryImage, MemorySink, MemorySource
from differ.merkle import MerkleTree
from differ.patch import RawImageSink
from differ.protocol import FailCode, TargetState, Verified
from differ.transfer import (
    SourceImage,
    TargetImage,
    blocking_source,
    make_target,
)
from migration.cancel import in_thread
from migration.diffio import AsyncAdapter

T = TypeVar("T")
IMAGE_BYTES = 512 << 20
"""Large enough that rehashing the patched image on the loop takes several times the deadline."""
DEADLINE_S = 0.1
PING_EVERY_S = 0.01


class Pinger:
    """A websocket server in a thread of its own: pings its client every ``PING_EVERY_S`` while
    ``measuring`` is set and keeps the longest time a pong took."""

    def __init__(self) -> None:
        self.measuring = threading.Event()
        self.stopped = threading.Event()
        """Set once measuring was cleared and no ping is in flight any more."""
        self.done = threading.Event()
        self.ready = threading.Event()
        self.latencies: list[float] = []
        self.port = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _handler(self, ws: ServerConnection) -> None:
        while not self.done.is_set():
            if self.measuring.is_set():
                t0 = time.monotonic()
                await (await ws.ping())
                self.latencies.append(time.monotonic() - t0)
            elif self.latencies:
                self.stopped.set()
            await asyncio.sleep(PING_EVERY_S)  # the pace of the pings, not a synchronisation

    async def _main(self) -> None:
        async with serve(self._handler, "127.0.0.1", 0, ping_interval=None) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self.ready.set()
            await asyncio.to_thread(self.done.wait)

    def __enter__(self) -> Pinger:
        self._thread.start()
        self.ready.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self._thread.join()


async def on_loop(fn: Callable[..., T], /, *args: Any) -> T:
    """The work on the event loop itself: what the adapter is there to avoid."""
    return fn(*args)


@pytest.fixture(scope="module")
def large_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, MerkleTree]]:
    """A 512 MiB raw image of random bytes (every leaf present: a rehash reads and hashes it all)."""
    path = tmp_path_factory.mktemp("diffio") / "b.raw"
    rng = np.random.default_rng(1)
    with open(path, "wb") as f:
        for _ in range(IMAGE_BYTES >> 24):
            f.write(rng.integers(0, 256, size=1 << 24, dtype=np.uint8).tobytes())
    with RawImageSource(path) as src:
        tree = MerkleTree.build(src, 16, workers=1)
    yield path, tree
    path.unlink()


class ChangedPages(MemorySource):
    """Image A as a source: B's size, and the bytes of the changed pages (all the source reads)."""

    def __init__(self, pages: dict[int, bytes], size: int) -> None:
        self.pages = pages
        self._size = size
        super().__init__(b"", report_zeros=False)

    @property
    def size(self) -> int:
        return self._size

    @property
    def leaf_count(self) -> int:
        return -(-self._size // PAGE)

    def read(self, index: int, count: int = 1) -> bytes:
        return b"".join(self.pages[i] for i in range(index, index + count))


def patch_while_pinged(path: Path, tree: MerkleTree, run: Callable[..., Awaitable[Any]]) -> list[float]:
    """A few changed pages patched into ``path`` (a real file sink: copy, write, rehash, rename)
    by an adapter whose blocking work goes through ``run``; the ping latencies meanwhile."""
    changed = {3: rand(PAGE, 1), 70_000: rand(PAGE, 2), 131_000: rand(PAGE, 3)}
    with open(path, "rb") as f:
        before = {i: (f.seek(i * PAGE), f.read(PAGE))[1] for i in changed}
    digests = np.stack([np.frombuffer(MerkleTree.from_bytes(d).leaf(0), dtype=np.uint8) for d in changed.values()])
    a_tree = tree.replace_leaves(np.array(list(changed), dtype=np.int64), digests)

    source = blocking_source([SourceImage("disk", ChangedPages(changed, tree.size), a_tree)])
    with RawImageSource(path) as b_src:
        sink = RawImageSink(path, durable=False)
        core, io = make_target([TargetImage("disk", b_src, tree, sink)], key=KEY)
        target = AsyncAdapter(core, io, run=run)

        async def main() -> list[float]:
            with Pinger() as pinger:
                async with connect(f"ws://127.0.0.1:{pinger.port}", ping_interval=None):
                    pinger.measuring.set()
                    target.core.start()
                    events: list[object] = []
                    while target.core.state not in (TargetState.VERIFIED, TargetState.FAILED):
                        for m in target.data_to_send():
                            source.receive_data(m)
                        for m in source.data_to_send():
                            events += await target.receive_data(m)
                    pinger.measuring.clear()
                    await asyncio.to_thread(pinger.stopped.wait)  # the last pong answered
                    assert Verified() in events
            return pinger.latencies

        try:
            latencies = asyncio.run(main())
        finally:
            sink.abort()  # a no-op once committed
    with open(path, "rb") as f:
        assert all((f.seek(i * PAGE), f.read(PAGE))[1] == d for i, d in changed.items())
    with open(path, "r+b") as g:  # back as it was, for the next test
        for i, d in before.items():
            g.seek(i * PAGE)
            g.write(d)
    return latencies


def test_the_loop_answers_pings_while_the_target_patches_a_large_image(large_image: tuple[Path, MerkleTree]) -> None:
    latencies = patch_while_pinged(*large_image, run=in_thread)
    assert len(latencies) >= 5, "the transfer was too short to measure anything"
    assert max(latencies) < DEADLINE_S, f"a pong took {max(latencies) * 1000:.0f} ms"


def test_the_same_work_on_the_loop_misses_the_deadline(large_image: tuple[Path, MerkleTree]) -> None:
    """The control: the adapter bypassed (its requests run on the loop), the pings wait."""
    latencies = patch_while_pinged(*large_image, run=on_loop)
    assert max(latencies) > DEADLINE_S, f"the longest pong took {max(latencies) * 1000:.0f} ms: the workload " \
        "is too small to show anything"


# -- cancellation ----------------------------------------------------------------------------------


class GatedSink(MemorySink):
    """A sink whose writes wait for ``gate`` (in the worker thread) and that logs what it does."""

    def __init__(self, image: MemoryImage, entered: threading.Event, gate: threading.Event) -> None:
        super().__init__(image)
        self.entered, self.gate = entered, gate
        self.log: list[str] = []

    def write(self, index: int, data: bytes) -> None:
        self.entered.set()
        self.gate.wait()
        super().write(index, data)
        self.log.append("write")

    def abort(self) -> None:
        self.log.append("abort")
        super().abort()


def test_a_cancelled_transfer_waits_for_the_write_then_aborts_the_copies() -> None:
    b = rand(16 * PAGE)
    a = bytearray(b)
    a[5 * PAGE : 6 * PAGE] = rand(PAGE, 9)
    image = MemoryImage(b)
    entered, gate = threading.Event(), threading.Event()
    sink = GatedSink(image, entered, gate)
    source = blocking_source([SourceImage("disk", MemorySource(bytes(a)), MerkleTree.from_bytes(bytes(a)))])
    target = AsyncAdapter(*make_target([TargetImage("disk", image.source(), MerkleTree.from_bytes(b), sink)],
                                       key=KEY))

    async def transfer() -> None:
        target.core.start()
        while True:
            for m in target.data_to_send():
                source.receive_data(m)
            for m in source.data_to_send():
                await target.receive_data(m)

    async def main() -> None:
        task = asyncio.create_task(transfer())
        await asyncio.to_thread(entered.wait)   # the write is under way in a worker thread
        task.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert sink.log == ["write", "abort"] and sink.aborted and not sink.committed and image.data == b
    assert target.core.state is TargetState.FAILED and target.core.next_request() is None
    (failed,) = target.data_to_send()  # for the peer
    assert msgpack.unpackb(failed) == {"t": "failed", "v": 2, "c": FailCode.ABORTED}
