"""Probing detection: submissions built to read labels off the feedback, judged against every
earlier scored submission of the task, whatever run, agent or quota window it came from.

Three patterns (refused submissions got no feedback, so nothing can be read by comparing with
them, and they are not kept):
- near duplicate: fewer than `min_distance` answers differ from some earlier submission, as in
  "flip one answer and watch the score";
- walk: a chain of submissions, each within `walk_distance` answers of its nearest earlier one,
  reaching `walk_length` links: the same attack taking a few answers per step;
- fan: `fan_size` later submissions within `fan_distance` answers of one earlier submission, a
  star around a base whatever the distances between its points: queries that each change a
  different part of the base, spaced to stay clear of the other two rules.

The comparison is an XOR and a popcount of packed answers (aar_scorer.packing). Only close
earlier submissions matter (within R = the larger of `walk_distance` and `fan_distance`), and
finding them does not mean comparing with every one:
- the answers are cut into R + 1 blocks; a submission within R answers of an earlier one has at
  least one block identical to it (pigeonhole), so a sorted array of a key of each block of
  every stored submission (its first 8 bytes, scrambled by an invertible multiplication), looked
  up for the new submission's keys, names every close one (and, rarely, a stranger with an equal
  key, which the full comparison then rules out). A directory by the keys' top bits, one entry
  per two to four keys, says where each key's run lies: a lookup reads two places whatever the
  length of the history, where a binary search would read one more per doubling of it;
- the submissions not yet in that array (fewer than `_TAIL`; the array takes them in one merge)
  are found by the same keys in a dictionary.
Independent submissions share no block, so the full comparison is almost never needed. No close
submission is ever missed. A task too small for blocks of
`_MIN_BLOCK_BITS` compares the first 256 bits of its whole history instead, a lower bound on
each distance (independent submissions differ in about half of them), and in full only those
whose bound is within R.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import pairwise

import numpy as np
import numpy.typing as npt

from aar_scorer.tasks import Probing


class ProbeReason(StrEnum):
    NEAR_DUPLICATE = "near_duplicate"
    WALK = "walk"
    FAN = "fan"


# Bits of each submission compared in the prefix pass: 256 make a chance match with an
# independent submission vanishingly rare (about 128 of them differ, with a spread of 8).
_PREFIX_WORDS = 4
# Submissions kept in a dictionary before they join the sorted block index in one merge. A merge
# copies the whole index (tens of milliseconds at 100,000 submissions), in a thread of its own
# (numpy lets go of the interpreter lock while it copies and sorts), so that no check waits for
# it; rows added meanwhile wait in a new dictionary, up to _TAIL_LIMIT of them.
_TAIL = 2048
_TAIL_LIMIT = 8 * _TAIL
# Narrower blocks would match by chance too often to narrow anything down.
_MIN_BLOCK_BITS = 24
# Odd, so multiplying by it (modulo 2**64) maps distinct keys to distinct keys, and spreads keys
# that differ in a few bits (answers of similar submissions) over the top bits the directory uses.
_SCRAMBLE = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class Verdict:
    """How a new submission relates to the task's earlier ones."""

    nearest: int | None  # id of the closest earlier one within walk_distance, or a fan's base
    distance: int | None  # answers that differ from it
    walk_length: int  # links in the chain of close submissions ending here (1: no chain)
    reason: ProbeReason | None  # why this looks like a probe, or None
    fan: int = 0  # the largest star this submission joins, itself included (0: none)
    # Positions in the index of the earlier submissions within fan_distance: their stars grow.
    neighbors: tuple[int, ...] = field(default=(), compare=False, repr=False)


_UNRELATED = Verdict(nearest=None, distance=None, walk_length=1, reason=None)

Array = npt.NDArray[np.uint64]
Rows = npt.NDArray[np.uint32]


class _Tail:
    """Rows not in the sorted block index yet: their block keys -> the row of each (ints only,
    no work for the garbage collector), and the earlier rows of any key two of them share."""

    def __init__(self, first: int) -> None:
        self.first = first  # its first row
        self.rows: dict[int, int] = {}
        self.clashes: dict[int, list[int]] = {}

    def add(self, row: int, keys: list[int]) -> None:
        rows = self.rows
        for key in [key for key in keys if key in rows]:
            self.clashes.setdefault(key, []).append(rows[key])
        rows.update(dict.fromkeys(keys, row))

    def find(self, keys: list[int]) -> list[int]:
        rows = self.rows
        found = [rows[key] for key in keys if key in rows]
        if found and self.clashes:
            found += [row for key in keys for row in self.clashes.get(key, ())]
        return found


