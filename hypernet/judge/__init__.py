"""MLLM judge: the LoRA.rar paper's content/style evaluation (docs/judge.md).

    backend = make_backend(BackendConfig(protocol="ollama", url="http://127.0.0.1:11434",
                                         model="llava:13b"))
    result = judge(load_jobs(generated_dir, references_dir), backend, cache=AnswerCache(path))
    write_outputs(result, jobs, out_dir)

Modules: parsing (answer → verdict/score), protocol (questions, majority vote, aggregation),
images (≤512 px preparation), backends (HTTP and local models), cache (resumable answers),
runner (concurrent asking), batch (folder layout), report (JSON/CSV/HTML/grid).
"""

from .backends import PROTOCOLS, BackendConfig, make_backend, resolve_api_key
from .batch import load_jobs
from .cache import AnswerCache, default_cache_path
from .images import MAX_SIDE, PreparedImage, images_from_array, prepare
from .parsing import NO, UNPARSEABLE, YES, parse_score, parse_yes_no
from .protocol import MODES, ImageJob, build_questions, majority, make_prompt, summarize
from .report import text_report, verdict_grid, write_outputs
from .runner import JudgeResult, judge, judge_image_batch

__all__ = [
    "PROTOCOLS", "BackendConfig", "make_backend", "resolve_api_key", "load_jobs", "AnswerCache",
    "default_cache_path", "MAX_SIDE", "PreparedImage", "images_from_array", "prepare", "NO",
    "UNPARSEABLE", "YES", "parse_score", "parse_yes_no", "MODES", "ImageJob", "build_questions",
    "majority", "make_prompt", "summarize", "text_report", "verdict_grid", "write_outputs",
    "JudgeResult", "judge", "judge_image_batch",
]
