"""Submission intake: the HTTP requests that bring submissions, received, parsed and packed in
worker processes (docs/scorer.md, Intake).

- `protocol`: the frames between the deciding process and a worker, and their encoding;
- `parsing`: submission bodies read and packed, in a worker or in the deciding process;
- `supervisor`: the deciding process's side, which starts, watches and stops the workers;
- `worker`: a worker process.
"""

from aar_scorer.intake.parsing import SUBMISSIONS_PATH, Parser, SubmissionRequest, receive
from aar_scorer.intake.protocol import Answer, BodyError, ParsedSubmission, Submission, TaskFacts
from aar_scorer.intake.supervisor import Decide, Intake, IntakeError

__all__ = [
    "SUBMISSIONS_PATH",
    "Answer",
    "BodyError",
    "Decide",
    "Intake",
    "IntakeError",
    "ParsedSubmission",
    "Parser",
    "Submission",
    "SubmissionRequest",
    "TaskFacts",
    "receive",
]
