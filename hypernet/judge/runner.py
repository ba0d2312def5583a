"""Asking all questions of a judgement concurrently, through the cache, then scoring them."""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import JudgeInputError
from ..progress import Progress
from .backends import Backend
from .cache import AnswerCache, cache_key
from .images import images_from_array
from .protocol import ImageJob, Question, build_questions, check_mode, score_jobs, summarize

log = logging.getLogger(__name__)

PAIR_KEYS = ("method", "subject", "style")
METHOD_KEYS = ("method",)


@dataclass
class JudgeResult:
    settings: dict
    records: list[dict]
    by_pair: list[dict] = field(default_factory=list)
    by_method: list[dict] = field(default_factory=list)
    questions: int = 0
    asked: int = 0  # questions sent to the backend in this run (the rest came from the cache)

    def to_json(self) -> dict:
        return {
            "settings": self.settings,
            "questions": self.questions,
            "asked_this_run": self.asked,
            "summary_by_method": self.by_method,
            "summary_by_pair": self.by_pair,
            "records": self.records,
        }


def ask_all(
    questions: Sequence[Question],
    backend: Backend,
    cache: AnswerCache | None = None,
    progress: Progress | None = None,
) -> tuple[list[str], int]:
    """Answers in question order, and how many were actually sent to the backend.

    Progress is reported from the calling thread, so a callback may raise (ComfyUI's progress
    bar raises on user interrupt) and stop the run; nothing queued is sent after that.
    """
    config = backend.config
    keys = [cache_key(config.model, config.temperature, config.max_tokens, q.prompt, q.images)
            for q in questions]
    answers: dict[str, str] = {}
    todo: dict[str, Question] = {}  # identical questions are asked once
    for key, question in zip(keys, questions):
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            answers[key] = cached
        else:
            todo.setdefault(key, question)
    total = len(questions)
    report = progress or (lambda done, total: None)
    done = total - sum(1 for key in keys if key in todo)
    report(done, total)
    if todo:
        log.info("judge: %d question(s), %d from cache, %d to ask (%d in flight)",
                 total, total - len(todo), len(todo), backend.max_concurrency)
        waiting = Counter(keys)  # how many questions each asked key answers
        pool = ThreadPoolExecutor(max_workers=min(backend.max_concurrency, len(todo)))
        pending: dict = {}
        try:
            pending = {pool.submit(backend.ask, q.prompt, q.images): key for key, q in todo.items()}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    key = pending.pop(future)
                    answers[key] = future.result()  # re-raises the backend's error
                    if cache is not None:
                        cache.put(key, answers[key], config.model)
                    done += waiting[key]
                    report(done, total)
        finally:
            # On error or interrupt: drop everything not yet started; wait for requests in
            # flight so no thread outlives the call, and keep their answers for the resume.
            pool.shutdown(wait=True, cancel_futures=True)
            if cache is not None:
                for future, key in pending.items():
                    if not future.cancelled() and future.exception() is None:
                        cache.put(key, future.result(), config.model)
    return [answers[key] for key in keys], len(todo)


def judge(
    jobs: Sequence[ImageJob],
    backend: Backend,
    mode: str = "yesno",
    threshold: float = 50.0,
    use_names: bool = True,
    cache: AnswerCache | None = None,
    progress: Progress | None = None,
) -> JudgeResult:
    """Run the paper's protocol on `jobs` and aggregate per pair and per method."""
    check_mode(mode)
    questions = build_questions(jobs, mode, use_names)
    answers, asked = ask_all(questions, backend, cache, progress)
    records = score_jobs(jobs, questions, answers, mode, threshold)
    settings = {
        "mode": mode,
        "threshold": threshold if mode == "rubric" else None,
        "use_names": use_names,
        "backend": backend.config.describe(),
        "cache": str(cache.path) if cache is not None else None,
    }
    return JudgeResult(
        settings=settings,
        records=records,
        by_pair=summarize(records, PAIR_KEYS),
        by_method=summarize(records, METHOD_KEYS),
        questions=len(questions),
        asked=asked,
    )


def judge_image_batch(
    backend: Backend,
    generated,
    subject_references,
    style_reference,
    subject: str = "",
    style: str = "",
    method: str = "generated",
    mode: str = "yesno",
    threshold: float = 50.0,
    cache: AnswerCache | None = None,
    progress: Progress | None = None,
) -> tuple[JudgeResult, list[ImageJob]]:
    """One subject × style pair given as image batches ([B,H,W,C] floats in 0..1, e.g. ComfyUI
    IMAGE tensors). Names are optional hints for the judge; empty names are left out."""
    generated_images = images_from_array(generated, "generated")
    subject_images = images_from_array(subject_references, "subject_references")
    style_images = images_from_array(style_reference, "style_reference")
    if len(style_images) != 1:
        raise JudgeInputError(
            f"style_reference: expected exactly 1 image (the style reference), found a batch of "
            f"{len(style_images)}"
        )
    jobs = [ImageJob(method, subject.strip(), style.strip(), image, subject_images, style_images[0])
            for image in generated_images]
    result = judge(jobs, backend, mode, threshold, use_names=True, cache=cache, progress=progress)
    return result, jobs
