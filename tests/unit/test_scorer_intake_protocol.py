"""The frames between the scorer and its intake workers (aar_scorer.intake.protocol): each kind
comes back as it was sent, however the bytes arrive, and anything else (a cut-short or padded
payload, a wrong version or kind, a length past the limit, a pickle) is refused without being
run."""

from __future__ import annotations

import pickle
import re
import struct
from typing import Any

import pytest

from aar_scorer.intake.protocol import (
    HEADER,
    MAX_PAYLOAD,
    TO_SCORER,
    TO_WORKER,
    VERSION,
    Answer,
    BodyError,
    Facts,
    FrameError,
    FrameReader,
    Kind,
    ParsedSubmission,
    Submission,
    TaskFacts,
    frame,
)

PARSED = ParsedSubmission(
    task="w2s-chat",
    method="fine-tuned on the weak labels, ünïcødé and all",
    artifact="sha256:" + "0" * 64,
    packed=(1 << 5133) | 0b1011,
    answer_error=None,
    command="aar-train w2s --task $AAR_TASK_DIR --out $AAR_OUTPUT_DIR",
    notebook="## 2026-12-06 10:00 UTC: plan\n\ntry the confidence loss ✓",
)
SUBMISSIONS = [
    Submission("eyJhbGciOi.token", PARSED, 12345.678),
    Submission(None, ParsedSubmission("t", "m", None, None, "predictions has 3 answers"), 0.0),
    Submission("", ParsedSubmission("t", "m", None, 0, None), -1.5),
    Submission("tok", BodyError("invalid request body: task: field required"), 1.0),
    Submission(None, BodyError("send a smaller body", 413), 2.0),
]
ANSWERS = [
    Answer(200, b'{"id": 1, "status": "accepted"}', {"Content-Type": "application/json"}),
    Answer(429, b"", {"retry-after": "30", "Content-Type": "application/json", "X-É": "ü"}),
    Answer(500, b"\x00\xff" * 3, {}),
]
FACTS = Facts(
    tasks={
        "w2s-chat": TaskFacts([0, 1], 2567),
        "strings": TaskFacts(["a", "b", ""], 3),
        "odd ints": TaskFacts([-1, 2**70, -(2**70), "1"], 1),
    },
    client_max_size=2567 * 64 + 256 * 1024,
    private_address="\0aar-scorer-1-0123456789abcdef",
)
TO_EACH_WORKER = [
    (Kind.FACTS, FACTS, 0),
    (Kind.PING, None, 0),
    (Kind.STOP, None, 0),
    *((Kind.ANSWER, answer, n) for n, answer in enumerate(ANSWERS)),
    (Kind.ANSWER, ANSWERS[0], 0xFFFF_FFFF),
]
TO_THE_SCORER = [
    (Kind.READY, None, 0),
    (Kind.PING, None, 0),
    *((Kind.SUBMISSION, submission, n + 1) for n, submission in enumerate(SUBMISSIONS)),
]


def raw_frame(kind: int, payload: bytes, number: int = 0, version: int = VERSION) -> bytes:
    return HEADER.pack(version, kind, number, len(payload)) + payload


@pytest.mark.parametrize(
    ("accepts", "sent"), [(TO_WORKER, TO_EACH_WORKER), (TO_SCORER, TO_THE_SCORER)]
)
def test_every_frame_comes_back_as_sent(accepts: frozenset[Kind], sent: list[Any]) -> None:
    stream = b"".join(frame(kind, body, number) for kind, body, number in sent)
    # All at once, and a byte at a time: frames split across reads wait for their rest.
    for chunk in (len(stream), 1, 7):
        reader = FrameReader(accepts)
        received = []
        for start in range(0, len(stream), chunk):
            received += reader.feed(stream[start : start + chunk])
        assert [(f.kind, f.body, f.number) for f in received] == sent


def test_a_frame_not_yet_arrived_waits() -> None:
    whole = frame(Kind.SUBMISSION, SUBMISSIONS[0], 3)
    reader = FrameReader(TO_SCORER)
    assert reader.feed(whole[:-1]) == []
    [received] = reader.feed(whole[-1:])
    assert received.body == SUBMISSIONS[0]


def test_a_frame_cannot_carry_what_its_kind_does_not() -> None:
    with pytest.raises(TypeError, match="a SUBMISSION frame cannot carry Answer"):
        frame(Kind.SUBMISSION, ANSWERS[0], 1)
    with pytest.raises(TypeError, match="a PING frame cannot carry Facts"):
        frame(Kind.PING, FACTS)


def payload_of(kind: Kind, body: Any) -> bytes:
    return frame(kind, body, 1 if kind in (Kind.SUBMISSION, Kind.ANSWER) else 0)[HEADER.size :]


