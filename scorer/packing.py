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
from typing import cast

import numpy as np

# At most 255 labels, so index 255 is free to mark an answer that is no label.
_NOT_A_LABEL = 255


class Packer:
    """Packs answer sequences for one label set."""

    def __init__(self, labels: Sequence[int | str]) -> None:
        if len(labels) > 255:
            raise ValueError(f"at most 255 allowed answers per task (got {len(labels)})")
        self.labels = list(labels)
        self._index: dict[int | str, int] = {label: index for index, label in enumerate(labels)}
        # Labels that are small integers get a C-speed path: the answers as bytes, translated
        # to indices in one call; a value that is no label becomes _NOT_A_LABEL.
        self._byte_table: bytes | None = None
        if all(isinstance(label, int) and 0 <= label < 256 for label in labels):
            table = bytearray([_NOT_A_LABEL] * 256)
            for index, label in enumerate(labels):
                table[int(label)] = index
            self._byte_table = bytes(table)

    def indices(self, answers: Sequence[int | str]) -> bytes:
        """Each answer's index in the label set; a ValueError names the first one not allowed.

        Answers arrive as strict JSON ints or strings (pydantic's StrictInt | StrictStr), so 1
        and "1" are different answers here, as they are in JSON.
        """
        if self._byte_table is not None:
            try:
                fast = bytes(cast(list[int], answers)).translate(self._byte_table)
            except (TypeError, ValueError):  # a string, or an integer outside 0..255
                fast = None
            if fast is not None and _NOT_A_LABEL not in fast:
                return fast
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
        codes = np.frombuffer(indices, dtype=np.uint8)
        packed = 0
        for j in range(len(self.labels)):
            # Little bit order: answer 0 is the least significant bit of its plane.
            plane = np.packbits(codes == j, bitorder="little").tobytes()
            packed |= int.from_bytes(plane, "little") << (j * size)
        return packed

    def mask(self, positions: Iterable[int], size: int) -> int:
        """Every plane's bit at `positions`: selects those answers whatever their value."""
        plane = 0
        for position in positions:
            plane |= 1 << position
        return sum(plane << (j * size) for j in range(len(self.labels)))
