"""Frames between the deciding process and its intake workers, and their encoding.

A frame is a header (version, kind, number, payload length) and a payload. Payloads are written
field by field with `struct`: fixed-size integers and floats, and strings, bytes and big
integers after their length. Decoding is strict: a frame of another version, an unknown kind or
one that goes the other way, a length past the limit or past the payload's end, and bytes left
over are refused with a `FrameError`. Nothing on the socket is unpickled or evaluated.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from aiohttp import web

VERSION = 1
# version, kind, number (a submission's, echoed by its answer; 0 on every other frame), payload
# length.
HEADER = struct.Struct("<BBII")
# Far above any payload: a 255-answer task of a million items packs to 32 MiB.
MAX_PAYLOAD = 256 * 1024**2
# How long a stopping worker may take to finish what it holds.
STOP_SECONDS = 15.0


class Kind(IntEnum):
    FACTS = 1  # to a worker, first: what it needs to serve (`Facts`)
    READY = 2  # to the scorer: the worker accepts connections
    PING = 3  # both ways: the scorer's ping, and the worker's answer to it
    STOP = 4  # to a worker: stop accepting, finish what it holds, exit
    SUBMISSION = 5  # to the scorer: a `Submission`, under a number of the worker's
    ANSWER = 6  # to a worker: the `Answer` to the submission of the same number


TO_WORKER = frozenset({Kind.FACTS, Kind.PING, Kind.STOP, Kind.ANSWER})
TO_SCORER = frozenset({Kind.READY, Kind.PING, Kind.SUBMISSION})
_NUMBERED = frozenset({Kind.SUBMISSION, Kind.ANSWER})
_EMPTY = frozenset({Kind.READY, Kind.PING, Kind.STOP})


class FrameError(ValueError):
    """A frame that this side of the protocol does not accept; the message says what is wrong."""


@dataclass(frozen=True)
class ParsedSubmission:
    """A valid body. Whether its answers fit the task is the scorer's to say, after it checked
    the run and the task: `packed` holds them when they do, `answer_error` says why not."""

    task: str
    method: str
    artifact: str | None
    packed: int | None
    answer_error: str | None
    # How to produce the predictions again from the artifact (docs/scorer.md, Reproduction).
    command: str | None = None
    # The newest entries of the agent's notebook when it submitted, shown to reviewers.
    notebook: str | None = None


@dataclass(frozen=True)
class BodyError:
    """A body that is no valid submission; `message` names each field that is wrong."""

    message: str
    status: int = 400


@dataclass(frozen=True)
class Submission:
    """What the deciding process gets of one submission request."""

    token: str | None  # the credential presented, unverified
    parsed: ParsedSubmission | BodyError
    # When the request arrived, by time.monotonic(): one clock for every process of the machine.
    arrived: float


@dataclass(frozen=True)
class Answer:
    """The HTTP answer to a submission."""

    status: int
    body: bytes
    headers: dict[str, str]

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, headers=self.headers)


@dataclass(frozen=True)
class TaskFacts:
    """What intake needs of a task; nothing in it is secret."""

    labels: list[int | str]
    size: int


@dataclass(frozen=True)
class Facts:
    """What a worker is given to serve: the tasks' public facts, the body size limit, and the
    address of the deciding process's own HTTP server."""

    tasks: dict[str, TaskFacts]
    client_max_size: int
    private_address: str


class Frame(NamedTuple):
    """One decoded frame: `body` is None for the kinds without a payload."""

    kind: Kind
    number: int
    body: Facts | Submission | Answer | None


def frame(kind: Kind, body: Facts | Submission | Answer | None = None, number: int = 0) -> bytes:
    """One frame, header and payload, ready to write."""
    if kind in _EMPTY and body is None:
        payload = b""
    elif isinstance(body, Submission) and kind is Kind.SUBMISSION:
        payload = _encode_submission(body)
    elif isinstance(body, Answer) and kind is Kind.ANSWER:
        payload = _encode_answer(body)
    elif isinstance(body, Facts) and kind is Kind.FACTS:
        payload = _encode_facts(body)
    else:
        raise TypeError(f"a {kind.name} frame cannot carry {type(body).__name__}")
    # One bytes object, so that the frame goes out in one write.
    return HEADER.pack(VERSION, kind, number, len(payload)) + payload


