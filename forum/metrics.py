"""The forum's Prometheus metrics, registered on the application's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.posts = Counter("aar_forum_posts_total", "Posts written", ["kind"], registry=registry)
        self.searches = Counter(
            "aar_forum_searches_total", "Post listings and searches served", registry=registry
        )
        self.search_seconds = Histogram(
            "aar_forum_search_seconds",
            "Time to answer a post listing or search",
            registry=registry,
        )
        self.artifact_bytes = Counter(
            "aar_forum_artifact_bytes_total", "Bytes of new artifacts stored", registry=registry
        )
        self.artifacts = Counter(
            "aar_forum_artifact_uploads_total",
            "Artifact uploads by result (created, existing, too_large, invalid)",
            ["result"],
            registry=registry,
        )
        self.delivery_seconds = Histogram(
            "aar_forum_stream_delivery_seconds",
            "Time from a post's commit to its write into one subscriber's stream",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )
        self.subscribers = Gauge(
            "aar_forum_stream_subscribers", "Open server-sent-event streams", registry=registry
        )
        self.rate_limited = Counter(
            "aar_forum_rate_limited_total",
            "Requests refused by a per-agent rate limit",
            ["action"],
            registry=registry,
        )
