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


class KVTransferParams(msgspec.Struct, kw_only=True):
    """Prefill-step ``kv_transfer_params`` (proxy -> prefiller's vLLM connector, through
    the HTTP request body). One definition for the proxy that writes them and the
    connector that reads them (``request.kv_transfer_params``).

    Fields:
        do_remote_decode: always ``True`` on the prefill step: the KV computed here is
            pushed to a remote decoder instead of being decoded locally.
        req_id: proxy-minted id of this request (``pd-<hex>-<n>``), unique per proxy
            process. The prefiller's ``Offer`` to the decoder and its ``HandoffDone`` to
            the proxy carry it, so all three agree on one id whatever ids vLLM assigns.
        decoder_host: host of the chosen decoder's control endpoint (its ZMQ ROUTER).
        decoder_init_port: port of that endpoint (``pd_peer_init_port`` of the decoder,
            TP rank 0; the connector adds the rank as LMCache does for int ports).
        proxy_notify: ``tcp://host:port`` where the proxy's PULL socket waits for the
            prefiller's ``HandoffDone``; ``None`` when the proxy runs HTTP-only and does
            not listen (the prefiller then just skips the notification).
    """

    do_remote_decode: bool = True
    req_id: str
    decoder_host: str
    decoder_init_port: int
    proxy_notify: str | None = None

    def to_dict(self) -> dict[str, object]:
        return msgspec.to_builtins(self)

    @classmethod
    def from_request(cls, params: object) -> KVTransferParams | None:
        """Parse a request's ``kv_transfer_params`` (extra keys ignored); None when they
        do not ask for a remote decode. Raises ``ValueError`` naming a malformed field."""
        if not isinstance(params, dict) or not params.get("do_remote_decode"):
            return None
        try:
            return msgspec.convert(params, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"malformed kv_transfer_params: {exc}") from None


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