class FrameReader:
    """Takes the bytes one end of a socket receives and gives back its whole frames, decoded;
    `accepts` are the kinds that go to this end."""

    def __init__(self, accepts: frozenset[Kind]) -> None:
        self._accepts = accepts
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """The frames that `data` completes; a frame not wholly arrived waits for the next
        bytes. A FrameError leaves the reader unusable: the stream has lost its framing."""
        self._buffer += data
        frames = []
        offset = 0
        while len(self._buffer) - offset >= HEADER.size:
            version, kind, number, length = HEADER.unpack_from(self._buffer, offset)
            checked = self._check(version, kind, number, length)
            end = offset + HEADER.size + length
            if len(self._buffer) < end:
                break
            payload = bytes(self._buffer[offset + HEADER.size : end])
            frames.append(Frame(checked, number, _decode(checked, payload)))
            offset = end
        del self._buffer[:offset]
        return frames

    def _check(self, version: int, kind: int, number: int, length: int) -> Kind:
        """The header's kind, once its fields are all valid; checked before the payload
        arrives, so that a bad length is refused before it is waited for."""
        if version != VERSION:
            raise FrameError(f"a frame of protocol version {version}; this end speaks {VERSION}")
        try:
            checked = Kind(kind)
        except ValueError:
            raise FrameError(f"a frame of unknown kind {kind}") from None
        if checked not in self._accepts:
            raise FrameError(f"a {checked.name} frame, which never goes to this end")
        if number and checked not in _NUMBERED:
            raise FrameError(f"a {checked.name} frame numbered {number}; it has no number")
        if checked in _EMPTY and length:
            raise FrameError(f"a {checked.name} frame with {length} payload bytes; it has none")
        if length > MAX_PAYLOAD:
            raise FrameError(
                f"a {checked.name} frame of {length} bytes, over the limit of {MAX_PAYLOAD}"
            )
        return checked


def _decode(kind: Kind, payload: bytes) -> Facts | Submission | Answer | None:
    if kind in _EMPTY:
        return None
    source = _Reader(payload, kind)
    body: Facts | Submission | Answer
    if kind is Kind.SUBMISSION:
        body = _decode_submission(source)
    elif kind is Kind.ANSWER:
        body = _decode_answer(source)
    else:
        body = _decode_facts(source)
    source.end()
    return body


