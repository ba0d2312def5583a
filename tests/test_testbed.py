"""The testbed (round 3): the world and its two style regimes, analysis by synthesis, the decoy
suite, LoRAs trained side by side, a micro world end to end in seconds (world → base → judges →
kohya LoRAs that inspect/merge read → both testbed hypernetworks → merge → sampling → judges →
every gate's code path and the benchmark), the demo pair's rule, the bundled files; marked slow:
the tiny world through the CLI, the judge server through `python -m hypernet judge`, the demo."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hypernet.testbed import world as W

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "weights" / "testbed"
needs_bundle = pytest.mark.skipif(not (BUNDLE / "demo.json").is_file(), reason="weights/testbed not bundled")


def _cli(*args, cwd=ROOT, check=True):
    proc = subprocess.run([sys.executable, "-m", "hypernet", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


# -- the world -----------------------------------------------------------------------------------

def test_world_is_deterministic_and_seeds_differ():
    a, b, c = W.World.create(3), W.World.create(3), W.World.create(4)
    assert a.to_json() == b.to_json()
    assert a.to_json()["subjects"] != c.to_json()["subjects"]
    assert a.to_json()["styles"] != c.to_json()["styles"]
    pose = W.Pose(0.1, -0.05, 0.9, 0.2, 7)
    assert np.array_equal(W.render(a.subjects[0], a.styles[0], pose), W.render(b.subjects[0], b.styles[0], pose))
    assert not set(a.test_subjects) & set(a.train_subjects)


def test_world_has_both_style_regimes_and_distinct_identities():
    w = W.World.create(0, 20, 24, 5, 10)
    assert len(w.test_pairs) == 50
    for regime in W.REGIMES:
        assert sum(s.regime == regime for s in w.styles) == 12
        assert sum(w.regime(p[1]) == regime for p in w.test_pairs) == 25   # 25 held-out pairs per regime
    for s in w.styles:
        touched = [f for f in W.FEATURES[:3] if getattr(s, f) != W.CHOICES[f][0]]
        assert bool(touched) == (s.regime == "overlap")
        if s.regime == "overlap":   # overlap styles change the subject's pixels and nothing around it
            assert (s.background, s.outline) == ("white", "none")
        assert (s.scheme != "none") == W.shows_scheme(s.background, s.outline)
    assert len({(s.cls, s.marking) for s in w.subjects}) == 20   # identity survives recolouring styles
    for i, x in enumerate(w.styles):
        assert sum(f != g for f, g in zip(x.signature, W.PLAIN.signature)) >= 2
        for y in w.styles[i + 1:]:
            apart = 2 if x.regime == y.regime == "disjoint" else 1
            assert sum(f != g for f, g in zip(x.signature, y.signature)) >= apart
    unseen = W.held_out_compositions()
    assert 10 < len(unseen) < 60 and not {(s.cls, s.marking, s.body) for s in w.subjects} & unseen
    style_objects = {w.style_object(s.name)[0].attributes[:2] for s in w.styles}
    assert not style_objects & {(s.cls, s.marking) for s in w.subjects}   # a style image shows no subject
    from hypernet.errors import LoraRarError

    with pytest.raises(LoraRarError, match="at most 28 subjects"):
        W.World.create(0, 40, 24)
    with pytest.raises(LoraRarError, match="equal halves"):
        W.World.create(0, 20, 23)


def test_render_any_subject_in_any_style_and_every_attribute_shows():
    w = W.World.create(1, 8, 6, 2, 2)
    rng = np.random.default_rng(0)
    for subject in w.subjects:
        for style in [W.PLAIN, *w.styles]:
            image = W.render(subject, style, W.Pose.random(rng))
            assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    s, pose = w.subjects[0], W.Pose()
    plain = W.render(s, W.PLAIN, pose)
    for variant in (W.Subject("x", s.cls, s.marking, s.body, "black" if s.mark == "white" else "white"),
                    W.Subject("x", s.cls, next(m for m in W.MARKINGS if m != s.marking), s.body, s.mark),
                    W.Subject("x", next(c for c in W.CLASSES if c != s.cls), s.marking, s.body, s.mark),
                    W.Subject("x", s.cls, s.marking, next(h for h in W.HUES if h != s.body), s.mark)):
        # each identity feature moves many pixels (DESIGN §15: large concept signals)
        assert (np.abs(W.render(variant, W.PLAIN, pose).astype(int) - plain).max(-1) > 60).sum() >= 20
    for feature in W.FEATURES[:5]:
        values = {"texture": "none", "background": "white", "outline": "none", feature: W.CHOICES[feature][1]}
        scheme = "blue" if W.shows_scheme(values["background"], values["outline"]) else "none"
        style = W.Style("x", **{feature: W.CHOICES[feature][1]}, scheme=scheme)
        assert (np.abs(W.render(s, style, pose).astype(int) - plain).max(-1) > 30).sum() >= 20, feature


def test_textures_are_regular_distinct_and_survive_pixelation(monkeypatch):
    """Render v3: no texture is random (two poses that differ only in their seed draw the same
    picture), the textures differ from one another on the object, and pixelation keeps them apart."""
    s = W.Subject("x", "box", "dot", "green", "white")
    pose = W.Pose(0.02, -0.03, 1.0, 0.1, 1)
    for effect in W.EFFECTS:
        images = {t: W.render(s, W.Style("x", texture=t, effect=effect), pose).astype(int) for t in W.TEXTURES}
        for t in W.TEXTURES:
            assert np.array_equal(images[t], W.render(s, W.Style("x", texture=t, effect=effect),
                                                      W.Pose(**{**pose.__dict__, "seed": 2})))
        for a, b in [(a, b) for i, a in enumerate(W.TEXTURES) for b in W.TEXTURES[i + 1:]]:
            assert (np.abs(images[a] - images[b]).max(-1) > 30).sum() >= 20, (effect, a, b)
    # the training images are rendered once into the world's folder: a new renderer is a new world
    from hypernet.testbed.build import WorldSettings

    before = WorldSettings().world_key()
    monkeypatch.setattr(W, "RENDER_VERSION", W.RENDER_VERSION + 1)
    assert WorldSettings().world_key() != before


def test_prompts_name_every_attribute_and_drop_groups():
    s, t = W.Subject("o", "kite", "ring", "red", "white"), W.Style("x", "negative", "hatch", "none", "white", "none", "blue")
    assert W.describe_prompt(s, t) == "a red kite with white ring in negative hatched navy style"
    assert W.describe_prompt(s, t, np.array([False, False, True])) == "a kite in negative hatched navy style"
    assert W.describe_prompt(s, W.PLAIN) == "a red kite with white ring"
    from hypernet.testbed.base import MAX_TOKENS, base_vocabulary

    vocabulary = set(base_vocabulary())
    longest = W.Style("x", "negative", "hatch", "pixelate", "checker", "colour", "blue")
    words = W.describe_prompt(s, longest).split()
    assert len(words) <= MAX_TOKENS and set(words) <= vocabulary


def test_interrupted_pretraining_resumes_to_the_same_model(tmp_path, monkeypatch):
    """The base's pretraining checkpoints its whole state; a run cut off after a checkpoint and
    started again ends with the weights and losses of one uninterrupted run."""
    import hypernet.testbed.base as B

    torch.set_num_threads(1)
    whole = B.TestbedBase(B.BaseConfig.tiny())
    losses = B.pretrain(whole, 4, 2)
    checkpoint, calls, real = tmp_path / "resume.pt", [], B.pretraining_batch

    def cut_off(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(B, "pretraining_batch", cut_off)
    with pytest.raises(KeyboardInterrupt):
        B.pretrain(B.TestbedBase(B.BaseConfig.tiny()), 4, 2, checkpoint=checkpoint, checkpoint_every=2)
    assert checkpoint.is_file()
    monkeypatch.setattr(B, "pretraining_batch", real)
    resumed = B.TestbedBase(B.BaseConfig.tiny())
    assert np.allclose(B.pretrain(resumed, 4, 2, checkpoint=checkpoint, checkpoint_every=2), losses)
    assert all(torch.equal(p, q) for p, q in zip(whole.unet.parameters(), resumed.unet.parameters()))
    assert not checkpoint.exists()


# -- the judges' analysis by synthesis and the decoys ---------------------------------------------

def _reading(subject: W.Subject, style: W.Style) -> dict:
    from hypernet.testbed.judges import SUBJECT_HEADS

    return {**dict(zip(SUBJECT_HEADS, subject.attributes)), **{f: getattr(style, f) for f in W.FEATURES}}


def test_analysis_by_synthesis_explains_renders_and_not_blends():
    """With the right reading, the renderer reproduces a render (residual ≈ 0, the pose search finds
    a shifted pose); a blend of two subjects or another marking leaves a large residual."""
    from hypernet.testbed.judges import JudgeNet, Judges

    judges = Judges(JudgeNet(4))
    w = W.World.create(0)
    x, z = w.subjects[0], w.subjects[1]
    style, pose = w.styles[0], W.Pose(0.04, -0.03, 1.0, 0.1, 3)
    image = W.render(x, style, pose)
    exact, _ = judges.explain(image, _reading(x, style), pose)
    assert exact[0] < 0.01 and exact[1] < 0.03 and abs(exact[3] - 1) < 0.05
    near, found = judges.explain(image, _reading(x, style), W.Pose(0.0, 0.0, 1.0, 0.1, 3))
    assert near[0] < 0.03 and abs(found.dx - 0.04) < 0.03
    blend = ((W.render(x, style, pose).astype(np.float32) + W.render(z, style, W.Pose(-0.05, 0.05))) / 2).astype(np.uint8)
    assert judges.explain(blend, _reading(x, style), pose)[0][0] > 5 * max(exact[0], 0.005)
    # a marking other than the one read: the worst window shows it even where the mean barely moves
    other = W.Subject("x", x.cls, next(m for m in W.MARKINGS if m != x.marking), x.body, x.mark)
    assert judges.explain(W.render(other, style, pose), _reading(x, style), pose)[0][1] > 0.15
    from hypernet.testbed.decoys import _blur_images

    blurred = judges.explain(_blur_images(image[None], 2.5)[0], _reading(x, style), pose)[0]
    assert blurred[3] < 0.7   # a heavy blur keeps the colours, not the edges


def test_decoys_are_deterministic_and_every_kind_differs_from_the_subject():
    from hypernet.errors import LoraRarError
    from hypernet.testbed.decoys import KINDS, false_subject_rate, make_decoys

    w = W.World.create(0)
    for kind in KINDS:
        images, imitated = make_decoys(w, kind, 4, seed=1)
        again, _ = make_decoys(w, kind, 4, seed=1)
        assert images.shape == (4, 32, 32, 3) and np.array_equal(images, again)
        assert len(imitated) == 4
    with pytest.raises(LoraRarError, match="unknown decoy kind"):
        make_decoys(w, "nothing", 1)
    names = [s.name for s in w.subjects]
    assert false_subject_rate([names[0], "other"], [names[0], names[0]], w) == 0.5
    assert false_subject_rate([names[3], "not recognisable"], [None, None], w) == 0.5


# -- LoRAs trained side by side --------------------------------------------------------------------

def test_stacked_loras_do_not_depend_on_their_batch_mates():
    from hypernet.testbed.base import BaseConfig, TestbedBase
    from hypernet.testbed.loras import LoraJob, StackSettings, train_stacked

    model = TestbedBase(BaseConfig.tiny())
    rng = np.random.default_rng(0)
    w = W.World.create(0)
    jobs = [LoraJob(f"j{i}", (W.render(w.subjects[i], W.PLAIN, W.Pose.random(rng)),), f"a sks{i} ball", 10 + i)
            for i in range(3)]
    settings = StackSettings(rank=2, steps=3, per_lora_batch=2)
    torch.set_num_threads(1)
    ab = train_stacked(model, jobs[:2], settings)
    ac = train_stacked(model, [jobs[0], jobs[2]], settings)
    for name, (up, down) in ab[0][0].items():
        assert torch.allclose(up, ac[0][0][name][0], atol=1e-5) and torch.equal(down, ac[0][0][name][1])
    assert any(not torch.allclose(ab[1][0][n][0], ac[1][0][n][0]) for n in ab[1][0])
    assert any(up.abs().sum() > 0 for up, _ in ab[0][0].values())   # it trained (up starts at zero)


# -- a micro world end to end (default run: seconds) --------------------------------------------

def _micro_settings():
    """The smallest world the pipeline runs on; checks plumbing, not quality."""
    from hypernet.testbed.build import BaseSettings, HypernetSettings, WorldSettings
    from hypernet.testbed.judges import JudgeSettings
    from hypernet.testbed.loras import StackSettings

    s = WorldSettings.tiny()
    s.subjects, s.styles, s.test_subjects, s.test_styles, s.subject_images, s.reference_images = 4, 6, 1, 2, 2, 1
    s.gate_pairs = 1
    s.lora = StackSettings(rank=2, steps=2, per_lora_batch=1)
    s.judges = JudgeSettings(steps=2, batch=8, width=4, calibration_images=8, sample_prompts=4, sample_per_prompt=1,
                             sample_steps=1, sample_min_group=1)
    s.base = BaseSettings(samples=16, batch=8)
    s.hypernet = HypernetSettings(steps=1, hidden=4, pairs_per_step=1, dev_subjects=1, dev_styles=2,
                                  validation_draws=1, validate_every=0, early_stop=False, init="sum")
    return s


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from hypernet.testbed.build import build_world

    torch.set_num_threads(1)
    return build_world(_micro_settings(), tmp_path_factory.mktemp("micro"))


def test_pipeline_end_to_end(micro, tmp_path, capsys):
    from hypernet.cli import main
    from hypernet.lora import read_lora
    from hypernet.merge import merge
    from hypernet.model import load_hypernet
    from hypernet.testbed.bench import merged_patches
    from hypernet.testbed.build import build_world

    w = micro.world
    for name in [s.name for s in w.subjects + w.styles] + [f"{a}__{b}" for a, b in w.test_pairs + micro.gate_pairs]:
        lora = read_lora(micro.lora_path(name))
        assert lora.unet_layers and all(layer.rank == 2 for layer in lora.layers.values())
    assert set(micro.gate_pairs) & set(w.test_pairs) == set()
    assert {w.regime(b) for _, b in micro.gate_pairs} == set(W.REGIMES)
    hs = {row: load_hypernet(path) for row, path in micro.hypernet_paths.items()}
    assert {h.input_normalisation for h in hs.values()} == {"none", "layer_rms"}
    h = hs["lorarar"]
    assert h.config.base_family == "lorarar-testbed" and "NOT an SDXL" in h.config.extra["for"]
    trained = {tuple(p) for p in json.loads(h.config.extra["train_pairs"])}
    dev = {tuple(p) for p in json.loads(h.config.extra["dev_pairs"])}
    assert trained and dev and not trained & set(w.test_pairs) and not dev & set(w.test_pairs)
    assert not {a for a, _ in trained} & {a for a, _ in dev} and not {b for _, b in trained} & {b for _, b in dev}

    subject, style = w.test_pairs[0]
    content_path, style_path = micro.lora_path(subject), micro.lora_path(style)
    assert main(["inspect", str(content_path)]) == 0
    assert "layers" in capsys.readouterr().out.lower()
    out = tmp_path / "rar.safetensors"
    assert main(["merge", str(content_path), str(style_path), "-o", str(out),
                 "--hypernet", str(micro.hypernet_paths["lorarar normalised"])]) == 0
    assert set(read_lora(out).unet_layers) == set(read_lora(content_path).unet_layers)

    model, judges = micro.base(), micro.judges()
    content, style_lora = read_lora(content_path), read_lora(style_path)
    merged, summed = merge(content, style_lora, h, method="lorarar"), merge(content, style_lora, None, method="sum")
    noise = torch.randn((2, 12, 16, 16), generator=torch.Generator().manual_seed(0))
    prompt = [w.pair_prompt(subject, style)] * 2
    images = model.sample(prompt, noise, 2, merged_patches(merged)[0])
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert not np.array_equal(images, model.sample(prompt, noise, 2, merged_patches(summed)[0]))
    verdicts = judges.judge(images, w)
    names = {s.name for s in w.subjects} | {"other", "not recognisable"}
    assert all(v.subject in names for v in verdicts)
    assert all(v.subject == "not recognisable" or v.recognisable for v in verdicts)

    again = build_world(micro.settings, micro.folder.parents[1])  # everything comes from the cache
    assert again.info["timings_this_run_s"]["loras"] < 2 and again.hypernet_paths == micro.hypernet_paths


def test_every_gate_and_the_bench_run_on_the_micro_world(micro, tmp_path):
    """The gates' and the benchmark's code paths (figures meaningless at this size)."""
    from hypernet.testbed import gates
    from hypernet.testbed.bench import BenchSettings, method_rows, run_bench
    from hypernet.testbed.decoys import KINDS

    judges = micro.judges()
    g1 = gates.gate_judges(micro.world, judges, renders=3, decoys=1)
    assert set(g1["decoys"]) == set(KINDS) and "gate 1" in gates.print_gate_judges(g1)
    g2 = gates.gate_base(micro.base(), judges, prompts=1, unseen_prompts=1, per_prompt=1, steps=1)
    assert set(g2["seen compositions"]["attributes"]) == set(gates.HEADS) and "gate 2" in gates.print_gate_base(g2)
    g3 = gates.gate_loras(micro, images=1, steps=1)
    assert set(g3["subjects"]) == {s.name for s in micro.world.subjects} and "gate 3" in gates.print_gate_loras(g3)
    report = run_bench(micro, BenchSettings(images=1, sampling_steps=1, ziplora_steps=1, objective_draws=1,
                                            bootstrap=20), tmp_path / "bench", micro.hypernet_paths)
    rows = [r["method"] for r in report["rows"]]
    assert rows == method_rows(("lorarar", "lorarar normalised"))
    assert rows[:3] == ["content only", "style only", "sum"] and rows[-2:] == ["reference", "oracle"]
    for r in report["rows"]:
        assert not r["errors"], r
        assert set(r["by_regime"]) == set(W.REGIMES) and r["images"] == len(micro.world.test_pairs)
        assert 0 <= r["joint"] <= min(r["content"], r["style"]) + 1e-9
    diag = next(r for r in report["rows"] if r["method"] == "lorarar")["diagnostics"]
    for x in diag.values():   # init="sum", one step of training: H(0) is still ≈ 1, so the merge is near the sum
        assert abs(x["h0_c"] - 1) < 0.1 and abs(x["h0_s"] - 1) < 0.1
        assert x["input_over_bias"] > 0 and 0 <= x["input_effect"] and x["distance_from_sum"] < 0.5
    for name in ("bench.json", "bench.md", "table.png", "samples.png", "verdicts.json"):
        assert (tmp_path / "bench" / name).is_file()
    assert "overlap styles" in (tmp_path / "bench" / "bench.md").read_text() and report["pairs_kind"] == "held-out"
    readme = (tmp_path / "bench" / "readme_table.md").read_text()
    assert readme.count("\n") == len(rows) + 2 and "**both** % [95% CI], disjoint styles" in readme
    g4 = gates.headroom(report)   # gate 4 reads these rows of a benchmark (its own runs on the gate pairs)
    assert set(g4["regimes"]) == set(W.REGIMES) and "gate 4" in gates.print_gate_headroom(g4)
    assert all(0 <= x["sum_joint"] <= 1 for x in g4["regimes"].values())
    # gate 4's own run asks for rows without a hypernetwork: one not trained yet is not opened
    untrained = {"lorarar": tmp_path / "not trained yet.safetensors"}
    own = run_bench(micro, BenchSettings(images=1, sampling_steps=1, bootstrap=20, methods=gates.HEADROOM_ROWS),
                    tmp_path / "headroom", untrained, pairs=micro.gate_pairs[:2])
    assert {r["method"] for r in own["rows"]} <= set(gates.HEADROOM_ROWS) and own["hypernets"] == {}
    assert own["pairs_kind"] == "training-side" and "training-side pairs" in (tmp_path / "headroom" / "bench.md").read_text()


def test_gate3_loras_under_other_settings_train_only_subjects_and_styles(micro):
    """`gate loras --lora-steps/--lora-rank`: a new LoRA cache key, only the subject and style LoRAs
    trained (no per-pair references), the default LoRAs left as they were, the settings recorded."""
    import argparse
    from dataclasses import replace

    from hypernet.cli.testbed import _settings
    from hypernet.testbed import gates
    from hypernet.testbed.build import build_world

    args = argparse.Namespace(tiny=True, world_seed=0, subjects=20, styles=24, lora_steps=900, lora_rank=8,
                              lora_lr=5e-3)
    assert (_settings(args).lora.steps, _settings(args).lora.rank, _settings(args).lora.lr) == (900, 8, 5e-3)
    args.lora_steps = args.lora_rank = args.lora_lr = None
    assert _settings(args).loras_key() == type(micro.settings).tiny().loras_key()

    before = {p.name: p.stat().st_mtime_ns for p in micro.lora_dir.iterdir()}
    settings = replace(micro.settings, lora=replace(micro.settings.lora, steps=3))
    other = build_world(settings, micro.folder.parents[1], hypernet=False, references=False)
    assert other.lora_dir != micro.lora_dir
    w = micro.world
    assert {p.stem for p in other.lora_dir.glob("*.safetensors")} == {s.name for s in w.subjects + w.styles}
    assert {p.name: p.stat().st_mtime_ns for p in micro.lora_dir.iterdir()} == before
    g3 = gates.gate_loras(other, images=1, steps=1)
    assert g3["lora_settings"]["steps"] == 3 and g3["loras"] == str(other.lora_dir)


def test_a_lora_on_disk_is_never_trained_again_and_the_group_size_is_not_in_the_key(micro):
    """Gate 3 then gate 4 train what one build trains: a missing LoRA is trained (alone here), the
    others are left as they are; the group size only sets the speed."""
    from dataclasses import replace

    from hypernet.testbed.build import build_loras

    before = {p.name: p.stat().st_mtime_ns for p in micro.lora_dir.glob("*.safetensors")}
    gone = sorted(before)[1]
    (micro.lora_dir / gone).unlink()
    said = []
    build_loras(micro, micro.base(), lambda stage, done, total: said.append((done, total)))
    after = {p.name: p.stat().st_mtime_ns for p in micro.lora_dir.glob("*.safetensors")}
    assert set(after) == set(before) and after[gone] != before[gone]
    assert {n: t for n, t in after.items() if n != gone} == {n: t for n, t in before.items() if n != gone}
    assert said == [(len(before), len(before))]
    s = micro.settings
    assert replace(s, lora=replace(s.lora, group=3)).loras_key() == s.loras_key()
    assert replace(s, lora=replace(s.lora, steps=s.lora.steps + 1)).loras_key() != s.loras_key()


def test_cli_help_states_the_lora_settings_defaults():
    """The CLI keeps torch out of `--help`, so its help text repeats StackSettings' defaults: they
    must not drift apart (they did once: 300 steps / lr 1e-2 after the defaults became 600 / 5e-3)."""
    from hypernet.cli import build_parser
    from hypernet.testbed.loras import StackSettings

    build = build_parser()._subparsers._group_actions[0].choices["testbed"]._subparsers._group_actions[0].choices["build"]
    helps = {a.dest: a.help for a in build._actions}
    defaults = StackSettings()
    for dest, value in (("lora_steps", defaults.steps), ("lora_rank", defaults.rank), ("lora_lr", defaults.lr)):
        stated = re.search(r"the settings', ([0-9.e+-]+)\)", helps[dest])
        assert stated and float(stated.group(1)) == value, (dest, helps[dest])


def test_sample_grid_spreads_its_pairs_over_each_regime():
    from hypernet.testbed.figures import grid_indices

    regimes = ["overlap", "disjoint"] * 25    # test pairs come subject by subject
    assert grid_indices(regimes, 3) == [0, 24, 48, 1, 25, 49]
    assert grid_indices(["disjoint", "overlap"], 3) == [1, 0] and grid_indices(["overlap"] * 4, 1) == [0]


def test_demo_pair_is_picked_by_the_stated_rule():
    from hypernet.testbed.demo import pick_pair

    pairs = [("a", "x"), ("b", "x"), ("c", "y"), ("d", "y"), ("e", "y")]
    report = {"pairs": pairs, "rows": [{"method": "sum", "joint_per_pair": [0.1, 0.5, 0.2, 0.2, 0.9]},
                                       {"method": "lorarar", "joint_per_pair": [0.4, 0.5, 0.1, 0.3, 0.9]}]}
    # lorarar − sum = [.3, 0, -.1, .1, 0]: median 0 at pairs 1 and 4; the sum nearest its median (0.2) is pair 1
    assert pick_pair(report) == ("b", "x")


# -- a tiny world through the command line (slow) ------------------------------------------------

@pytest.mark.slow
def test_tiny_world_through_the_cli(tmp_path):
    cache = tmp_path / "cache"
    proc = _cli("testbed", "build", "--tiny", "--cache", str(cache))
    assert json.loads(proc.stdout)["test_pairs"] == 4
    gate = _cli("testbed", "gate", "judges", "--tiny", "--cache", str(cache), "--out", str(tmp_path / "g"), check=False)
    assert gate.returncode == 1 and "gate 1" in gate.stdout    # a tiny world's judges cannot pass
    assert json.loads((tmp_path / "g" / "gate_judges.json").read_text())["pass"] is False
    bench = tmp_path / "bench"
    _cli("testbed", "bench", "--tiny", "--cache", str(cache), "--out", str(bench), "--images", "1",
         "--sampling-steps", "1", "--ziplora-steps", "1", "--methods", "sum", "lorarar", "oracle")
    report = json.loads((bench / "bench.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["sum", "lorarar", "oracle"]
    check = _cli("testbed", "judge-check", "--tiny", "--cache", str(cache), "--bench", str(bench), check=False)
    assert json.loads(check.stdout)["agree"] is True
    again = _cli("testbed", "bench", "--tiny", "--cache", str(cache), "--out", str(bench), check=False)
    assert again.returncode == 1 and "--force" in again.stderr


# -- the bundled files and the demo ----------------------------------------------------------

@needs_bundle
def test_bundle_is_small_and_says_what_it_is():
    from hypernet.catalog import find_checkpoint
    from hypernet.errors import HypernetError
    from hypernet.model import load_hypernet

    total = sum(p.stat().st_size for p in BUNDLE.iterdir() if p.is_file())
    assert total <= 10 * 1024 * 1024
    h = load_hypernet(BUNDLE / "hypernet.safetensors")
    assert h.config.base_family == "lorarar-testbed" and "NOT an SDXL" in h.config.extra["for"]
    assert {"world_seed", "train_pairs", "steps"} <= set(h.config.extra)
    assert not set(h.widths) & {640, 1280}
    info = json.loads((BUNDLE / "demo.json").read_text())
    assert info["held_out_pair"] and "median" in info["picked_by"]
    with pytest.raises(HypernetError):
        find_checkpoint("hypernet.safetensors")  # not a catalog name: never offered as SDXL


@needs_bundle
def test_bundled_judges_know_the_bundled_world():
    """The bundled judges on fresh renders of the bundled world (subject and style verdicts)."""
    from hypernet.testbed.judges import Judges

    info = json.loads((BUNDLE / "demo.json").read_text())
    w = W.World.create(info["world_seed"], info["subjects"], info["styles"], info["test_subjects"], info["test_styles"])
    judges = Judges.load(BUNDLE / "judges.safetensors")
    rng = np.random.default_rng(12345)
    items = [(w.subjects[int(rng.integers(len(w.subjects)))], w.styles[int(rng.integers(len(w.styles)))],
              W.Pose.random(rng)) for _ in range(40)]
    subjects, styles = judges.classify(W.render_batch(items), w)
    assert np.mean([p == s.name for p, (s, _, _) in zip(subjects, items)]) >= 0.9
    assert np.mean([p == t.name for p, (_, t, _) in zip(styles, items)]) >= 0.9


@pytest.mark.slow
@needs_bundle
def test_judge_cli_through_classifier_server_matches_direct_classification(tmp_path):
    """`python -m hypernet judge` against the loopback server gives the same accuracies as judging
    the images directly (right and wrong subjects and styles mixed)."""
    from PIL import Image

    from hypernet.testbed.judge_check import direct_accuracies
    from hypernet.testbed.judge_server import ClassifierJudgeServer
    from hypernet.testbed.judges import Judges

    info = json.loads((BUNDLE / "demo.json").read_text())
    w = W.World.create(info["world_seed"], info["subjects"], info["styles"], info["test_subjects"], info["test_styles"])
    judges = Judges.load(BUNDLE / "judges.safetensors")
    rng = np.random.default_rng(7)
    pairs = w.test_pairs[:4]
    gen, refs = tmp_path / "generated", tmp_path / "references"
    for mi, method in enumerate(("good", "mixed")):
        for subject, style in pairs:
            d = gen / method / f"{subject}__{style}"
            d.mkdir(parents=True)
            for k in range(4):
                s = w.subject(subject) if mi == 0 or k % 2 else w.subjects[int(rng.integers(len(w.subjects)))]
                t = w.style(style) if mi == 0 or k < 2 else w.styles[int(rng.integers(len(w.styles)))]
                Image.fromarray(W.render(s, t, W.Pose.random(rng))).save(d / f"{k}.png")
    for subject in {p[0] for p in pairs}:
        d = refs / "subjects" / subject
        d.mkdir(parents=True)
        for k in range(3):
            Image.fromarray(W.render(w.subject(subject), W.PLAIN, W.Pose.random(rng))).save(d / f"{k}.png")
    (refs / "styles").mkdir(parents=True)
    for style in {p[1] for p in pairs}:
        obj, pose = w.style_object(style)
        Image.fromarray(W.render(obj, w.style(style), pose)).save(refs / "styles" / f"{style}.png")
    with ClassifierJudgeServer(judges, w) as server:
        proc = _cli("judge", "--generated", str(gen), "--references", str(refs), "--out", str(tmp_path / "out"),
                    "--url", server.url, "--model", "testbed", "--no-cache")
    via = {r["method"]: r for r in json.loads(proc.stdout)["by_method"]}
    direct = direct_accuracies(judges, gen, w)
    assert set(via) == {"good", "mixed"}
    for method, d in direct.items():
        for aspect in ("content", "style", "joint"):
            assert via[method][f"{aspect}_accuracy"] == pytest.approx(d[aspect]), (method, aspect)
    assert direct["mixed"]["joint"] < direct["good"]["joint"]
    assert server.requests == 2 * len(pairs) * 4 * (3 + 1)


@pytest.mark.slow
@needs_bundle
def test_demo_runs_offline_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "demo"
    proc = _cli("demo", "--output", str(out), "--images", "2", "--steps", "6")
    for name in ("demo.png", "coefficients.png", "merged_lorarar.safetensors", "verdicts.json"):
        assert (out / name).is_file(), name
    verdicts = json.loads((out / "verdicts.json").read_text())["verdicts"]
    assert set(verdicts) == {"ground truth (renderer)", "content LoRA only", "style LoRA only", "sum",
                             "lorarar (testbed H)", "reference (trained on the pair)"}
    assert all(len(v["images"]) == 2 and "subject" in v["images"][0] for v in verdicts.values())
    assert "lorarar (testbed H)" in proc.stdout and "median" in proc.stdout
    from hypernet.lora import read_lora

    assert read_lora(out / "merged_lorarar.safetensors").unet_layers
    again = _cli("demo", "--output", str(out), check=False)
    assert again.returncode == 1 and "--force" in again.stderr
    _cli("demo", "--output", str(out), "--force", "--images", "1", "--steps", "2")
    shutil.rmtree(out)


def test_judges_calibrated_on_the_base_samples(micro):
    """The reject option widened to the base's own drawing: recorded in the judges' file, keyed on
    the base, deterministic, never on gate 2's prompts or a world's tokens; the widening rule on
    stand-in verdicts (every attribute read right, known residuals)."""
    from dataclasses import replace

    from hypernet.testbed import gates
    from hypernet.testbed.build import judges_path
    from hypernet.testbed.judges import HEADS, SUBJECT_HEADS, Judges, Verdict, calibrate_on_samples, calibration_items

    s = micro.settings.judges
    judges = micro.judges()
    cal = judges.thresholds["calibration"]
    assert cal["on"] == "base samples" and cal["base"] == micro.base_path.name and cal["samples"] == 4
    from safetensors import safe_open
    with safe_open(str(micro.judges_path), "pt") as f:
        assert f.metadata()["calibrated_on"] == "base samples"
    root = micro.judges_path.parent.parent
    assert judges_path(root, s, micro.base_path) == micro.judges_path
    assert judges_path(root, s, micro.base_path.with_name("other.safetensors")) != micro.judges_path
    assert judges_path(root, replace(s, calibrate_on="renders")) != micro.judges_path
    with pytest.raises(W.TestbedError):
        judges_path(root, s)
    avoid = gates.gate2_prompts()
    items = calibration_items(replace(s, sample_prompts=200), avoid)
    prompts = [W.describe_prompt(a, b) for a, b in items]
    assert prompts == [W.describe_prompt(a, b) for a, b in calibration_items(replace(s, sample_prompts=200), avoid)]
    assert not set(prompts) & avoid and not any(re.search(r"\b(sks|sty)\d", p) for p in prompts)
    assert not {(a.cls, a.marking, a.body) for a, _ in items} & W.held_out_compositions()

    class Model:   # stands in for the base: renders of the prompts' truth
        def sample(self, prompts, noise, steps):
            assert len(noise) == len(prompts) == 2 * len(items_)
            return np.zeros((len(prompts), W.SIZE, W.SIZE, 3), np.uint8)

    class Reader(Judges):  # reads every attribute right; subject residuals 0.00, 0.01, ...
        def judge(self, images, world=None):
            out = []
            for i, (a, b) in enumerate([x for x in items_ for _ in range(2)]):
                attrs = {**dict(zip(SUBJECT_HEADS, a.attributes)), **{f: getattr(b, f) for f in W.FEATURES}}
                if i == 0:
                    attrs["class"] = None   # read wrong: not counted
                out.append(Verdict(attrs, {h: 1.0 for h in HEADS}, W.Pose(0, 0, 1, 0, 0), 0.01 * i, 0.5, 0.0, 0.9, False))
            return out
    settings = replace(s, sample_prompts=30, sample_per_prompt=2, sample_min_group=5, sample_quantile=0.9)
    items_ = calibration_items(settings)
    render = {"subject_residual": {"all": 0.05, "none/none": 0.05}, "local_residual": {"all": 0.3},
              "detail_ratio": {"all": 0.95}}
    reader = Reader(judges.net, {k: dict(v) for k, v in render.items()})
    got = calibrate_on_samples(reader, Model(), settings, base_name="b")
    assert got["read_right"] == 59 and got["right_counts"]["all"] == 59   # the first one is read wrong
    assert reader.thresholds["subject_residual"]["all"] == pytest.approx(np.quantile(0.01 * np.arange(1, 60), 0.9))
    assert reader.thresholds["local_residual"]["all"] == 0.5 and reader.thresholds["detail_ratio"]["all"] == 0.9
    for g, n in got["right_counts"].items():   # a small group keeps its render thresholds (or none)
        if n < 5:
            assert reader.thresholds["subject_residual"].get(g) == render["subject_residual"].get(g)
    assert got["from_renders"] == render and reader.thresholds["calibration"] is got
