"""aar trainer: the weak-to-strong supervision library and CLI the agents build on."""

import os

# Length-bucketed batches change shape every step. With fixed-size segments the CUDA caching
# allocator keeps blocks cut for earlier shapes; expandable segments grow one mapping instead
# (PyTorch's advice for allocations that change size often). Read when CUDA starts.
CUDA_ALLOCATOR_SETTINGS = "expandable_segments:True"


class GPUMemoryError(RuntimeError):
    """A batch did not fit in GPU memory; the message names the settings that make it fit.
    Here, not beside the training loop, so that the CLI can catch it without importing torch."""


def use_cuda_allocator_settings() -> None:
    """Set aar's CUDA allocator settings unless PYTORCH_CUDA_ALLOC_CONF is set already."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOCATOR_SETTINGS)
