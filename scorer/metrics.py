"""The scorer's Prometheus metrics, registered on the registry its /metrics serves."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.submissions = Counter(
            "aar_scorer_submissions",
            "Submissions by result: accepted, flagged, refused, rate_limited, invalid",
            ["result"],
            registry=registry,
        )
        self.released = Counter(
            "aar_scorer_feedback_released",
            "Submissions whose public score the Ladder released (a new best of their run)",
            registry=registry,
        )
        self.probes = Counter(
            "aar_scorer_probes",
            "Submissions that looked like label probing, by pattern and by what was done",
            ["reason", "action"],
            registry=registry,
        )
        self.intake_restarts = Counter(
            "aar_scorer_intake_restarts",
            "Intake workers started again after one exited (the connections it held were closed)",
            registry=registry,
        )
        self.latency = Histogram(
            "aar_scorer_scoring_seconds",
            "Time from a submission's arrival to its durable answer",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
