"""The MLLM judge nodes inside a real ComfyUI, asking a real loopback judge server.

Images enter through core Load Image, the judge's answers come back through core Preview Any.
The judge server (tests/support/judge) is a deterministic "vision model": it says Yes to a
content question when the reference colour matches the generated image's left half and to a
style question when it matches the right half — so the scores depend on the pixels ComfyUI
actually sent.
"""

from __future__ import annotations

import pytest
from PIL import Image

from tests.support.judge.server import JudgeServer, colour_judge

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

RED, BLUE, GREEN = (200, 40, 40), (40, 40, 200), (40, 200, 40)


def write_png(path, left, right=None, size=(96, 64)):
    image = Image.new("RGB", size, left)
    if right is not None:
        image.paste(Image.new("RGB", (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    image.save(path)
    return path.name


@pytest.fixture(scope="module")
def judge_inputs(comfy_server):
    folder = comfy_server.base_dir / "input"
    return {
        "match": write_png(folder / "lorarar_gen_match.png", RED, BLUE),
        "wrong_subject": write_png(folder / "lorarar_gen_wrong_subject.png", GREEN, BLUE),
        "subject": write_png(folder / "lorarar_subject_ref.png", RED),
        # A second, not byte-identical photo of the subject (identical questions are asked once).
        "subject2": write_png(folder / "lorarar_subject_ref2.png", (RED[0] + 6, RED[1], RED[2])),
        "style": write_png(folder / "lorarar_style_ref.png", BLUE),
    }


def judge_prompt(url: str, generated: str, inputs: dict) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": generated}},
        "2": {"class_type": "LoadImage", "inputs": {"image": inputs["subject"]}},
        "3": {"class_type": "LoadImage", "inputs": {"image": inputs["style"]}},
        "12": {"class_type": "LoadImage", "inputs": {"image": inputs["subject2"]}},
        # Two subject references: the content verdict is a majority over them.
        "4": {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["12", 0]}},
        "5": {"class_type": "LoraRarMllmBackend", "inputs": {
            "protocol": "openai", "url": url, "model": "colour-judge", "api_key_env": "",
            "api_key_file": "", "concurrency": 2, "timeout": 30.0, "max_retries": 0, "max_tokens": 16}},
        "6": {"class_type": "LoraRarMllmJudge", "inputs": {
            "backend": ["5", 0], "generated": ["1", 0], "subject_references": ["4", 0],
            "style_reference": ["3", 0], "subject_name": "sks dog", "style_name": "watercolor",
            "mode": "yesno", "threshold": 50.0, "use_cache": False}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["6", 1]}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["6", 2]}},
        "10": {"class_type": "PreviewAny", "inputs": {"source": ["6", 3]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["6", 4]}},
    }


def shown(entry: dict, node_id: str) -> str:
    return entry["outputs"][node_id]["text"][0]


@pytest.mark.parametrize("case, content, style", [("match", 1.0, 1.0), ("wrong_subject", 0.0, 1.0)])
def test_judge_nodes_score_what_the_judge_saw(comfy_server, judge_inputs, case, content, style):
    with JudgeServer(colour_judge) as judge:
        entry = comfy_server.run_prompt(judge_prompt(judge.url, judge_inputs[case], judge_inputs))
        requests = list(judge.requests)
    # 2 content questions (one per subject reference) + 1 style question, all over HTTP.
    assert len(requests) == 3
    assert all(r.path == "/v1/chat/completions" for r in requests)
    assert float(shown(entry, "7")) == pytest.approx(content)
    assert float(shown(entry, "8")) == pytest.approx(style)
    assert float(shown(entry, "9")) == pytest.approx(min(content, style))
    assert "sks dog" in shown(entry, "10") or "watercolor" in shown(entry, "10")
    assert entry["outputs"]["11"]["images"], "the verdict grid was not previewed"


def test_unreachable_judge_fails_on_the_judge_node(comfy_server, judge_inputs):
    with JudgeServer(colour_judge) as judge:
        url = judge.url  # closed when the block ends: nothing listens there afterwards
    error = comfy_server.run_prompt_expecting_error(judge_prompt(url, judge_inputs["match"], judge_inputs))
    assert error["node_type"] == "LoraRarMllmJudge"
    assert url.split("//", 1)[1] in error["exception_message"] or "127.0.0.1" in error["exception_message"]
