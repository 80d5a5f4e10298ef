"""The scorer's Prometheus metrics, registered on the registry its /metrics serves."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.submissions = Counter(
            "aar_scorer_submissions",
            "Submissions by result: accepted, flagged, refused, rate_limited, invalid",
            ["result"],
            registry=registry,
        )
        self.released = Counter(
            "aar_scorer_feedback_released",
            "Submissions whose public score the Ladder released (a new best of their task)",
            registry=registry,
        )
        self.feedback_closed = Gauge(
            "aar_scorer_feedback_closed",
            "1 when a task's leakage budget is spent and nothing more is released for it",
            ["task"],
            registry=registry,
        )
        self.leakage_bits = Gauge(
            "aar_scorer_leakage_transcripts_log2",
            "Log2 of how many feedback transcripts the task can have produced so far (the stated "
            "bound's B, in bits)",
            ["task"],
            registry=registry,
        )
        self.leakage_labels = Gauge(
            "aar_scorer_leakage_bound_labels",
            "Public labels beyond chance the stated bound admits for the task so far",
            ["task"],
            registry=registry,
        )
        self.probes = Counter(
            "aar_scorer_probes",
            "Submissions that looked like label probing, by pattern and by what was done",
            ["reason", "action"],
            registry=registry,
        )
        self.reproductions = Counter(
            "aar_scorer_reproductions",
            "Reproductions reported by the operator, by target task and outcome (succeeded, "
            "failed, timed_out, invalid)",
            ["task", "outcome"],
            registry=registry,
        )
        self.reproduction_gpu_seconds = Counter(
            "aar_scorer_reproduction_gpu_seconds",
            "GPU time the reproductions of submissions took (GPU-hours x 3600), by target task",
            ["task"],
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
