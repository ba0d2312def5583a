"""Turning a judge model's free-text answer into a verdict or a score.

Models rarely answer with exactly "Yes": we see "Yes.", "**No**", "yes, the dog has the same
collar", "Answer: no" and reasoning models wrap everything in <think>…</think>. The rules here
are deliberately small and documented (README_judge.md), because the accuracy figures depend on
them:

Yes/No
  1. Drop <think>…</think> blocks, markdown emphasis and punctuation; lower-case.
  2. If the first word is "yes" or "no", that is the answer (covers "No, … yes-like words …").
  3. Otherwise, if exactly one of the whole words "yes" / "no" occurs anywhere, that is the answer.
  4. Otherwise (neither word, or both after a non-answer first word) the answer is UNPARSEABLE.
  The paper counts "any answer containing yes" as yes. Rule 3 is that rule, made stricter in two
  ways on purpose: whole words only ("yesterday" is not a yes), and an answer that says both
  without leading with one is not guessed at. Unparseable is never folded into "no".

Score (rubric variant, 0–100)
  1. Same clean-up; range mentions such as "0-100", "0 to 100" are removed.
  2. "N/100", "N out of 100", "score: N" win; otherwise the first number in the text.
  3. A number outside 0..100, or no number, is UNPARSEABLE.
"""

from __future__ import annotations

import re

YES = "yes"
NO = "no"
UNPARSEABLE = "unparseable"

_THINK = re.compile(r"<think>.*?(</think>|$)", re.IGNORECASE | re.DOTALL)
_WORD = re.compile(r"[a-z]+")
_NUMBER = r"(\d+(?:\.\d+)?)"
_RANGE = re.compile(r"\b0\s*(?:-|–|—|to)\s*100\b", re.IGNORECASE)
_EXPLICIT_SCORE = (
    re.compile(_NUMBER + r"\s*(?:/|out\s+of)\s*100\b", re.IGNORECASE),
    re.compile(r"score\s*(?:is|of|=|:)?\s*\**\s*" + _NUMBER, re.IGNORECASE),
)
_ANY_NUMBER = re.compile(r"(?<![\w.])-?" + _NUMBER)


def _strip_reasoning(answer: str) -> str:
    return _THINK.sub(" ", answer or "")


def parse_yes_no(answer: str) -> str:
    """Return YES, NO or UNPARSEABLE for one answer string (see module docstring)."""
    words = _WORD.findall(_strip_reasoning(answer).lower())
    if not words:
        return UNPARSEABLE
    if words[0] in (YES, NO):
        return words[0]
    has_yes, has_no = YES in words, NO in words
    if has_yes != has_no:
        return YES if has_yes else NO
    return UNPARSEABLE


def parse_score(answer: str) -> float | None:
    """Return a 0..100 score, or None when the answer holds no usable score."""
    text = _RANGE.sub(" ", _strip_reasoning(answer))
    for pattern in _EXPLICIT_SCORE:
        match = pattern.search(text)
        if match:
            return _in_range(match.group(1))
    match = _ANY_NUMBER.search(text)
    if match is None:
        return None
    return _in_range(match.group(0))


def _in_range(number: str) -> float | None:
    value = float(number)
    return value if 0.0 <= value <= 100.0 else None
