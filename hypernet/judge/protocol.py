"""The paper's MLLM evaluation protocol (docs/judge.md), in our own prompt wording.

For every generated image:
  * content: one question per subject reference photo — reference first, generated second —
    "same subject? (style may differ)"; the per-photo votes are combined by majority vote;
  * style: one question with the style reference image — "same style? (subject may differ)";
  * the image is correct ("joint") only if both are yes.

Voting rules (documented in README_judge.md):
  * unparseable votes abstain: they count on neither side and are reported separately;
  * yes needs a strict majority of the parsed votes; a tie (possible with an even number of
    reference photos) is NO, flagged `tie: true` in the record — the judge did not confirm the
    identity, and the paper's "majority decides" gives no yes on a split;
  * all votes unparseable → the verdict is UNPARSEABLE;
  * joint: YES if both YES; NO if either is NO; otherwise UNPARSEABLE.
Accuracies are yes / (yes + no): unparseable verdicts are left out of the denominator (and
counted in their own column) instead of silently scoring as "no".

Rubric variant (mode "rubric"): the same questions ask for a 0–100 score. A side's score is the
mean of its parsed scores (unparseable ones abstain); its verdict is YES when score ≥ threshold;
the joint score is min(content, style) — an image is only as good as its weaker side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from ..errors import JudgeInputError
from .images import PreparedImage
from .parsing import NO, UNPARSEABLE, YES, parse_score, parse_yes_no

MODES = ("yesno", "rubric")
CONTENT, STYLE = "content", "style"

_CONTENT_SETUP = (
    "You are shown two images. The first is a reference photo of a specific subject{name}. "
    "The second was produced by an image generator and may be in a different artistic style. "
)
_CONTENT_CRITERIA = (
    "Judge only the identity of the subject: its shape, colours, markings and distinctive "
    "details must match the reference; a different art style, pose, background or lighting is "
    "expected and must not count against it. "
)
_STYLE_SETUP = (
    "You are shown two images. The first is a reference that defines an artistic style{name}. "
    "The second was produced by an image generator and is expected to show a different subject. "
)
_STYLE_CRITERIA = (
    "Judge only the style: medium, colour palette, brushwork or line quality, texture and "
    "overall look; a different subject or composition is expected and must not count against it. "
)
PROMPT_TEMPLATES = {
    ("yesno", CONTENT): _CONTENT_SETUP
    + "Does the second image show the same subject as the reference photo? "
    + _CONTENT_CRITERIA
    + "Answer with one word: Yes or No.",
    ("yesno", STYLE): _STYLE_SETUP
    + "Is the second image made in the same style as the reference? "
    + _STYLE_CRITERIA
    + "Answer with one word: Yes or No.",
    ("rubric", CONTENT): _CONTENT_SETUP
    + "Rate from 0 to 100 how certainly the second image shows the same subject as the "
    "reference photo (0: a different subject, 100: unmistakably the same one). "
    + _CONTENT_CRITERIA
    + "Reply with the number only.",
    ("rubric", STYLE): _STYLE_SETUP
    + "Rate from 0 to 100 how faithfully the second image follows the reference style "
    "(0: an unrelated style, 100: indistinguishable style). "
    + _STYLE_CRITERIA
    + "Reply with the number only.",
}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise JudgeInputError(f"judge mode: expected one of {', '.join(MODES)}, found {mode!r}")
    return mode


def make_prompt(mode: str, kind: str, name: str = "") -> str:
    """The question text; a non-empty subject/style name is given to the judge as a hint."""
    name = " ".join(name.replace("_", " ").split())
    return PROMPT_TEMPLATES[(check_mode(mode), kind)].format(name=f" ({name})" if name else "")


@dataclass
class ImageJob:
    """One generated image together with the references it is judged against."""

    method: str
    subject: str
    style: str
    generated: PreparedImage
    subject_refs: Sequence[PreparedImage]
    style_ref: PreparedImage


@dataclass(frozen=True)
class Question:
    job: int  # index into the job list
    kind: str  # CONTENT or STYLE
    prompt: str
    images: tuple[PreparedImage, ...]  # (reference, generated): reference first, always


def build_questions(jobs: Sequence[ImageJob], mode: str, use_names: bool = True) -> list[Question]:
    questions = []
    for index, job in enumerate(jobs):
        if not job.subject_refs:
            raise JudgeInputError(f"subject references for {job.subject!r}: no images given")
        content = make_prompt(mode, CONTENT, job.subject if use_names else "")
        style = make_prompt(mode, STYLE, job.style if use_names else "")
        for reference in job.subject_refs:
            questions.append(Question(index, CONTENT, content, (reference, job.generated)))
        questions.append(Question(index, STYLE, style, (job.style_ref, job.generated)))
    return questions


def majority(verdicts: Iterable[str]) -> tuple[str, bool]:
    """(verdict, tie) from per-reference verdicts; see the module docstring for the rules."""
    verdicts = list(verdicts)
    yes, no = verdicts.count(YES), verdicts.count(NO)
    if yes + no == 0:
        return UNPARSEABLE, False
    if yes == no:
        return NO, True
    return (YES if yes > no else NO), False


def joint_verdict(content: str, style: str) -> str:
    if content == YES and style == YES:
        return YES
    if NO in (content, style):
        return NO
    return UNPARSEABLE


def _side(mode: str, questions: list[Question], answers: list[str], threshold: float) -> dict:
    votes = []
    for question, answer in zip(questions, answers):
        vote = {"reference": question.images[0].label, "question": question.prompt, "answer": answer}
        if mode == "rubric":
            vote["score"] = parse_score(answer)
            vote["parsed"] = UNPARSEABLE if vote["score"] is None else "score"
        else:
            vote["parsed"] = parse_yes_no(answer)
        votes.append(vote)
    side = {"votes": votes}
    if mode == "rubric":
        scores = [v["score"] for v in votes if v["score"] is not None]
        side["score"] = sum(scores) / len(scores) if scores else None
        side["verdict"] = (
            UNPARSEABLE if side["score"] is None else (YES if side["score"] >= threshold else NO)
        )
        side["tie"] = False
        side["unparseable"] = len(votes) - len(scores)
    else:
        parsed = [v["parsed"] for v in votes]
        side["verdict"], side["tie"] = majority(parsed)
        side["yes"], side["no"] = parsed.count(YES), parsed.count(NO)
        side["unparseable"] = parsed.count(UNPARSEABLE)
    return side


def score_jobs(
    jobs: Sequence[ImageJob],
    questions: Sequence[Question],
    answers: Sequence[str],
    mode: str,
    threshold: float = 50.0,
) -> list[dict]:
    """One JSON-ready record per job, with every question, answer, vote and verdict."""
    grouped: dict[tuple[int, str], tuple[list, list]] = {}
    for question, answer in zip(questions, answers, strict=True):
        qs, ans = grouped.setdefault((question.job, question.kind), ([], []))
        qs.append(question)
        ans.append(answer)
    records = []
    for index, job in enumerate(jobs):
        content = _side(mode, *grouped[(index, CONTENT)], threshold)
        style = _side(mode, *grouped[(index, STYLE)], threshold)
        record = {
            "method": job.method,
            "subject": job.subject,
            "style": job.style,
            "image": job.generated.label,
            "image_sha256": job.generated.sha256,
            "checks": {CONTENT: content, STYLE: style},
            "joint": joint_verdict(content["verdict"], style["verdict"]),
        }
        if mode == "rubric":
            both = (content["score"], style["score"])
            record["joint_score"] = None if None in both else min(both)
        records.append(record)
    return records


ASPECTS = (
    (CONTENT, lambda r: r["checks"][CONTENT]["verdict"]),
    (STYLE, lambda r: r["checks"][STYLE]["verdict"]),
    ("joint", lambda r: r["joint"]),
)
_SCORES = (
    (CONTENT, lambda r: r["checks"][CONTENT].get("score")),
    (STYLE, lambda r: r["checks"][STYLE].get("score")),
    ("joint", lambda r: r.get("joint_score")),
)


def summarize(records: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """Counts and accuracies per group of `keys` (e.g. ("method",) or ("method","subject","style"))."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault(tuple(record[k] for k in keys), []).append(record)
    rows = []
    for group_key, members in groups.items():
        row = dict(zip(keys, group_key))
        row["images"] = len(members)
        for aspect, verdict_of in ASPECTS:
            verdicts = [verdict_of(r) for r in members]
            yes, no = verdicts.count(YES), verdicts.count(NO)
            row[f"{aspect}_yes"] = yes
            row[f"{aspect}_no"] = no
            row[f"{aspect}_unparseable"] = verdicts.count(UNPARSEABLE)
            row[f"{aspect}_accuracy"] = yes / (yes + no) if yes + no else None
        if any("score" in r["checks"][CONTENT] for r in members):
            for aspect, score_of in _SCORES:
                scores = [s for s in map(score_of, members) if s is not None]
                row[f"{aspect}_score"] = sum(scores) / len(scores) if scores else None
        rows.append(row)
    return rows
