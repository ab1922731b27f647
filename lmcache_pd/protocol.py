"""Control-plane messages: one msgspec tagged union, versioned, decoded strictly.

Every message is a :class:`Msg` subclass with a ``tag``; the wire form is msgpack with a
``t`` tag field and a ``v`` protocol version. Bulk data (NIXL agent metadata) never goes
inside a message: it travels as separate payload frames next to the header frame (see
``control.py`` for framing and signing).

The handoff (docs/architecture.md has the whole picture):

    sender (prefiller)                       receiver (decoder)
    Hello{compat}            + [metadata] ->
                                          <- HelloAck{slots} + [metadata]   (or Error)
    Offer{req_id, keys, nbytes, checksums} ->
                                          <- Accept{have, slots, lease}     (or Busy/Error)
    ... NIXL WRITEs of the missing chunks into the granted slots, in groups; each
        group's notification ``lmcpd:<lease>:<first>:<count>`` tells the receiver
        those chunks landed (their checksums are checked at first read) ...
    Done{req_id, lease, reply_by_notif}  ->
                                          <- Committed{stored, bad, grant}  (or Error)
    Cancel{req_id, lease, reason}        ->  (slots freed at once)

A Push/Done with ``reply_by_notif`` (the default, ``pd_reply_by_notif``) gets its lease's
final answer (``Committed``, or the ``Error`` of an expired lease) as a NIXL notification
to the sender's agent instead of a ZMQ reply: ``lmcpd-msg:`` + a :class:`LeaseReply`
signed like a ZMQ message (control.Codec.pack_notif). The sender polls its transport for
it while it progresses its WRITEs anyway, so the answer costs no ZMQ hop (each wakes an
I/O thread on both sides). Answers about the message itself (a bad Push, an unknown
lease) still come over ZMQ, where the sender looks too.

Credit path (one round trip): a ``Grant`` in ``HelloAck`` or ``Committed`` lends slots
ahead of time; the sender describes the whole request in one message and WRITEs into
them at once:

    Push{req_id, lease, keys, nbytes, checksums, skipped, reply_by_notif} ->
    ... NIXL WRITEs into grant.slots, groups notified ``lmcpd:<grant.lease>:...`` ...
                                          <- Committed{stored, bad, missing, grant, recent}

and, prefiller -> proxy over a PUSH socket: ``HandoffDone``.

Standard vLLM PD contract (no proxy of ours names the decoder up front): the prefiller
holds a request's chunks under a hold id and returns :class:`DecodeParams` from the
prefill; the decoder, handed them, starts the same handoff from its side:

    decoder worker rank r                    prefiller worker rank r (its pull endpoint)
    Fetch{req_id=hold, receiver}         ->
                                             ... the Offer/Accept/WRITE/Done flow above,
                                             prefiller -> the decoder's receiver ...
                                          <- HandoffDone{ok, chunks, dedup}  (or Error:
                                             unknown, expired or already fetched hold)
"""

from __future__ import annotations

import enum
from typing import Any, Literal

import msgspec

from lmcache_pd.layout import KVLayout

PROTOCOL_VERSION = 1
NO_CHECKSUM = 0  # "not hashed" (pd_verify_checksums: false); real digests map 0 -> 1
# a signed control message carried by a NIXL notification (LeaseReply): this prefix, the
# msgpack header, the 32-byte HMAC (control.Codec.pack_notif / unpack_notif)
SIGNED_NOTIF_PREFIX = b"lmcpd-msg:"
# the chunk checksum every digest in Offer/Push is taken with (lmcache_pd.checksum)
CHECKSUM_ALGORITHM = "kvsum64"


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
    """What must match between sender and receiver; a mismatch is refused by name.

    ``num_kv_heads`` is the model's total (TP-independent). ``tp_size`` is the sender's
    TP size: it need not match the receiver's (mixed TP moves head pieces, see
    :mod:`lmcache_pd.tp`), but it must split the heads, which the receiver checks."""

    model: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: str
    attention: str
    chunk_size: int
    tp_size: int = 1
    hash_algorithm: str = "xxh3_128"
    # peers from before this field hashed chunks with xxh3-64: absent means that one
    checksum_algorithm: str = "xxh3_64"

    @classmethod
    def of(cls, layout: KVLayout, chunk_size: int, hash_algorithm: str, tp_size: int = 1) -> Compat:
        """The compat record of a layout + chunking as configured."""
        return cls(
            model=layout.model,
            num_layers=layout.num_layers,
            num_kv_heads=layout.model_kv_heads,
            head_size=layout.head_size,
            dtype=layout.dtype,
            attention=layout.attention.value,
            chunk_size=chunk_size,
            tp_size=tp_size,
            hash_algorithm=str(getattr(hash_algorithm, "value", hash_algorithm)),
            checksum_algorithm=CHECKSUM_ALGORITHM,
        )

    def diff(self, other: Compat) -> list[str]:
        """Names of fields that differ, with both values (TP sizes may differ)."""
        out = []
        for name in self.__struct_fields__:
            if name == "tp_size":
                continue
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name} (receiver {mine!r}, sender {theirs!r})")
        return out


