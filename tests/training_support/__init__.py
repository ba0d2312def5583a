"""Helpers for the training tests: a tiny data set (LoRAs, images, manifest) on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hypernet.training.testmodel import UNetConfig, build_unet, random_lora


def make_dataset(root: Path, subjects: int = 3, styles: int = 3, images_per_subject: int = 2,
                 config: UNetConfig | None = None, split: dict | None = None, fmt: str = "json") -> Path:
    """LoRAs for the test UNet, random images, and a manifest; returns the manifest path."""
    root.mkdir(parents=True, exist_ok=True)
    unet = build_unet(config or UNetConfig.tiny())
    rng = np.random.default_rng(0)
    subject_entries, style_entries = [], []
    for i in range(subjects):
        save_file(random_lora(unet, 4, 10 + i), str(root / f"subj{i}.safetensors"))
        folder = root / f"subj{i}"
        folder.mkdir(exist_ok=True)
        for k in range(images_per_subject):
            Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8)).save(folder / f"{k}.png")
        subject_entries.append({"name": f"subj{i}", "lora": f"subj{i}.safetensors", "images": f"subj{i}",
                                "prompt": f"a photo of sks{i} dog", "class_word": "dog"})
    for i in range(styles):
        save_file(random_lora(unet, 4, 20 + i), str(root / f"style{i}.safetensors"))
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"style{i}.png")
        style_entries.append({"name": f"style{i}", "lora": f"style{i}.safetensors", "images": f"style{i}.png",
                              "prompt": f"a cat in style{i} style", "style_name": f"style{i}"})
    data = {"subjects": subject_entries, "styles": style_entries,
            "split": split if split is not None else {"validation_subjects": [f"subj{subjects - 1}"],
                                                      "validation_styles": [f"style{styles - 1}"]}}
    path = root / f"manifest.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(data, indent=1))
    else:
        import yaml

        path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def one_thread():
    """The training tests run many tiny kernels: one intra-op thread is several times faster than
    two on a busy 2-core machine (thread hand-off dominates). Import this into a test module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
