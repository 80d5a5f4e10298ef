"""aar trainer: the weak-to-strong supervision library and CLI the agents build on."""
