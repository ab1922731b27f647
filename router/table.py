"""The bounded request table: requests in flight, and the last few finished ones.

In flight: at most ``max_inflight`` records (more -> the proxy answers 503, it never
grows without bound). Finished: a ring of ``finished_history`` records for
``GET /v1/proxy/requests``. Memory is flat whatever the number of requests served.
"""

from __future__ import annotations

import enum
import itertools
import secrets
import time
from collections import deque
from dataclasses import dataclass


class RequestState(str, enum.Enum):
    ROUTING = "routing"
    PREFILLING = "prefilling"
    HANDOFF = "handoff"
    DECODING = "decoding"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TableFull(Exception):
    """More than ``max_inflight`` requests in flight."""


@dataclass(slots=True, eq=False)
class RequestRecord:
    req_id: str
    endpoint: str
    started: float
    state: RequestState = RequestState.ROUTING
    mode: str = ""
    prefiller: str = ""
    decoder: str = ""
    prompt_tokens: int = -1
    error: str = ""
    finished: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "req_id": self.req_id,
            "endpoint": self.endpoint,
            "state": self.state.value,
            "mode": self.mode,
            "prefiller": self.prefiller,
            "decoder": self.decoder,
            "prompt_tokens": self.prompt_tokens,
            "error": self.error,
            "elapsed_s": round((self.finished or time.monotonic()) - self.started, 6),
        }


class RequestTable:
    def __init__(self, max_inflight: int, finished_history: int) -> None:
        self.max_inflight = max_inflight
        self.inflight: dict[str, RequestRecord] = {}
        self.finished: deque[RequestRecord] = deque(maxlen=finished_history)
        self._prefix = f"pd-{secrets.token_hex(4)}-"
        self._seq = itertools.count(1)

    def __len__(self) -> int:
        return len(self.inflight)

    def open(self, endpoint: str) -> RequestRecord:
        if len(self.inflight) >= self.max_inflight:
            raise TableFull(f"{len(self.inflight)} requests in flight (max_inflight)")
        rec = RequestRecord(f"{self._prefix}{next(self._seq)}", endpoint, time.monotonic())
        self.inflight[rec.req_id] = rec
        return rec

    def close(self, rec: RequestRecord, state: RequestState, error: str = "") -> None:
        if self.inflight.pop(rec.req_id, None) is None:
            return
        rec.state = state
        rec.error = error
        rec.finished = time.monotonic()
        self.finished.append(rec)
