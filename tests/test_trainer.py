"""Hypernetwork trainer on the test UNet: manifest checks, split, exact resume, outputs, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from hypernet.errors import ManifestError, TrainingError
from hypernet.model import HypernetConfig, HyperNetwork, load_hypernet, save_hypernet
from hypernet.training.checkpoint import find_checkpoint
from hypernet.training.injection import linear_layer_shapes
from hypernet.training.manifest import check_loras, load_manifest
from hypernet.training.testmodel import UNetConfig, tiny_base
from hypernet.training.trainer import Trainer, TrainSettings, build_hypernet
from tests.support.training import make_dataset, one_thread  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def base():
    return tiny_base()


def settings(**kw) -> TrainSettings:
    defaults = dict(steps=4, checkpoint_every=2, validate_every=0, validation_draws=1, hidden=16, seed=3)
    return TrainSettings(**{**defaults, **kw})


def test_split_holds_out_subjects_and_styles(tmp_path):
    manifest = load_manifest(make_dataset(tmp_path, subjects=5, styles=4, split={"validation_fraction": 0.4, "seed": 1},
                                          fmt="yaml"))
    train, val = manifest.split()
    val_subjects, val_styles = {a.name for a, _ in val}, {b.name for _, b in val}
    assert len(val_subjects) == 2 and len(val_styles) == 2 and len(val) == 4
    assert not val_subjects & {a.name for a, _ in train}
    assert not val_styles & {b.name for _, b in train}
    assert len(train) == 3 * 2
    assert manifest.summary()["validation_pairs"] == 4


def test_bad_manifest_entries_each_get_one_clear_error(tmp_path, base):
    path = make_dataset(tmp_path)
    data = json.loads(path.read_text())
    data["subjects"][0]["lora"] = "missing.safetensors"
    data["subjects"][1]["images"] = "no_such_folder"
    (tmp_path / "empty").mkdir()
    data["subjects"][2]["images"] = "empty"
    del data["styles"][0]["prompt"]
    data["split"] = {"validation_subjects": ["nobody"]}
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert "5 problem(s)" in message
    assert "subjects[0] (subj0): LoRA file" in message and "missing.safetensors does not exist" in message
    assert "subjects[1] (subj1): image path" in message and "no_such_folder does not exist" in message
    assert "subjects[2] (subj2): image folder" in message and "contains no images" in message
    assert "styles[0]: missing prompt" in message
    assert "'nobody', which is not a subject" in message


def test_lora_for_other_widths_and_damaged_file_are_reported_together(tmp_path, base):
    path = make_dataset(tmp_path)
    other = make_dataset(tmp_path / "sd15", subjects=1, styles=1, config=UNetConfig(channels=(16, 48, 64)))
    shutil.copy(other.parent / "subj0.safetensors", tmp_path / "subj1.safetensors")
    (tmp_path / "style1.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    manifest = load_manifest(path)
    with pytest.raises(ManifestError) as info:
        check_loras(manifest, linear_layer_shapes(base.unet))
    lines = [line for line in str(info.value).splitlines() if line.startswith("  - ")]
    assert len(lines) == 2
    assert "subjects[1] (subj1)" in lines[0] and "other widths" in lines[0] and "(48, 48)" in lines[0]
    assert "styles[1] (style1)" in lines[1] and "pickle" in lines[1]


# (steps, checkpoint every): the default tier resumes a 2-step run after step 1 (4 training steps
# in all), the slow tier a 4-step run after step 2 (8 steps).
@pytest.mark.parametrize(("steps", "every"), [(2, 1), pytest.param(4, 2, marks=pytest.mark.slow)])
def test_resume_is_bit_exact(tmp_path, dataset, base, steps, every):
    manifest = load_manifest(dataset)
    straight = Trainer(base, manifest, settings(steps=steps, checkpoint_every=every), tmp_path / "a").run()
    first = Trainer(base, manifest, settings(steps=every, checkpoint_every=every), tmp_path / "b").run()
    assert first.step == every
    # a fresh trainer (as after a crash) continues from the checkpoint to the last step
    resumed = Trainer(base, manifest, settings(steps=steps, checkpoint_every=every), tmp_path / "b",
                      resume=tmp_path / "b").run()
    assert resumed.step == steps
    for key, value in straight.hypernet.state_dict().items():
        assert torch.equal(value, resumed.hypernet.state_dict()[key]), key
    lines = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, steps + 1))
    assert find_checkpoint(tmp_path / "b").name == f"step_{steps:06d}"


def test_run_outputs_and_metadata(tmp_path, dataset, base):
    manifest = load_manifest(dataset)
    out = tmp_path / "models" / "lorarar" / "mine.safetensors"
    out.parent.mkdir(parents=True)
    result = Trainer(base, manifest, settings(steps=3, validate_every=2, name="mine"), tmp_path / "run").run(out)
    records = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 3 and all({"total", "content", "style", "cosine", "grad_norm", "pairs"} <= r.keys() for r in train)
    for r in train:
        assert r["total"] == pytest.approx(r["content"] + r["style"] + r["cosine"], rel=1e-5)
        assert tuple(r["pairs"][0]) in {(a.name, b.name) for a, b in manifest.split()[0]}
    validation = [r for r in records if r["kind"] == "validation"]
    assert [v["step"] for v in validation] == [2, 3] and validation[0]["pairs"] == 1
    assert validation[0]["sum"] == validation[1]["sum"]  # fixed draws; the sum does not train
    assert validation[0]["hypernet"] != validation[1]["hypernet"]
    assert validation[0]["sum"]["cosine"] == pytest.approx(0.01 * 44)  # cos(1, 1) = 1 on all 44 layers
    with Image.open(result.plot_path) as im:
        assert im.size == (640, 600)  # two panels: the objective, the input dependence
    loaded = load_hypernet(out)
    assert loaded.widths == (32, 64) and loaded.config.hidden == 16
    extra = loaded.config.extra
    assert extra["steps"] == "3" and json.loads(extra["data"])["train_pairs"] == 4
    assert float(extra["validation_objective_hypernet"]) == pytest.approx(validation[-1]["hypernet"]["total"], rel=1e-5)
    assert "validation_objective_sum" in extra and "test UNet" in extra["base"]
    for key, value in result.hypernet.state_dict().items():
        assert torch.equal(value.float(), loaded.state_dict()[key])


def test_start_from_checkpoint_adds_new_widths(tmp_path):
    official_like = HyperNetwork(HypernetConfig(hidden=16, widths=(64, 1280)))
    save_hypernet(official_like, tmp_path / "official_layout.pth")  # input_1/input_2/output.1 pickle
    init = load_hypernet(tmp_path / "official_layout.pth")
    model = build_hypernet((32, 64), settings(), "test", init)
    assert model.widths == (32, 64, 1280)
    assert torch.equal(model.input["64"].weight, init.input["64"].weight)
    assert torch.equal(model.output[1].weight, init.output[1].weight)
    assert all(p.requires_grad for p in model.parameters())


def test_pairs_per_step_must_divide_over_processes(dataset, base, tmp_path):
    from hypernet.training.ddp import World

    with pytest.raises(TrainingError, match="multiple of the number of processes"):
        Trainer(base, load_manifest(dataset), settings(pairs_per_step=3), tmp_path, World(world_size=2))


def test_cli_train_tiny_and_errors(tmp_path, dataset, capsys, monkeypatch):
    """`python -m hypernet train … --base tiny`, in-process (tests/test_ddp.py runs it as real
    processes under torchrun)."""
    from hypernet.cli import main

    out = tmp_path / "run"
    argv = ["train", str(dataset), "--base", "tiny", "--out", str(out), "--steps", "2", "--hidden", "8",
            "--checkpoint-every", "0", "--validate-every", "0"]
    assert main(argv) == 0
    assert (out / "hypernet.safetensors").is_file() and "validation objective" in capsys.readouterr().out
    assert main(argv) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    normalised = tmp_path / "normalised.safetensors"   # the option is stored in the file the merge reads
    assert main(argv + ["--input-normalisation", "layer_rms", "--output", str(normalised)]) == 0
    assert load_hypernet(normalised).input_normalisation == "layer_rms"
    assert load_hypernet(out / "hypernet.safetensors").input_normalisation == "none"
    assert main(["train", str(dataset), "--base", "tiny", "--out", str(tmp_path / "r1"), "--check-only"]) == 0
    assert not (tmp_path / "r1").exists()
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert main(["train", str(dataset), "--base", "x.safetensors", "--out", str(tmp_path / "r2")]) == 1
    assert "error: COMFYUI_PATH is not set" in capsys.readouterr().err


def test_training_can_start_from_the_official_checkpoint(official_sdxl_path, dataset, base, tmp_path):
    official = load_hypernet(official_sdxl_path)
    trainer = Trainer(base, load_manifest(dataset), settings(steps=1, hidden=128), tmp_path, init_hypernet=official)
    assert trainer.hypernet.widths == (32, 64, 640, 1280)
    assert torch.equal(trainer.hypernet.input["1280"].weight.detach(), official.input["1280"].weight)
    result = trainer.run()
    # the test UNet's widths were trained; the SDXL input layers got no gradient
    assert torch.equal(result.hypernet.input["640"].bias.detach(), official.input["640"].bias)
    assert not torch.equal(result.hypernet.output[1].weight.detach(), official.output[1].weight)


def test_non_finite_objective_stops_training_and_saves_nothing(tmp_path, dataset, base):
    """A base model that outputs NaN must not yield a 'trained' hypernetwork full of NaN."""
    import dataclasses

    def denoise(x, t, cond):
        return base.denoise(x, t, cond) * float("nan")

    broken = dataclasses.replace(base, denoise=denoise)
    out = tmp_path / "nan.safetensors"
    with pytest.raises(TrainingError, match="step 1: the objective is not finite"):
        Trainer(broken, load_manifest(dataset), settings(steps=2, checkpoint_every=0), tmp_path / "run").run(out)
    assert not out.exists()
