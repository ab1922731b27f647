"""Helpers for the observability checks of the real-vLLM tests: labelled Prometheus
samples of an engine's ``/metrics`` and our KV-event stream read back with vLLM's own
event types (replay and snapshot requests)."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import zmq

from lmcache_pd.events import END_SEQ, SNAPSHOT_SEQ, seq_bytes

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m.group(1) != name:
            continue
        have = dict(_LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def kv_events(endpoint: str, start: int = SNAPSHOT_SEQ, timeout_s: float = 10.0) -> list[Any]:
    """Events of a replay from ``start`` (default: the snapshot), decoded with vLLM's
    ``KVEventBatch``."""
    from vllm.distributed.kv_events import KVEventBatch

    decoder = msgspec.msgpack.Decoder(KVEventBatch)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    events: list[Any] = []
    try:
        sock.send_multipart((b"", seq_bytes(start)))
        while True:
            if not sock.poll(int(timeout_s * 1000)):
                raise TimeoutError(f"no KV-event replay answer from {endpoint}")
            _, _topic, seq, payload = sock.recv_multipart()
            if int.from_bytes(seq, "big", signed=True) == END_SEQ:
                return events
            events.extend(decoder.decode(payload).events)
    finally:
        sock.close()


def stored_chunks(events: list[Any], medium: str) -> set[tuple[int, ...]]:
    """Token tuples of the ``BlockStored`` events of ``medium``."""
    from vllm.distributed.kv_events import BlockStored

    return {tuple(e.token_ids) for e in events if isinstance(e, BlockStored) and e.medium == medium}


def chunks_of(tokens: list[int], size: int) -> set[tuple[int, ...]]:
    return {tuple(tokens[i : i + size]) for i in range(0, len(tokens) - size + 1, size)}