# Tags of the values a field may hold.
_ABSENT, _PRESENT = 0, 1
_PARSED, _BODY_ERROR = 1, 2
_INT, _STR = 1, 2

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def fixed(self, form: struct.Struct, value: float) -> None:
        self.parts.append(form.pack(value))

    def blob(self, value: bytes) -> None:
        self.parts += (_U32.pack(len(value)), value)

    def text(self, value: str) -> None:
        self.blob(value.encode())

    def integer(self, value: int) -> None:
        # Two's complement, little-endian, as few bytes as hold the sign: a packed submission
        # is one integer of thousands of bits.
        self.blob(value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True))

    def optional_text(self, value: str | None) -> None:
        if value is None:
            self.parts.append(_U8.pack(_ABSENT))
        else:
            self.parts.append(_U8.pack(_PRESENT))
            self.text(value)

    def optional_integer(self, value: int | None) -> None:
        if value is None:
            self.parts.append(_U8.pack(_ABSENT))
        else:
            self.parts.append(_U8.pack(_PRESENT))
            self.integer(value)

    def payload(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    def __init__(self, payload: bytes, kind: Kind) -> None:
        self._payload = payload
        self._size = len(payload)
        self._at = 0
        self._kind = kind

    def _cut_short(self, at: int, size: int) -> FrameError:
        return FrameError(
            f"a {self._kind.name} frame cut short: {size} bytes at byte {at} of a "
            f"{self._size}-byte payload"
        )

    def fixed(self, form: struct.Struct) -> int:
        at = self._at
        self._at = at + form.size
        if self._at > self._size:
            raise self._cut_short(at, form.size)
        value: int = form.unpack_from(self._payload, at)[0]
        return value

    def real(self) -> float:
        at = self._at
        self._at = at + _F64.size
        if self._at > self._size:
            raise self._cut_short(at, _F64.size)
        value: float = _F64.unpack_from(self._payload, at)[0]
        return value

    def tag(self, *allowed: int) -> int:
        at = self._at
        if at >= self._size:
            raise self._cut_short(at, 1)
        tag = self._payload[at]
        self._at = at + 1
        if tag not in allowed:
            raise FrameError(
                f"a {self._kind.name} frame with tag {tag} at byte {at}, where "
                f"{' or '.join(map(str, allowed))} belongs"
            )
        return tag

    def blob(self) -> bytes:
        size = self.fixed(_U32)
        at = self._at
        end = at + size
        if end > self._size:
            raise self._cut_short(at, size)
        self._at = end
        return self._payload[at:end]

    def text(self) -> str:
        raw = self.blob()
        try:
            return raw.decode()
        except UnicodeDecodeError as error:
            raise FrameError(
                f"a {self._kind.name} frame with a string that is not UTF-8: {error}"
            ) from None

    def integer(self) -> int:
        raw = self.blob()
        if not raw:
            raise FrameError(f"a {self._kind.name} frame with an integer of no bytes")
        return int.from_bytes(raw, "little", signed=True)

    def optional_text(self) -> str | None:
        return self.text() if self.tag(_ABSENT, _PRESENT) == _PRESENT else None

    def optional_integer(self) -> int | None:
        return self.integer() if self.tag(_ABSENT, _PRESENT) == _PRESENT else None

    def end(self) -> None:
        if self._at != len(self._payload):
            raise FrameError(
                f"a {self._kind.name} frame with {len(self._payload) - self._at} bytes after "
                "its last field"
            )


def _encode_submission(submission: Submission) -> bytes:
    out = _Writer()
    out.optional_text(submission.token)
    out.fixed(_F64, submission.arrived)
    parsed = submission.parsed
    if isinstance(parsed, ParsedSubmission):
        out.fixed(_U8, _PARSED)
        out.text(parsed.task)
        out.text(parsed.method)
        out.optional_text(parsed.artifact)
        out.optional_integer(parsed.packed)
        out.optional_text(parsed.answer_error)
        out.optional_text(parsed.command)
        out.optional_text(parsed.notebook)
    else:
        out.fixed(_U8, _BODY_ERROR)
        out.text(parsed.message)
        out.fixed(_U16, parsed.status)
    return out.payload()


def _decode_submission(source: _Reader) -> Submission:
    token = source.optional_text()
    arrived = source.real()
    parsed: ParsedSubmission | BodyError
    if source.tag(_PARSED, _BODY_ERROR) == _PARSED:
        parsed = ParsedSubmission(
            task=source.text(),
            method=source.text(),
            artifact=source.optional_text(),
            packed=source.optional_integer(),
            answer_error=source.optional_text(),
            command=source.optional_text(),
            notebook=source.optional_text(),
        )
    else:
        parsed = BodyError(source.text(), source.fixed(_U16))
    return Submission(token, parsed, arrived)


def _encode_answer(answer: Answer) -> bytes:
    out = _Writer()
    out.fixed(_U16, answer.status)
    out.blob(answer.body)
    out.fixed(_U32, len(answer.headers))
    for name, value in answer.headers.items():
        out.text(name)
        out.text(value)
    return out.payload()


def _decode_answer(source: _Reader) -> Answer:
    status = source.fixed(_U16)
    body = source.blob()
    headers = {}
    for _ in range(source.fixed(_U32)):
        name = source.text()
        headers[name] = source.text()
    return Answer(status, body, headers)


def _encode_facts(facts: Facts) -> bytes:
    out = _Writer()
    out.fixed(_U64, facts.client_max_size)
    out.text(facts.private_address)
    out.fixed(_U32, len(facts.tasks))
    for name, task in facts.tasks.items():
        out.text(name)
        out.fixed(_U64, task.size)
        out.fixed(_U32, len(task.labels))
        for label in task.labels:
            if isinstance(label, str):
                out.fixed(_U8, _STR)
                out.text(label)
            else:
                out.fixed(_U8, _INT)
                out.integer(label)
    return out.payload()


def _decode_facts(source: _Reader) -> Facts:
    client_max_size = source.fixed(_U64)
    private_address = source.text()
    tasks = {}
    for _ in range(source.fixed(_U32)):
        name = source.text()
        size = source.fixed(_U64)
        labels: list[int | str] = [
            source.text() if source.tag(_INT, _STR) == _STR else source.integer()
            for _ in range(source.fixed(_U32))
        ]
        tasks[name] = TaskFacts(labels, size)
    return Facts(tasks, client_max_size, private_address)
