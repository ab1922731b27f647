"""Control-plane messages: one msgspec tagged union, versioned, decoded strictly.

Every message is a :class:`Msg` subclass with a ``tag``; the wire form is msgpack with a
``t`` tag field and a ``v`` protocol version. Bulk data (NIXL agent metadata) never goes
inside a message: it travels as separate payload frames next to the header frame (see
``control.py`` for framing and signing).

The handoff (DESIGN.md):

    sender (prefiller)                       receiver (decoder)
    Hello{compat}            + [metadata] ->
                                          <- HelloAck{slots} + [metadata]   (or Error)
    Offer{req_id, keys, nbytes, checksums} ->
                                          <- Accept{have, slots, lease}     (or Busy/Error)
    ... NIXL WRITEs of the missing chunks into the granted slots, in groups; each
        group's notification ``lmcpd:<lease>:<first>:<count>`` lets the receiver
        verify those chunks while later groups are still in flight ...
    Done{req_id, lease}                  ->
                                          <- Committed{stored, bad}         (or Error)
    Cancel{req_id, lease, reason}        ->  (slots freed at once)

and, prefiller -> proxy over a PUSH socket: ``HandoffDone``.
"""

from __future__ import annotations

import enum

import msgspec

from lmcache_pd.layout import KVLayout

PROTOCOL_VERSION = 1
NO_CHECKSUM = 0  # "not hashed" (VRAM, or verification off); real digests map 0 -> 1


class ErrorCode(str, enum.Enum):
    MALFORMED = "malformed"
    OVERSIZE = "oversize"
    VERSION = "version"
    INCOMPATIBLE = "incompatible"
    UNKNOWN_PEER = "unknown_peer"
    UNKNOWN_LEASE = "unknown_lease"
    BAD_REQUEST = "bad_request"
    CHECKSUM = "checksum"
    TRANSFER = "transfer"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class Msg(msgspec.Struct, tag_field="t", forbid_unknown_fields=True, kw_only=True):
    """Base of every control message."""

    v: int = PROTOCOL_VERSION


class Compat(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What must match between sender and receiver; a mismatch is refused by name."""

    model: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: str
    attention: str
    chunk_size: int
    tp_size: int = 1
    hash_algorithm: str = "xxh3_128"

    @classmethod
    def of(cls, layout: KVLayout, chunk_size: int, hash_algorithm: str, tp_size: int = 1) -> Compat:
        """The compat record of a layout + chunking as configured."""
        return cls(
            model=layout.model,
            num_layers=layout.num_layers,
            num_kv_heads=layout.num_kv_heads,
            head_size=layout.head_size,
            dtype=layout.dtype,
            attention=layout.attention.value,
            chunk_size=chunk_size,
            tp_size=tp_size,
            hash_algorithm=str(getattr(hash_algorithm, "value", hash_algorithm)),
        )

    def diff(self, other: Compat) -> list[str]:
        """Names of fields that differ, with both values."""
        out = []
        for name in self.__struct_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name} (receiver {mine!r}, sender {theirs!r})")
        return out


class Hello(Msg, tag="hello"):
    """Sender introduces itself. Payload frame 0: the sender's transport metadata."""

    agent: str
    compat: Compat
    tp_rank: int = 0


class HelloAck(Msg, tag="hello_ack"):
    """Receiver accepts the sender. Payload frame 0: the receiver's transport metadata;
    ``slot_descs`` are ``(addr, nbytes, device_id)`` of every receive slot."""

    agent: str
    num_slots: int
    slot_bytes: int
    slot_descs: list[tuple[int, int, int]]
    mem_kind: str = "DRAM"


class Offer(Msg, tag="offer"):
    """Sender offers the chunks of a request, in prefix order. ``nbytes[i]`` is the
    used length of chunk ``i`` (a partial last chunk is shorter than a slot) and
    ``checksums[i]`` its xxh3-64, taken when the chunk was gathered (``NO_CHECKSUM``
    where the sender does not hash: the receiver then cannot verify that chunk)."""

    req_id: str
    keys: list[bytes]
    nbytes: list[int]
    checksums: list[int]


class Accept(Msg, tag="accept"):
    """``have``: indices into the offer the receiver already holds (not resent).
    ``want``: indices to send, and ``slots[j]`` the receive slot for ``want[j]``.
    The slots are leased until ``lease_ttl_s`` passes without a ``Done``."""

    req_id: str
    have: list[int]
    want: list[int]
    slots: list[int]
    lease: int
    lease_ttl_s: float


class Busy(Msg, tag="busy"):
    """No free slots now; retry after ``retry_after_s`` (bounded retries)."""

    req_id: str
    retry_after_s: float


class Done(Msg, tag="done"):
    """Every WRITE of the lease was posted and completed at the sender; the receiver
    commits once all their notifications arrived."""

    req_id: str
    lease: int


class Committed(Msg, tag="committed"):
    """Receiver verified the chunks: ``stored`` are offer indices now held, ``bad`` the
    ones rejected (checksum mismatch); bad chunks are never handed on."""

    req_id: str
    stored: list[int]
    bad: list[int]


class Cancel(Msg, tag="cancel"):
    """Sender gives up on a lease; its slots are freed at once."""

    req_id: str
    lease: int
    reason: str = ""


class Error(Msg, tag="error", kw_only=True):
    req_id: str | None = None
    code: ErrorCode
    message: str


class HandoffDone(Msg, tag="handoff_done"):
    """Prefiller -> proxy: the KV of ``req_id`` is (or failed to be) in place at the
    decoder. ``chunks`` moved, ``dedup`` skipped because the decoder had them."""

    req_id: str
    ok: bool
    chunks: int = 0
    dedup: int = 0
    error: str = ""


Message = Hello | HelloAck | Offer | Accept | Busy | Done | Committed | Cancel | Error | HandoffDone

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class ProtocolError(Exception):
    """A frame that could not be decoded into a message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes | memoryview) -> Message:
    """Decode one header frame strictly; raises :class:`ProtocolError`."""
    try:
        msg = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise ProtocolError(ErrorCode.MALFORMED, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"not msgpack: {exc}") from None
    if msg.v != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.VERSION, f"protocol version {msg.v} unsupported (want {PROTOCOL_VERSION})"
        )
    return msg
