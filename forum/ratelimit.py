"""Per-agent token buckets: a burst is allowed, a sustained rate above the limit is refused."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """`per_minute` actions per key on average, up to `burst` at once; 0 turns it off."""

    per_minute: float
    burst: int
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def take(self, key: str, now: float | None = None) -> float:
        """Spend one token for `key`: 0.0 if allowed, else the seconds until one is available."""
        if self.per_minute <= 0:
            return 0.0
        current = time.monotonic() if now is None else now
        rate = self.per_minute / 60.0
        bucket = self._buckets.setdefault(key, _Bucket(float(self.burst), current))
        bucket.tokens = min(self.burst, bucket.tokens + (current - bucket.updated) * rate)
        bucket.updated = current
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate
