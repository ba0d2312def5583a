"""MLLM judge: answer parsing, majority vote, joint verdicts and aggregation (no network)."""

from __future__ import annotations

import pytest
from PIL import Image

from hypernet.judge import NO, UNPARSEABLE, YES, majority, make_prompt, parse_score, parse_yes_no, prepare
from hypernet.judge.protocol import ImageJob, build_questions, joint_verdict, score_jobs, summarize

YES_NO_CASES = [
    ("Yes", YES),
    ("yes", YES),
    ("YES!", YES),
    ("Yes.", YES),
    ("  yes\n", YES),
    ("**Yes**", YES),
    ("**No**", NO),
    ("No.", NO),
    ("no", NO),
    ("No, the dog has a different collar colour.", NO),
    ("Yes, it is the same subject, although not in the same pose.", YES),
    ("No, it is not yes-worthy", NO),  # first word decides
    ("Answer: yes", YES),
    ("The answer is: **no**.", NO),
    ("I think the answer is yes.", YES),
    ("<think>Could be no... the ears match.</think>\nYes", YES),
    ("<think>unfinished reasoning, no answer", UNPARSEABLE),
    ("`Yes`", YES),
    ("'No'", NO),
    ("Yesterday I saw a dog", UNPARSEABLE),  # whole words only
    ("Nope", UNPARSEABLE),
    ("Maybe.", UNPARSEABLE),
    ("It could be yes or no.", UNPARSEABLE),  # both words, neither first
    ("", UNPARSEABLE),
    ("   ", UNPARSEABLE),
    ("!!!", UNPARSEABLE),
    ("The same subject is shown.", UNPARSEABLE),
]


@pytest.mark.parametrize("answer, expected", YES_NO_CASES)
def test_parse_yes_no_table(answer, expected):
    assert parse_yes_no(answer) == expected


SCORE_CASES = [
    ("85", 85.0),
    ("Score: 72", 72.0),
    ("**90**", 90.0),
    ("I would rate it 64/100.", 64.0),
    ("On a scale of 0 to 100, I give it 30.", 30.0),
    ("0-100 scale: 55 out of 100", 55.0),
    ("100", 100.0),
    ("0", 0.0),
    ("72.5", 72.5),
    ("The score is 7 because 3 details differ", 7.0),
    ("150", None),
    ("-5", None),
    ("no number here", None),
    ("", None),
]


@pytest.mark.parametrize("answer, expected", SCORE_CASES)
def test_parse_score_table(answer, expected):
    assert parse_score(answer) == expected


@pytest.mark.parametrize("votes, expected", [
    ([YES, YES, NO], (YES, False)),
    ([YES, NO, NO], (NO, False)),
    ([YES, NO], (NO, True)),  # even split: no yes without a strict majority
    ([YES, YES, NO, NO], (NO, True)),
    ([YES, UNPARSEABLE, UNPARSEABLE], (YES, False)),  # unparseable votes abstain
    ([YES, YES, NO, UNPARSEABLE], (YES, False)),
    ([NO, UNPARSEABLE], (NO, False)),
    ([UNPARSEABLE, UNPARSEABLE], (UNPARSEABLE, False)),
    ([], (UNPARSEABLE, False)),
])
def test_majority_rules(votes, expected):
    assert majority(votes) == expected


@pytest.mark.parametrize("content, style, expected", [
    (YES, YES, YES), (YES, NO, NO), (NO, YES, NO), (NO, UNPARSEABLE, NO),
    (YES, UNPARSEABLE, UNPARSEABLE), (UNPARSEABLE, UNPARSEABLE, UNPARSEABLE),
])
def test_joint_verdict(content, style, expected):
    assert joint_verdict(content, style) == expected


def test_prompts_name_hint_and_structure():
    content = make_prompt("yesno", "content", "wolf_plushie")
    style = make_prompt("yesno", "style", "")
    assert "(wolf plushie)" in content and "same subject" in content and content.endswith("Yes or No.")
    assert "()" not in style and "same style" in style
    assert "0 to 100" in make_prompt("rubric", "style", "watercolor")


def _img(colour, label):
    return prepare(Image.new("RGB", (8, 8), colour), label)


def _jobs(refs=3):
    subject_refs = [_img((i, 0, 0), f"ref{i}") for i in range(refs)]
    style_ref = _img((0, 0, 9), "style")
    return [ImageJob("m", "dog", "ink", _img((0, k + 1, 0), f"g{k}"), subject_refs, style_ref)
            for k in range(2)]


def test_questions_put_reference_first_and_one_per_reference():
    jobs = _jobs(refs=3)
    questions = build_questions(jobs, "yesno")
    assert len(questions) == 2 * (3 + 1)
    assert [q.kind for q in questions[:4]] == ["content"] * 3 + ["style"]
    assert all(q.images[1] is jobs[q.job].generated for q in questions)
    assert [q.images[0].label for q in questions[:4]] == ["ref0", "ref1", "ref2", "style"]


def test_score_and_summarize_counts_unparseable_separately():
    jobs = _jobs(refs=3)
    questions = build_questions(jobs, "yesno")
    # image 0: content votes yes, yes, unparseable → YES; style yes → correct
    # image 1: content votes all unparseable, style No → joint NO, content UNPARSEABLE
    answers = ["Yes", "yes.", "Maybe", "Yes", "hmm", "?", "unclear", "No"]
    records = score_jobs(jobs, questions, answers, "yesno")
    first, second = records
    assert first["checks"]["content"]["verdict"] == YES and first["checks"]["content"]["unparseable"] == 1
    assert first["joint"] == YES
    assert second["checks"]["content"]["verdict"] == UNPARSEABLE and second["joint"] == NO
    assert second["checks"]["content"]["votes"][0]["answer"] == "hmm"
    (row,) = summarize(records, ("method",))
    assert row["images"] == 2
    assert (row["content_yes"], row["content_no"], row["content_unparseable"]) == (1, 0, 1)
    assert row["content_accuracy"] == 1.0  # unparseable is not in the denominator
    assert (row["style_yes"], row["style_no"]) == (1, 1) and row["style_accuracy"] == 0.5
    assert (row["joint_yes"], row["joint_no"], row["joint_accuracy"]) == (1, 1, 0.5)


def test_rubric_scores_threshold_and_joint_min():
    jobs = _jobs(refs=2)
    questions = build_questions(jobs, "rubric")
    answers = ["80", "Score: 60", "90/100", "20", "n/a", "40"]
    records = score_jobs(jobs, questions, answers, "rubric", threshold=50)
    first, second = records
    assert first["checks"]["content"]["score"] == 70.0 and first["checks"]["content"]["verdict"] == YES
    assert first["joint_score"] == 70.0 and first["joint"] == YES
    assert second["checks"]["content"]["score"] == 20.0  # "n/a" abstains
    assert second["checks"]["content"]["unparseable"] == 1 and second["joint"] == NO
    (row,) = summarize(records, ("method",))
    assert row["content_score"] == 45.0 and row["style_score"] == 65.0 and row["joint_score"] == 45.0  # mean of min(70, 90) and min(20, 40)
    assert row["joint_accuracy"] == 0.5
