"""Reading usage out of a Messages API stream on the side, while its bytes pass through untouched.

The API reports input and cache tokens in `message_start.message.usage` and the output count in
`message_delta.usage.output_tokens`, which is cumulative: the last one seen is the total (summing
would over-bill). Only the few events that carry usage are parsed; content deltas, the bulk of a
stream, are recognised by a substring test and skipped.
"""

from __future__ import annotations

import json
from typing import Any

from aar_gateway.pricing import USAGE_FIELDS, Usage

_INTERESTING = (b"message_start", b"message_delta", b"message_stop", b"error")


class StreamMeter:
    """Feed it the stream's chunks as they arrive; it keeps the latest usage seen."""

    def __init__(self) -> None:
        self._pending = b""
        self._usage: dict[str, Any] = {}
        self.message_id: str | None = None
        self.stopped = False  # message_stop seen: the usage is final
        self.error: dict[str, Any] | None = None  # an `error` event the upstream sent mid-stream

    @property
    def usage(self) -> Usage:
        return Usage.from_api(self._usage)

    def feed(self, chunk: bytes) -> bool:
        """Take the next chunk; True when it completed the `message_stop` event."""
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        data = self._pending + chunk
        *events, self._pending = data.split(b"\n\n")
        stopped_now = False
        for event in events:
            if any(marker in event for marker in _INTERESTING):
                stopped_now |= self._read(event)
        return stopped_now

    def _read(self, event: bytes) -> bool:
        payload = b"\n".join(
            line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
        )
        try:
            data = json.loads(payload)
        except ValueError:
            return False
        if not isinstance(data, dict):
            return False
        kind = data.get("type")
        if kind == "message_start":
            message = data.get("message") or {}
            self.message_id = message.get("id")
            self._merge(message.get("usage"))
        elif kind == "message_delta":
            self._merge(data.get("usage"))
        elif kind == "message_stop":
            self.stopped = True
            return True
        elif kind == "error":
            self.error = data.get("error") or {}
        return False

    def _merge(self, usage: Any) -> None:
        # Every count the API sends is cumulative for the message: a later value replaces.
        if isinstance(usage, dict):
            self._usage.update(
                {
                    key: value
                    for key, value in usage.items()
                    if value is not None and (key in USAGE_FIELDS or key == "cache_creation")
                }
            )
