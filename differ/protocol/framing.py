"""Wire messages in and out: msgpack encoding, fragments for messages above the size limit, and
decoding within byte and container limits, so that no message a peer sends can make this side
allocate more than what it expects of a message of that type in its state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from differ.protocol.messages import FRAGMENTABLE, TYPES, MsgType, binary, get, integer, mapping
from differ.protocol.params import FRAGMENT_OVERHEAD, PROTOCOL_VERSION, ProtocolParams
from differ.protocol.stats import TransferStats
from replay_migrate.errors import ProtocolError

Message = dict[str, Any]


class Framer:
    """Encodes messages into frames (counting them in ``stats``) and decodes frames back into
    messages, reassembling fragments. ``expected(type)`` is the largest message of that type the
    side can legitimately receive now: fragments are bounded by it before they are buffered."""

    def __init__(self, params: ProtocolParams, stats: TransferStats, expected: Callable[[MsgType], int]) -> None:
        self.params = params
        self.stats = stats
        self.expected = expected
        self._parts: list[bytes] = []
        self._type: str | None = None
        self._count = 0
        self._size = 0

    # sending

    def encode(self, mtype: MsgType, body: Message) -> list[bytes]:
        """The frames of one message: itself, or its fragments if it exceeds ``max_message_bytes``."""
        data = msgpack.packb({"t": str(mtype), "v": PROTOCOL_VERSION, **body}, use_bin_type=True)
        limit = self.params.max_message_bytes
        frames = [data]
        if len(data) > limit:
            if mtype not in FRAGMENTABLE:
                raise AssertionError(f"{mtype} message of {len(data)} bytes exceeds the limit")
            step = limit - FRAGMENT_OVERHEAD
            chunks = [data[i : i + step] for i in range(0, len(data), step)]
            frames = [
                msgpack.packb(
                    {"t": "frag", "v": PROTOCOL_VERSION, "lt": str(mtype), "i": i, "n": len(chunks), "d": c},
                    use_bin_type=True,
                )
                for i, c in enumerate(chunks)
            ]
        wire = self.stats.wire_bytes
        wire[str(mtype)] = wire.get(str(mtype), 0) + sum(len(f) for f in frames)
        self.stats.messages[str(mtype)] = self.stats.messages.get(str(mtype), 0) + 1
        return frames

    # receiving

    def unpack(self, data: bytes, limit: int) -> Message:
        """Decode one message within byte limits and a container count: a tree message has the
        most (its map, 4 lists, an entry and a part per image), and without the count a message of
        nested empty arrays decodes to ~60x its size in Python objects."""
        if len(data) > limit:
            raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {limit}")
        p = self.params
        budget = [2 * p.max_images + 8]  # the most containers any message has: a tree (see above)

        def count(container: Any) -> Any:
            budget[0] -= 1
            if budget[0] < 0:
                raise ValueError("more containers than any message has")
            return container

        try:
            obj = msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=True,
                use_list=True,
                max_str_len=max(p.max_name_len * 4, 64),
                max_bin_len=limit,
                max_array_len=p.max_images,
                max_map_len=16,
                max_ext_len=0,
                list_hook=count,
                object_hook=count,
            )
        except Exception:
            raise ProtocolError("malformed message (not decodable msgpack within the limits)") from None
        msg = mapping(obj, "message")
        if get(msg, "v") != PROTOCOL_VERSION:
            raise ProtocolError("unsupported protocol version")
        t = get(msg, "t")
        if not isinstance(t, str) or t not in TYPES:
            raise ProtocolError("unknown message type")
        return msg

    def decode(self, data: bytes) -> Message | None:
        """The next whole message, or None while a fragmented one is incomplete."""
        self.stats.received_bytes += len(data)
        msg = self.unpack(data, self.params.max_message_bytes)
        if msg["t"] != MsgType.FRAG:
            if self._type is not None:
                raise ProtocolError("message interleaved with a fragmented one")
            return msg
        lt = get(msg, "lt")
        if not isinstance(lt, str) or lt not in FRAGMENTABLE:
            raise ProtocolError("fragment of a message type that is never fragmented")
        step = self.params.max_message_bytes - FRAGMENT_OVERHEAD
        limit = min(self.params.max_logical_bytes, self.expected(MsgType(lt)))
        n = integer(msg, "n", 2, self.params.max_logical_bytes // step + 1)
        i = integer(msg, "i", 0, n - 1)
        chunk = binary(msg, "d", max_len=step)
        if i == 0 and self._type is None:
            if (n - 1) * step >= limit:  # n - 1 full chunks already exceed it
                raise ProtocolError(f"fragmented {lt} of {n} parts: this side expects at most {limit} bytes")
            self._type, self._count, self._parts, self._size = lt, n, [], 0
        elif self._type != lt or self._count != n or i != len(self._parts):
            raise ProtocolError("fragment out of sequence")
        self._parts.append(chunk)
        self._size += len(chunk)
        if self._size > limit:
            raise ProtocolError(f"fragmented {lt} exceeds the {limit} bytes this side expects")
        if i < n - 1:
            return None
        whole = b"".join(self._parts)
        self.reset()
        inner = self.unpack(whole, limit)
        if inner["t"] != lt:
            raise ProtocolError("fragmented message of another type than announced")
        return inner

    def reset(self) -> None:
        """Forget a fragmented message in progress (after it completed, or the side failed)."""
        self._type, self._parts, self._count, self._size = None, [], 0, 0
