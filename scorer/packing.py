"""Predictions packed into one integer, one bit plane per allowed answer (one-hot).

With answers packed this way, the two operations the scorer does on every submission are a
handful of big-integer operations in C instead of Python loops over thousands of answers:
- answers shared with the hidden labels: `(packed & truth).bit_count()`;
- answers that differ between two submissions (Hamming distance):
  `(a ^ b).bit_count() // 2`, since a changed answer clears one bit and sets another.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence


class Packer:
    """Packs answer sequences for one label set."""

    def __init__(self, labels: Sequence[int | str]) -> None:
        if len(labels) > 255:
            raise ValueError(f"at most 255 allowed answers per task (got {len(labels)})")
        self.labels = list(labels)
        self._index: dict[int | str, int] = {label: index for index, label in enumerate(labels)}
        # One translation table per plane: answer index j becomes '1', every other index '0'.
        self._planes = [
            bytes(ord("1") if value == j else ord("0") for value in range(256))
            for j in range(len(labels))
        ]

    def indices(self, answers: Sequence[int | str]) -> bytes:
        """Each answer's index in the label set; a ValueError names the first one not allowed.

        Answers arrive as strict JSON ints or strings (pydantic's StrictInt | StrictStr), so 1
        and "1" are different answers here, as they are in JSON.
        """
        try:
            return bytes(map(self._index.__getitem__, answers))
        except KeyError:
            for position, answer in enumerate(answers):
                if answer not in self._index:
                    allowed = ", ".join(json.dumps(label) for label in self.labels)
                    raise ValueError(
                        f"answer {position} is {json.dumps(answer)}, which is not one of the "
                        f"allowed answers ({allowed})"
                    ) from None
            raise

    def pack(self, answers: Sequence[int | str]) -> int:
        """The answers as one integer: bit j*n + i is set when answer i is label j."""
        return self.pack_indices(self.indices(answers))

    def pack_indices(self, indices: bytes) -> int:
        size = len(indices)
        packed = 0
        for j, table in enumerate(self._planes):
            # Reversed so that answer 0 is the least significant bit of its plane.
            plane = int(indices.translate(table)[::-1], 2)
            packed |= plane << (j * size)
        return packed

    def mask(self, positions: Iterable[int], size: int) -> int:
        """Every plane's bit at `positions`: selects those answers whatever their value."""
        plane = 0
        for position in positions:
            plane |= 1 << position
        return sum(plane << (j * size) for j in range(len(self.labels)))


def hamming(a: int, b: int) -> int:
    """How many answers differ between two packed submissions of the same task."""
    return (a ^ b).bit_count() // 2
