"""ComfyUI nodes for the MLLM judge (thin glue; the logic is in hypernet/judge).

LoraRarMllmBackend → LORARAR_MLLM_BACKEND (a BackendConfig: URL, model, protocol and the NAME
of the environment variable or the PATH of the file holding the API key — never the key, which
would otherwise be saved in the workflow JSON and in every PNG).
LoraRarMllmJudge → content / style / joint scores, a text report and an annotated grid image.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from ..hypernet import judge
from .comfy_v3 import io

log = logging.getLogger(__name__)

MllmBackend = io.Custom("LORARAR_MLLM_BACKEND")
CATEGORY = "LoRA.rar"


class LoraRarMllmBackend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraRarMllmBackend",
            display_name="LoRA.rar MLLM Backend",
            category=CATEGORY,
            description="Where the MLLM judge sends its questions. The API key is read at run time "
            "from an environment variable or a key file; it is never stored in the workflow.",
            inputs=[
                io.Combo.Input("protocol", options=list(judge.PROTOCOLS), default="ollama",
                               tooltip="ollama: Ollama's native /api/chat. openai: any OpenAI-compatible "
                               "/v1/chat/completions server (vLLM, llama.cpp server, LM Studio, Ollama /v1, "
                               "OpenRouter, OpenAI). transformers: a local model folder (needs the "
                               "'local-judge' extra)."),
                io.String.Input("url", default="http://127.0.0.1:11434",
                                tooltip="Server base URL, e.g. http://127.0.0.1:11434 (Ollama) or "
                                "http://127.0.0.1:8000/v1 (vLLM). Unused for transformers."),
                io.String.Input("model", default="llava:7b",
                                tooltip="Model name on the server (e.g. llava:7b), or for transformers "
                                "the path of a local vision-language model folder. The paper used "
                                "LLaVA-Critic-7B."),
                io.String.Input("api_key_env", default="",
                                tooltip="NAME of the environment variable that holds the API key (e.g. "
                                "OPENROUTER_API_KEY) — not the key itself. Leave empty for local servers."),
                io.String.Input("api_key_file", default="",
                                tooltip="Optional path of a file holding the API key (first line, or JSON "
                                "{\"api_key\": ...}); used when the variable is unset."),
                io.Int.Input("concurrency", default=4, min=1, max=64,
                             tooltip="Requests in flight at once (a local model always runs one)."),
                io.Float.Input("timeout", default=120.0, min=1.0, max=3600.0, step=1.0,
                               tooltip="Seconds to wait for one answer before retrying."),
                io.Int.Input("max_retries", default=4, min=0, max=20,
                             tooltip="Retries on rate limits (429, honouring Retry-After), server errors "
                             "(5xx), timeouts and refused connections, with doubling back-off."),
                io.Int.Input("max_tokens", default=128, min=1, max=4096,
                             tooltip="Longest answer the model may write. Decoding is greedy "
                             "(temperature 0), as in the paper."),
            ],
            outputs=[MllmBackend.Output("backend", display_name="backend",
                                        tooltip="Connect to a LoRA.rar MLLM Judge node.")],
        )

    @classmethod
    def execute(cls, protocol, url, model, api_key_env, api_key_file, concurrency, timeout,
                max_retries, max_tokens) -> io.NodeOutput:
        config = judge.BackendConfig(
            protocol=protocol, url=url.strip(), model=model.strip(), api_key_env=api_key_env.strip(),
            api_key_file=api_key_file.strip(), timeout=float(timeout), max_retries=int(max_retries),
            concurrency=int(concurrency), max_tokens=int(max_tokens),
        )
        judge.make_backend(config)  # fail here, at the node that is wrong, not downstream
        return io.NodeOutput(config)


def _cache() -> judge.AnswerCache:
    try:
        import folder_paths

        path = Path(folder_paths.get_user_directory()) / "lorarar" / "judge_answers.jsonl"
    except (ImportError, AttributeError):
        path = judge.default_cache_path()
    return judge.AnswerCache(path)


def _progress():
    try:
        from comfy.utils import ProgressBar
    except ImportError:
        return None
    bar = ProgressBar(1)
    # Called from the node's own thread: ComfyUI's hook raises there on "Cancel", which stops
    # the judge before any further question is sent.
    return lambda done, total: bar.update_absolute(done, total)


def _score(row: dict, aspect: str, mode: str) -> float:
    value = row.get(f"{aspect}_score") if mode == "rubric" else row.get(f"{aspect}_accuracy")
    if value is None:
        return math.nan  # nothing parseable: say so instead of pretending 0
    return value / 100.0 if mode == "rubric" else value


class LoraRarMllmJudge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraRarMllmJudge",
            display_name="LoRA.rar MLLM Judge",
            category=CATEGORY,
            description="The LoRA.rar paper's evaluation: a multimodal LLM checks each generated image "
            "against every subject photo (majority vote) and against the style image; an image is "
            "correct only if both are yes.",
            inputs=[
                MllmBackend.Input("backend", tooltip="From a LoRA.rar MLLM Backend node."),
                io.Image.Input("generated", tooltip="The generated images to judge (a batch)."),
                io.Image.Input("subject_references",
                               tooltip="Reference photos of the subject (a batch, e.g. 3–6); one content "
                               "question per photo, majority vote decides."),
                io.Image.Input("style_reference", tooltip="The single style reference image."),
                io.String.Input("subject_name", default="",
                                tooltip="Optional hint for the judge, e.g. 'corgi dog'. Leave empty to "
                                "judge from the photos alone."),
                io.String.Input("style_name", default="",
                                tooltip="Optional hint for the judge, e.g. 'watercolor'."),
                io.Combo.Input("mode", options=list(judge.MODES), default="yesno",
                               tooltip="yesno: the paper's Yes/No questions, scores are accuracies. "
                               "rubric: 0–100 ratings, scores are mean rating / 100."),
                io.Float.Input("threshold", default=50.0, min=0.0, max=100.0, step=1.0,
                               tooltip="rubric mode only: a rating at or above this counts as yes in "
                               "the report and the grid."),
                io.Boolean.Input("use_cache", default=True,
                                 tooltip="Reuse earlier answers for identical questions and images "
                                 "(stored in ComfyUI's user folder, lorarar/judge_answers.jsonl)."),
            ],
            outputs=[
                io.Float.Output("content", display_name="content",
                                tooltip="Content accuracy (yesno) or mean content rating / 100 (rubric); "
                                "NaN if no answer could be parsed."),
                io.Float.Output("style", display_name="style", tooltip="Style accuracy or mean style rating / 100."),
                io.Float.Output("joint", display_name="joint",
                                tooltip="Share of images correct on both (yesno) or mean of "
                                "min(content, style) rating / 100 (rubric)."),
                io.String.Output("report", display_name="report", tooltip="Every verdict, with vote counts."),
                io.Image.Output("grid", display_name="grid",
                                tooltip="The generated images framed green (correct), red (wrong) or "
                                "grey (unparseable), with their verdicts."),
            ],
        )

    @classmethod
    def execute(cls, backend, generated, subject_references, style_reference, subject_name,
                style_name, mode, threshold, use_cache) -> io.NodeOutput:
        result, jobs = judge.judge_image_batch(
            judge.make_backend(backend), generated, subject_references, style_reference,
            subject=subject_name, style=style_name, mode=mode, threshold=float(threshold),
            cache=_cache() if use_cache else None, progress=_progress(),
        )
        (row,) = result.by_method
        grid = judge.verdict_grid([job.generated for job in jobs], result.records)
        grid_tensor = torch.from_numpy(np.asarray(grid, dtype=np.float32) / 255.0)[None]
        return io.NodeOutput(_score(row, "content", mode), _score(row, "style", mode),
                             _score(row, "joint", mode), judge.text_report(result), grid_tensor)


NODES = [LoraRarMllmBackend, LoraRarMllmJudge]