SUBMITTED = payload_of(Kind.SUBMISSION, SUBMISSIONS[0])
MALFORMED = [
    # A payload cut short, however short, under a header that says so.
    *(
        (TO_SCORER, raw_frame(Kind.SUBMISSION, SUBMITTED[:cut], 1), "SUBMISSION frame cut short")
        for cut in (0, 1, 9, 20, 100, -1)
    ),
    (TO_WORKER, raw_frame(Kind.ANSWER, payload_of(Kind.ANSWER, ANSWERS[0])[:-3], 1),
     "ANSWER frame cut short"),
    (TO_WORKER, raw_frame(Kind.FACTS, payload_of(Kind.FACTS, FACTS)[:-1]), "FACTS frame cut short"),
    # Bytes after the last field.
    (TO_SCORER, raw_frame(Kind.SUBMISSION, payload_of(Kind.SUBMISSION, SUBMISSIONS[3]) + b"\0", 1),
     "SUBMISSION frame with 1 bytes after its last field"),
    (TO_WORKER, raw_frame(Kind.FACTS, payload_of(Kind.FACTS, FACTS) + b"xyz"),
     "FACTS frame with 3 bytes after its last field"),
    (TO_SCORER, raw_frame(Kind.PING, b"x"), "a PING frame with 1 payload bytes; it has none"),
    # Another version, an unknown kind, a kind that goes the other way, a number out of place.
    (
        TO_SCORER,
        raw_frame(Kind.PING, b"", version=2),
        "a frame of protocol version 2; this end speaks 1",
    ),
    (TO_WORKER, raw_frame(0, b""), "a frame of unknown kind 0"),
    (TO_WORKER, raw_frame(7, b""), "a frame of unknown kind 7"),
    (TO_WORKER, raw_frame(Kind.SUBMISSION, payload_of(Kind.SUBMISSION, SUBMISSIONS[1]), 1),
     "a SUBMISSION frame, which never goes to this end"),
    (TO_SCORER, raw_frame(Kind.FACTS, payload_of(Kind.FACTS, FACTS)),
     "a FACTS frame, which never goes to this end"),
    (TO_SCORER, raw_frame(Kind.READY, b"", 5), "a READY frame numbered 5; it has no number"),
    # Lengths past the limit, or past the payload: refused before anything is waited for.
    (TO_SCORER, HEADER.pack(VERSION, Kind.SUBMISSION, 1, MAX_PAYLOAD + 1),
     f"over the limit of {MAX_PAYLOAD}"),
    (TO_SCORER, HEADER.pack(VERSION, Kind.SUBMISSION, 1, 0xFFFF_FFFF), "over the limit"),
    (TO_WORKER, raw_frame(Kind.ANSWER, struct.pack("<HI", 200, 0xFFFF_FFFF) + b"{}", 1),
     "ANSWER frame cut short: 4294967295 bytes at byte 6 of a 8-byte payload"),
    (TO_WORKER, raw_frame(Kind.ANSWER, struct.pack("<HII", 200, 0, 1_000_000), 1),
     "ANSWER frame cut short"),
    # Tags, strings and integers that are no value of their field.
    (TO_SCORER, raw_frame(Kind.SUBMISSION, b"\x02" + bytes(20), 1),
     "SUBMISSION frame with tag 2 at byte 0, where 0 or 1 belongs"),
    (TO_SCORER, raw_frame(Kind.SUBMISSION, b"\x00" + struct.pack("<d", 1.0) + b"\x03", 1),
     "with tag 3 at byte 9, where 1 or 2 belongs"),
    (TO_SCORER, raw_frame(Kind.SUBMISSION, b"\x01" + struct.pack("<I", 2) + b"\xff\xfe", 1),
     "a string that is not UTF-8"),
    # client_max_size, address "", 1 task: name "", size 1, 1 label: an integer of 0 bytes.
    (TO_WORKER, raw_frame(Kind.FACTS, struct.pack("<QIIIQIBI", 1, 0, 1, 0, 1, 1, 1, 0)),
     "an integer of no bytes"),
]  # fmt: skip


@pytest.mark.parametrize(("accepts", "data", "says"), MALFORMED)
def test_a_malformed_frame_is_refused_saying_what_is_wrong(
    accepts: frozenset[Kind], data: bytes, says: str
) -> None:
    with pytest.raises(FrameError, match=re.escape(says)):
        FrameReader(accepts).feed(data)


RUN: list[str] = []


def _run() -> None:
    RUN.append("unpickled")


class Payload:
    """Unpickled, it runs `_run`."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _run, ()


def test_a_pickle_is_refused_and_never_run() -> None:
    pickled = pickle.dumps(Payload(), protocol=pickle.HIGHEST_PROTOCOL)
    pickle.loads(pickled)
    assert RUN == ["unpickled"]  # what the payload does, if anything unpickles it
    RUN.clear()
    pickled_submission = pickle.dumps(SUBMISSIONS[0], protocol=pickle.HIGHEST_PROTOCOL)
    for accepts, stream in [
        # A pickle as the stream, as the payload of a frame of every kind, and the scorer's
        # own objects pickled.
        (TO_SCORER, pickled),
        (TO_WORKER, pickled),
        *((TO_SCORER, raw_frame(kind, pickled, 1)) for kind in (Kind.SUBMISSION, Kind.READY)),
        *((TO_WORKER, raw_frame(kind, pickled, 1)) for kind in (Kind.ANSWER, Kind.FACTS)),
        (TO_SCORER, raw_frame(Kind.SUBMISSION, pickled_submission, 1)),
    ]:
        with pytest.raises(FrameError):
            FrameReader(accepts).feed(stream)
    assert RUN == []