@dataclass(frozen=True)
class _BlockIndex:
    """The block keys of the indexed rows, sorted, with the row of each, and where the keys of
    each value of their top `64 - shift` bits lie (from `directory[top]` to
    `directory[top + 1]`)."""

    keys: Array
    rows: Rows
    directory: npt.NDArray[np.int64]
    shift: np.uint64

    def find(self, keys: Array) -> npt.NDArray[np.intp]:
        """The rows with any of `keys`, repeated as often as they have it."""
        top = (keys >> self.shift).astype(np.intp)
        low = self.directory[top]
        lengths = self.directory[top + 1] - low
        total = int(lengths.sum())
        if not total:
            return np.zeros(0, dtype=np.intp)
        # Every position of every looked-up key's directory entry, in one go.
        positions = np.repeat(low - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
        equal = self.keys[positions] == np.repeat(keys, lengths)
        found: npt.NDArray[np.intp] = self.rows[positions[equal]].astype(np.intp)
        return found


_EMPTY_INDEX = _BlockIndex(
    np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint32), np.zeros(2, np.int64), np.uint64(63)
)


def _merged(index: _BlockIndex, new: Array, first: int) -> _BlockIndex:
    """The index with the block keys `new` (a row of keys per row, from row `first`)."""
    blocks = new.shape[1]
    flat = new.ravel()
    rows = np.repeat(np.arange(first, first + len(new), dtype=np.uint32), blocks)
    order = np.argsort(flat, kind="stable")
    flat, rows = flat[order], rows[order]
    at = np.searchsorted(index.keys, flat)
    keys, key_rows = np.insert(index.keys, at, flat), np.insert(index.rows, at, rows)
    bits = max(1, len(keys).bit_length() - 2)  # two to four keys per directory entry
    shift = np.uint64(64 - bits)
    # The directory is rebuilt from every key only when its size changes (once per doubling of
    # the history); otherwise it moves by the counts of the new keys alone.
    counted = flat if shift == index.shift else keys
    counts = np.bincount((counted >> shift).astype(np.intp), minlength=1 << bits)
    directory = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=directory[1:])
    if shift == index.shift:
        directory += index.directory
    return _BlockIndex(keys, key_rows, directory, shift)


