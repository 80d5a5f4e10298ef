"""Machinery for development and tests on a machine with no Docker and no internet: a local
Kubernetes control plane with a real node, images built here, and a stand-in for the Anthropic
Messages API (with the offline researcher) where the real one cannot be reached."""