class Grant(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Receive slots lent to one sender ahead of its next request (credits).

    The sender writes a request's chunks into ``slots`` at once, notifying each WRITE
    group as ``lmcpd:<lease>:<first>:<count>`` (positions in ``slots``), and describes
    them afterwards in one :class:`Push`: one control round trip per request instead of
    Offer/Accept + Done/Committed. The receiver frees an unused grant ``ttl_s`` after it
    issued it; a sender uses a grant only within half of that by its own clock, and
    only once (each reply to a ``Push`` or ``Done`` may carry the next grant).
    """

    lease: int
    slots: list[int]
    ttl_s: float


class Hello(Msg, tag="hello"):
    """Sender introduces itself. Payload frame 0: the sender's transport metadata.
    ``want_grant``: slots the sender would like lent for its first request (0: none)."""

    agent: str
    compat: Compat
    tp_rank: int = 0
    want_grant: int = 0


class HelloAck(Msg, tag="hello_ack"):
    """Receiver accepts the sender. Payload frame 0: the receiver's transport metadata;
    ``slot_descs`` are ``(addr, nbytes, device_id)`` of every receive slot."""

    agent: str
    num_slots: int
    slot_bytes: int
    slot_descs: list[tuple[int, int, int]]
    # transports.base.MemKind's values (the router imports this module, never transports)
    mem_kind: Literal["DRAM", "VRAM"] = "DRAM"
    grant: Grant | None = None
    # the receiver engine's TP shape: its rank, size and every rank's control port
    # (a sender at another TP size pushes head pieces to each rank it overlaps)
    tp_rank: int = 0
    tp_size: int = 1
    rank_ports: list[int] = msgspec.field(default_factory=list)


class Offer(Msg, tag="offer"):
    """Sender offers the chunks of a request, in prefix order. ``nbytes[i]`` is the
    used length of chunk ``i`` (a partial last chunk is shorter than a slot) and
    ``checksums[i]`` its ``kvsum64`` digest, taken in the gather that filled the slot
    (``NO_CHECKSUM`` where the sender does not hash: ``pd_verify_checksums: false``).
    The receiver keeps it with the chunk and checks it in the first pass that reads
    the chunk (the copy into a tier, the scatter into paged KV), not on landing."""

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
    commits once all their notifications arrived. ``reply_by_notif``: as in
    :class:`Push`."""

    req_id: str
    lease: int
    reply_by_notif: bool = False


class Push(Msg, tag="push"):
    """Sender -> receiver, the whole request on the credit path, sent right before the
    WRITEs into a :class:`Grant` are posted (it wakes the receiver, whose progress
    those WRITEs may need): chunk ``keys[i]`` (``nbytes[i]`` used
    bytes, checksum ``checksums[i]``) went to ``grant.slots[i]`` of ``lease``.
    ``skipped``: keys of the request the sender believes the receiver holds (not sent);
    any it does not hold come back in ``Committed.missing``. ``want_grant``: slots the
    sender would like lent for its next request. Answered with ``Committed`` once every
    group's notification landed (or ``Error``); with ``reply_by_notif`` that answer is a
    :class:`LeaseReply` in a NIXL notification to the sender's agent, not a ZMQ reply."""

    req_id: str
    lease: int
    keys: list[bytes]
    nbytes: list[int]
    checksums: list[int]
    skipped: list[bytes] = msgspec.field(default_factory=list)
    want_grant: int = 0
    reply_by_notif: bool = False


class Committed(Msg, tag="committed"):
    """Every chunk landed: ``stored`` are offer (or push) indices now held, ``bad`` ones
    rejected at commit (none today: checksums are checked later, at the chunk's first
    read, so a chunk corrupted in flight is dropped there, not reported here).
    ``missing``: skipped keys of a ``Push`` the receiver does not hold (send them again).
    ``grant``: slots lent for the sender's next request. ``recent``: keys that became
    held here since this sender's previous reply (from any source, newest last, capped),
    so the sender can skip them without asking."""

    req_id: str
    stored: list[int]
    bad: list[int]
    missing: list[bytes] = msgspec.field(default_factory=list)
    grant: Grant | None = None
    recent: list[bytes] = msgspec.field(default_factory=list)


class LeaseReply(Msg, tag="lease_reply"):
    """Receiver -> sender in a NIXL notification (``SIGNED_NOTIF_PREFIX``), for a Push
    or Done that asked ``reply_by_notif``: the final answer for ``lease``."""

    lease: int
    reply: Committed | Error


class Cancel(Msg, tag="cancel"):
    """Sender gives up on a lease; its slots are freed at once."""

    req_id: str
    lease: int
    reason: str = ""


class Fetch(Msg, tag="fetch"):
    """Decoder -> prefiller's pull endpoint (standard PD contract): push the chunks held
    under hold id ``req_id`` (from :class:`DecodeParams`) to the receiver at ``receiver``
    (``tcp://host:port`` of the decoder's control endpoint for this TP rank). Answered
    with ``HandoffDone`` once the push is over, or ``Error(UNKNOWN_LEASE)`` at once for a
    hold that was never issued, expired, or was already fetched (holds are one-shot per
    receiver rank). ``tp_rank``/``tp_size``: the receiver's; at another TP size than
    the prefiller's, each rank is pushed the head pieces it needs (:mod:`lmcache_pd.tp`)."""

    req_id: str
    receiver: str
    tp_rank: int = 0
    tp_size: int = 1


class FetchKeys(Msg, tag="fetch_keys"):
    """``kv_both`` engine -> a peer's p2p endpoint (peer-to-peer fetch, ``p2p.py``): push
    the chunks ``keys`` (a prompt's chunk keys in prefix order, as the remote tier's
    holder index named this peer for them) from your CPU/disk tiers to the receiver at
    ``receiver`` (``tcp://host:port``, TP rank ``tp_rank``) with the ordinary handoff.
    The peer sends the longest prefix of ``keys`` it still holds. Answered with
    ``HandoffDone`` (``chunks`` moved + ``dedup`` already held there = the prefix sent;
    fewer than ``len(keys)``: the rest is a miss), or ``Error`` for a bad request."""

    req_id: str
    keys: list[bytes]
    receiver: str
    tp_rank: int = 0


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
    """Prefill-step ``kv_transfer_params`` (orchestrator -> prefiller's vLLM connector,
    through the HTTP request body). One definition for the proxy that writes them and the
    connector that reads them (``request.kv_transfer_params``).

    Two ways to start a handoff (one protocol):

    - **push-ahead** (our proxy): ``decoder_host``/``decoder_init_port`` name the decoder
      before the prefill runs; the prefiller pushes to it as soon as the chunks exist;
    - **standard contract** (vLLM's proxy example, Ray Serve LLM, llm-d, Dynamo): only
      ``do_remote_decode: true`` (vLLM's ``remote_*`` keys null); the prefiller holds the
      chunks and returns :class:`DecodeParams` for whichever decoder gets the request.

    Fields:
        do_remote_decode: ``True`` on the prefill step: the KV computed here is decoded
            elsewhere.
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
    req_id: str | None = None
    decoder_host: str | None = None
    decoder_init_port: int | None = None
    proxy_notify: str | None = None

    @property
    def push_ahead(self) -> bool:
        """True when a decoder is named: push to it, no hold."""
        return self.decoder_host is not None and self.decoder_init_port is not None

    def decoder_endpoint(self, rank: int) -> str:
        """``tcp://host:port`` of the named decoder's control endpoint for TP ``rank``."""
        if self.decoder_host is None or self.decoder_init_port is None:
            raise ValueError("kv_transfer_params name no decoder (standard contract)")
        return f"tcp://{self.decoder_host}:{self.decoder_init_port + rank}"

    def to_dict(self) -> dict[str, object]:
        return msgspec.to_builtins(self)

    @classmethod
    def from_request(cls, params: object) -> KVTransferParams | None:
        """Parse a request's ``kv_transfer_params`` (extra keys, such as vLLM's
        ``remote_*``, ignored); None when they do not ask for a remote decode. Raises
        ``ValueError`` naming a malformed field."""
        if not isinstance(params, dict) or not params.get("do_remote_decode"):
            return None
        try:
            out = msgspec.convert(params, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"malformed kv_transfer_params: {exc}") from None
        if (out.decoder_host is None) != (out.decoder_init_port is None):
            raise ValueError(
                "malformed kv_transfer_params: decoder_host and decoder_init_port go together"
            )
        if out.push_ahead and not out.req_id:
            raise ValueError("malformed kv_transfer_params: req_id is required with decoder_host")
        return out


def standard_prefill_params() -> dict[str, Any]:
    """The prefill-step ``kv_transfer_params`` of the standard vLLM PD contract, exactly
    as vLLM's proxy example, Ray Serve LLM and llm-d send them (a fresh dict)."""
    return {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }


class DecodeParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Decode-step ``kv_transfer_params``: what the prefiller's connector returns from the
    prefill (``request_finished``), handed to the decoder's connector unchanged by any
    orchestrator (our proxy, vLLM's proxy example, Ray Serve LLM, llm-d, Dynamo).

    vLLM's standard keys come first; ours are prefixed ``lmcache_pd_``. Two flows:

    - push-ahead (our proxy named the decoder in :class:`KVTransferParams`): ``req_id``
      is the proxy's id, ``lmcache_pd_sent`` says the prefiller pushed (chunks may still
      be landing), ``proxy_notify`` is set when the proxy waited for ``HandoffDone``;
    - standard contract (nobody named a decoder): ``lmcache_pd_hold`` names the chunks
      the prefiller holds for ``pd_lease_ttl_s``, fetched from ``remote_host`` at
      ``lmcache_pd_pull_ports[rank]`` (one per prefiller TP rank) with :class:`Fetch`.
    """

    do_remote_prefill: bool = True
    do_remote_decode: bool = False
    remote_engine_id: str | None = None
    remote_host: str | None = None
    remote_port: int | None = None
    remote_block_ids: list[int] | None = None
    req_id: str | None = None
    proxy_notify: str | None = None
    lmcache_pd_chunks: int = 0
    lmcache_pd_tokens: int = 0
    lmcache_pd_sent: bool = False
    lmcache_pd_hold: str | None = None
    lmcache_pd_pull_ports: list[int] = msgspec.field(default_factory=list)
    lmcache_pd_tp_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self)
        out.setdefault("do_remote_prefill", True)
        out.setdefault("do_remote_decode", False)
        return out

    @property
    def pulls(self) -> bool:
        """True for the standard contract: the decoder must fetch the chunks."""
        return self.lmcache_pd_hold is not None

    def pull_endpoint(self, rank: int) -> str:
        """``tcp://host:port`` of prefiller rank ``rank``'s pull endpoint."""
        if self.remote_host is None or not self.lmcache_pd_pull_ports:
            raise ValueError("kv_transfer_params: remote_host and lmcache_pd_pull_ports needed")
        if rank >= len(self.lmcache_pd_pull_ports):
            raise ValueError(
                f"kv_transfer_params.lmcache_pd_pull_ports: no port for TP rank {rank} "
                f"(the prefiller runs TP={len(self.lmcache_pd_pull_ports)})"
            )
        return f"tcp://{self.remote_host}:{self.lmcache_pd_pull_ports[rank]}"

    @classmethod
    def from_request(cls, params: object) -> DecodeParams | None:
        """Parse a decode request's ``kv_transfer_params`` (extra keys ignored). None
        when they do not ask for a remote prefill; ``ValueError`` naming the field when
        they are malformed."""
        if params is None:
            return None
        if not isinstance(params, dict):
            raise ValueError(f"kv_transfer_params: expected an object, got {type(params).__name__}")
        if not params.get("do_remote_prefill"):
            return None
        try:
            out = msgspec.convert(params, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"malformed kv_transfer_params: {exc}") from None
        if out.lmcache_pd_chunks < 0 or out.lmcache_pd_tokens < 0:
            raise ValueError("malformed kv_transfer_params: negative lmcache_pd_chunks/tokens")
        if out.pulls and not out.lmcache_pd_pull_ports:
            raise ValueError("malformed kv_transfer_params: lmcache_pd_pull_ports missing")
        return out


class LeaseNotif(msgspec.Struct, frozen=True):
    """NIXL notification of one WRITE group: chunks ``want[first:first+count]`` of
    ``lease`` landed. Wire form ``lmcpd:<lease>:<first>:<count>`` (ASCII, what NIXL's
    notification carries)."""

    lease: int
    first: int
    count: int

    PREFIX = b"lmcpd:"

    def encode(self) -> bytes:
        return self.PREFIX + f"{self.lease}:{self.first}:{self.count}".encode()

    @classmethod
    def decode(cls, text: bytes) -> LeaseNotif | None:
        """The notification in ``text``, or None for anything else (other users of
        the NIXL agent, garbage)."""
        if not text.startswith(cls.PREFIX):
            return None
        try:
            lease, first, count = (int(x) for x in text[len(cls.PREFIX) :].split(b":"))
        except ValueError:
            return None
        if first < 0 or count < 0:
            return None
        return cls(lease, first, count)


Message = (
    Hello
    | HelloAck
    | Offer
    | Accept
    | Busy
    | Done
    | Push
    | Committed
    | LeaseReply
    | Cancel
    | Fetch
    | FetchKeys
    | Error
    | HandoffDone
)

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