class ProbeIndex:
    """One task's scored submissions as rows of 64-bit words, with the walk length each ended
    and the later submissions within fan_distance of each."""

    def __init__(self, settings: Probing, size: int, classes: int) -> None:
        self.settings = settings
        # With two allowed answers, the second bit plane alone says which answer each item has:
        # half the bits to compare, and one differing bit per differing answer. Otherwise a
        # changed answer flips two bits of the one-hot planes.
        self._shift = size if classes == 2 else 0
        self._bits_per_answer = 1 if classes == 2 else 2
        bits = size if classes == 2 else size * classes
        self._bytes = 8 * ((bits + 63) // 64)
        words = self._bytes // 8
        self._prefix_words = min(_PREFIX_WORDS, words)
        # A differing answer flips at most _bits_per_answer bits, so a submission within R
        # answers is within this many bits, in the prefix, in a block and in the whole.
        radius = max(settings.walk_distance, settings.fan_radius)
        self._close_bits = radius * self._bits_per_answer
        blocks = self._close_bits + 1
        used = (bits + 7) // 8  # bytes that hold answers
        self._starts: npt.NDArray[np.intp] | None = None
        if 8 * used // blocks >= _MIN_BLOCK_BITS:
            # Blocks of whole bytes. A block's key is its first 8 bytes (all of it when it is
            # shorter, a byte repeated to fill 8): any function of the block alone will do, since
            # only identical blocks must match; two different ones rarely share 56 bits or more.
            bounds = [used * j // blocks for j in range(blocks + 1)]
            self._starts = np.array(bounds[:-1], dtype=np.intp)
            self._gather = np.array(
                [
                    [start + min(byte, end - start - 1) for byte in range(8)]
                    for start, end in pairwise(bounds)
                ],
                dtype=np.intp,
            ).ravel()
        self._index = _EMPTY_INDEX
        self._indexed = 0  # rows below this are in the block index; the rest in the tails
        self._tails = [_Tail(0)]  # the last one takes new rows; one before it may be merging
        self._merging: Future[_BlockIndex] | None = None
        self._merge_end = 0  # rows below this are in the merge under way
        self._merger: ThreadPoolExecutor | None = None
        self._last: tuple[int, list[int]] | None = None  # the last checked answers, hashes
        self._rows = np.zeros((16, words), dtype=np.uint64)
        self._prefix = np.zeros((self._prefix_words, 16), dtype=np.uint64)  # column per row
        self._children = np.zeros(16, dtype=np.int64)  # later submissions within fan_distance
        self.ids: list[int] = []
        self.walks: list[int] = []

    def _words(self, packed: int) -> npt.NDArray[np.uint64]:
        key = (packed >> self._shift).to_bytes(self._bytes, "little")
        return np.frombuffer(key, dtype="<u8").astype(np.uint64, copy=False)

    def _block_keys(self, rows: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        """The block hashes of rows of words, one row of hashes per row."""
        gathered = rows.view(np.uint8).take(self._gather, axis=1)
        keys: npt.NDArray[np.uint64] = gathered.view(np.uint64) * _SCRAMBLE
        return keys

    def _candidates(self, packed: int, words: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp]:
        """Rows that may be within R answers: every one that is, and few that are not."""
        count = len(self.ids)
        if self._starts is None:
            # No blocks: a lower bound on every distance from the prefixes, all at once.
            prefix = self._prefix[:, :count] ^ words[: self._prefix_words, np.newaxis]
            bound = np.bitwise_count(prefix).sum(axis=0, dtype=np.uint16)
            return np.flatnonzero(bound <= self._close_bits)
        keys = self._block_keys(words[np.newaxis, :])[0]
        hashes = keys.tolist()
        self._last = (packed, hashes)  # add() takes them from here
        found: list[npt.NDArray[np.intp]] = []
        if self._indexed:
            found.append(self._index.find(keys))
        for tail in self._tails:
            rows = tail.find(hashes)
            if rows:
                found.append(np.array(rows, dtype=np.intp))
        if not found:
            return np.zeros(0, dtype=np.intp)
        return np.unique(np.concatenate(found))  # sorted: the earliest of equals comes first

    def check(self, candidate: int) -> Verdict:
        if not self.ids:
            return _UNRELATED
        self._collect()
        words = self._words(candidate)
        rows = self._candidates(candidate, words)
        if not rows.size:
            return _UNRELATED
        differing = np.bitwise_xor(self._rows[rows], words)
        distances = np.bitwise_count(differing).sum(axis=1, dtype=np.int64)
        distances //= self._bits_per_answer
        settings = self.settings
        near = distances <= settings.fan_radius
        neighbors = rows[near]
        fan, base = 0, -1
        if neighbors.size:
            stars = self._children[neighbors] + 1
            biggest = int(stars.argmax())
            fan, base = int(stars[biggest]), int(neighbors[biggest])
        nearest = int(distances.argmin())
        distance = int(distances[nearest])
        if distance > settings.walk_distance:
            nearest_id, walk, distance_or_none = None, 1, None
        else:
            row = int(rows[nearest])
            nearest_id, walk, distance_or_none = self.ids[row], self.walks[row] + 1, distance
        reason = None
        if distance_or_none is not None and distance < settings.min_distance:
            reason = ProbeReason.NEAR_DUPLICATE
        elif walk >= settings.walk_length:
            reason = ProbeReason.WALK
        elif fan >= settings.fan_size:
            reason = ProbeReason.FAN
            nearest_id = self.ids[base]
            distance_or_none = int(distances[np.searchsorted(rows, base)])
        return Verdict(
            nearest_id,
            distance_or_none,
            walk,
            reason,
            fan,
            tuple(int(row) for row in neighbors),
        )

    def add(
        self, submission: int, packed: int, walk_length: int, neighbors: tuple[int, ...] = ()
    ) -> None:
        """Keep a scored submission; `neighbors` are its verdict's, whose stars it joins."""
        count = len(self.ids)
        if count == len(self._rows):
            rows = np.zeros((2 * count, self._rows.shape[1]), dtype=np.uint64)
            rows[:count] = self._rows
            self._rows = rows
            if self._starts is None:
                prefix = np.zeros((self._prefix_words, 2 * count), dtype=np.uint64)
                prefix[:, :count] = self._prefix
                self._prefix = prefix
            self._children = np.concatenate([self._children, np.zeros(count, dtype=np.int64)])
        words = self._words(packed)
        self._rows[count] = words
        if neighbors:
            self._children[list(neighbors)] += 1
        self.ids.append(submission)
        self.walks.append(walk_length)
        if self._starts is None:
            self._prefix[:, count] = words[: self._prefix_words]
            return
        if self._last is not None and self._last[0] == packed:
            hashes = self._last[1]
        else:
            hashes = self._block_keys(words[np.newaxis, :])[0].tolist()
        self._tails[-1].add(count, hashes)
        self._collect()
        waiting = count + 1 - self._tails[-1].first
        if self._merging is not None and waiting >= _TAIL_LIMIT:
            self._collect(wait=True)  # a merge that cannot keep up (rebuilding at start)
        if self._merging is None and waiting >= _TAIL:
            self._merge(count + 1)

    def settle(self) -> None:
        """Wait for a merge under way, then merge every row still in a tail: the index as the
        scorer has it once the history is read back at start."""
        self._collect(wait=True)
        if self._starts is not None and len(self.ids) > self._indexed:
            self._merge(len(self.ids))
            self._collect(wait=True)

    def _merge(self, end: int) -> None:
        """Start moving the rows up to `end` into the block index, in the merging thread; rows
        from `end` on go to a new tail."""
        if self._merger is None:
            self._merger = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe-index")
        new = self._block_keys(self._rows[self._indexed : end])
        self._merging = self._merger.submit(_merged, self._index, new, self._indexed)
        self._merge_end = end
        self._tails.append(_Tail(end))

    def _collect(self, wait: bool = False) -> None:
        """Take a finished merge's index, and drop the tail it took in."""
        if self._merging is None or not (wait or self._merging.done()):
            return
        self._index = self._merging.result()
        self._indexed = self._merge_end
        self._tails = [tail for tail in self._tails if tail.first >= self._merge_end]
        self._merging = None
