"""What every aar component shares: agent credentials, the HTTP service plumbing and SQLite.

Kept small on purpose: only code that two or more components need lives here."""

from prometheus_client import disable_created_metrics

# Every counter and histogram would otherwise export a `_created` series beside it: one more
# series per label set (thousands at 900 agents) that no dashboard or alert of ours reads.
disable_created_metrics()  # type: ignore[no-untyped-call]
