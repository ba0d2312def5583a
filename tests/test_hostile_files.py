"""Hostile input (issue 9, items 6-10): damaged and malicious LoRA / hypernetwork files fail with
one LoraRarError naming the file, fast and small; writes leave nothing behind and respect the
user's umask; saving through links follows the documented policy."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hypernet import lora as lora_mod
from hypernet.cli import main as cli_main
from hypernet.errors import HypernetError, LoraFormatError, LoraRarError
from hypernet.lora import read_lora
from hypernet.model import HypernetConfig, HyperNetwork, load_hypernet, official_state_dict, save_hypernet
from hypernet.nodelogic import lora as node_lora
from hypernet.safetensors_io import STALE_DEAD_WRITER_S, STALE_TEMP_S, atomic_write, remove_stale_temp_files
from hypernet.tooling import synthetic
from tests.support.files import write_lora

REPO = Path(__file__).resolve().parents[1]
P = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_"


def _raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _good_pair():
    g = torch.Generator().manual_seed(0)
    return {f"{P}to_q.lora_up.weight": torch.randn(640, 4, generator=g),
            f"{P}to_q.lora_down.weight": torch.randn(4, 640, generator=g)}


# ----------------------------------------------------------------------------- item 6: alpha

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_alpha_is_refused_like_any_other_tensor(tmp_path, bad):
    sd = {**_good_pair(), f"{P}to_q.alpha": torch.tensor(bad)}
    with pytest.raises(LoraFormatError, match=r"nan_alpha\.safetensors: layer .*attn1\.to_q: alpha is"):
        read_lora(write_lora(tmp_path / "nan_alpha.safetensors", sd))
    # the node path parses without the value scan; alpha is checked there too
    with pytest.raises(LoraFormatError, match="alpha is"):
        lora_mod.lora_from_state_dict(sd, source="node input")


# ----------------------------------------------------------------------------- item 7: memory

@pytest.mark.parametrize("factors", [
    {"lokr_w1_a": (20000, 1), "lokr_w1_b": (1, 20000), "lokr_w2": (2, 2)},          # kron → 40000²
    {"hada_w1_a": (30000, 1), "hada_w1_b": (1, 30000), "hada_w2_a": (30000, 1), "hada_w2_b": (1, 30000)},
    {"lora_up.weight": (100000, 1), "lora_down.weight": (1, 100000), "dora_scale": (100000, 1)},
])
def test_small_files_cannot_ask_for_gigabytes(tmp_path, factors):
    sd = {f"{P}to_q.{role}": torch.ones(shape) * 0.01 for role, shape in factors.items()}
    path = write_lora(tmp_path / "bomb.safetensors", sd)
    assert path.stat().st_size < 2_000_000
    before, started = _peak_rss_mb(), time.perf_counter()
    with pytest.raises(LoraFormatError, match=r"bomb\.safetensors: layer .*at most 67,108,864 are accepted"):
        read_lora(path)
    assert time.perf_counter() - started < 5
    assert _peak_rss_mb() - before < 400  # expanding would have needed 3.6-40 GB


def test_many_capped_layers_cannot_add_up_to_more_than_sdxl(tmp_path):
    one = {"lokr_w1_a": torch.ones(8192, 1), "lokr_w1_b": torch.ones(1, 8192), "lokr_w2": torch.ones(1, 1)}  # 2^26 each
    sd = {f"lora_unet_input_blocks_4_1_transformer_blocks_{i}_attn1_to_q.{role}": t.clone()
          for i in range(65) for role, t in one.items()}
    with pytest.raises(LoraFormatError, match=r"many\.safetensors: its layers without a low-rank form describe more than"):
        read_lora(write_lora(tmp_path / "many.safetensors", sd))
    sd = {k: v for k, v in sd.items() if "blocks_64_" not in k}  # 64 × 2^26 = 2^32: exactly allowed
    assert len(read_lora(write_lora(tmp_path / "ok.safetensors", sd)).layers) == 64


def test_a_pth_hypernetwork_with_stride_0_tensors_fails_fast_and_small(tmp_path):
    sd = official_state_dict(HyperNetwork(HypernetConfig()))
    sd["input_1.weight"] = torch.zeros(1).expand(150000, 1280)  # 1 stored float, 192 M claimed
    sd["input_1.bias"] = torch.zeros(1).expand(150000)
    path = tmp_path / "stride0.pth"
    torch.save(sd, path)
    before, started = _peak_rss_mb(), time.perf_counter()
    with pytest.raises(HypernetError, match=r"stride0\.pth: input_1\.weight claims 192,000,000 elements"):
        load_hypernet(path)
    assert time.perf_counter() - started < 5 and _peak_rss_mb() - before < 200


def test_hypernetwork_metadata_claiming_a_huge_hidden_size_is_refused_before_building(tmp_path):
    model = HyperNetwork(HypernetConfig(hidden=8))
    meta = {**model.config.to_metadata(), "hidden": "150000"}
    save_file(dict(model.state_dict()), str(tmp_path / "huge.safetensors"), meta)
    before, started = _peak_rss_mb(), time.perf_counter()
    with pytest.raises(HypernetError, match=r"huge\.safetensors: this hypernetwork asks for hidden 150000"):
        load_hypernet(tmp_path / "huge.safetensors")
    assert time.perf_counter() - started < 5 and _peak_rss_mb() - before < 200
    # within the caps but not what the tensors are: refused from the header, nothing built
    save_file(dict(model.state_dict()), str(tmp_path / "lies.safetensors"), {**meta, "hidden": "4096"})
    with pytest.raises(HypernetError, match="tensors do not match its metadata"):
        load_hypernet(tmp_path / "lies.safetensors")


# ----------------------------------------------------------------------------- item 8: one error type

DATA = bytes(range(16))


@pytest.mark.parametrize("header, data, message", [
    (b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}", b"", "not valid JSON"),                 # deep nesting
    (b'{"x":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}', DATA, "not valid JSON"),
    ({"x": {"dtype": "F32", "shape": [2 ** 70], "data_offsets": [0, 16]}}, DATA, "shape must be"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": 5}}, DATA, "data_offsets must be two integers"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": []}}, DATA, "data_offsets must be two integers"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}, DATA, "data_offsets must be two integers"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}}, DATA, "data_offsets must be two integers"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [True, 16]}}, DATA, "data_offsets must be two integers"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, DATA, "truncated or corrupt"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 10 ** 12]}}, DATA, "truncated or corrupt"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, DATA, "needs 12 bytes"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, DATA, "without gaps or overlaps"),
    ({"x": {"dtype": "F4", "shape": [4], "data_offsets": [0, 16]}}, DATA, "dtype 'F4' is not one"),
    ({"x": {"shape": [4], "data_offsets": [0, 16]}}, DATA, "lacks dtype"),
    ({"x": [1, 2]}, DATA, "expected an entry"),
    ({"__metadata__": ["not", "a", "dict"]}, b"", "__metadata__ must map names to strings"),
    ({"__metadata__": {"ss_network_dim": 8}}, b"", "__metadata__ must map names to strings"),
    (b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}',
     DATA, "the key 'x' appears twice"),
    (b'{"x":{"dtype":"F32","dtype":"F16","shape":[4],"data_offsets":[0,16]}}', DATA, "the key 'dtype' appears twice"),
    (b'[1, 2, 3]', b"", "expected a JSON object"),
    (b'{"x": NaN}', b"", "not valid JSON"),
    (b"\xff\xfe{}", b"", "not UTF-8"),
])
def test_malformed_headers_are_one_clear_error(tmp_path, header, data, message):
    path = _raw_safetensors(tmp_path / "hostile.safetensors", header, data)
    with pytest.raises(LoraFormatError, match=rf"hostile\.safetensors.*{message}"):
        read_lora(path)


@pytest.mark.parametrize("tensors, message", [
    ({"to_q.alpha": torch.ones(2)}, "alpha must be one real number"),
    ({"to_q.alpha": torch.tensor(True)}, "alpha must be one real number"),
    ({"to_q.lora_up.weight": torch.tensor(1.0), "to_q.lora_down.weight": torch.ones(4, 640)}, "a factor needs at least one dimension"),
    ({"to_q.lora_up.weight": torch.ones(640, 4, 1), "to_q.lora_down.weight": torch.ones(4, 640)}, "expected 2-D or 4-D"),
    ({"to_q.lora_up.weight": torch.ones(640, 4).to(torch.float8_e4m3fn), "to_q.lora_down.weight": torch.ones(4, 640)},
     "dtype float8_e4m3fn; LoRA factors must be"),
    ({"to_q.lora_up.weight": torch.ones(640, 4, dtype=torch.bool), "to_q.lora_down.weight": torch.ones(4, 640)}, "dtype bool"),
    ({"to_q.lora_up.weight": torch.ones(640, 4, dtype=torch.int8), "to_q.lora_down.weight": torch.ones(4, 640)}, "dtype int8"),
    ({"to_q.lora_up.weight": torch.ones(640, 0), "to_q.lora_down.weight": torch.ones(0, 640)}, "rank 0 adapts nothing"),
    ({"to_q.lora_up.weight": torch.ones(640, 4, 3, 3), "to_q.lora_down.weight": torch.ones(4, 640, 3, 3)}, "1×1 in its kernel"),
    ({"to_q.hada_w1_a": torch.ones(640, 4), "to_q.hada_w1_b": torch.ones(4, 640),
      "to_q.hada_w2_a": torch.ones(320, 4), "to_q.hada_w2_b": torch.ones(4, 640)}, "two products have different shapes"),
    ({"to_q.hada_w1_a": torch.ones(640, 4), "to_q.hada_w1_b": torch.ones(3, 640),
      "to_q.hada_w2_a": torch.ones(640, 4), "to_q.hada_w2_b": torch.ones(4, 640)}, "do not chain"),
    ({"to_q.hada_w1_a": torch.ones(640, 4), "to_q.hada_w1_b": torch.ones(4, 640), "to_q.hada_t1": torch.ones(4, 4, 3, 3),
      "to_q.hada_w2_a": torch.ones(640, 4), "to_q.hada_w2_b": torch.ones(4, 640)}, "needs both hada_t1 and hada_t2"),
    ({"to_q.lokr_w1_a": torch.ones(8, 2), "to_q.lokr_w1_b": torch.ones(3, 8), "to_q.lokr_w2": torch.ones(80, 80)}, "do not chain"),
    ({"to_q.lokr_w1": torch.ones(8, 8), "to_q.lokr_w2": torch.ones(80, 80, 3)}, "expected 2-D or 4-D"),
    ({"to_q.lokr_w1": torch.ones(8, 8), "to_q.lokr_t2": torch.ones(4, 4, 3, 3), "to_q.lokr_w2_a": torch.ones(4, 80)},
     "incomplete adapter"),
    ({"to_q.lora_up.weight": torch.ones(640, 4), "to_q.lora_down.weight": torch.ones(4, 640),
      "to_q.dora_scale": torch.ones(7)}, "DoRA magnitude"),
])
def test_malformed_layers_are_one_clear_error(tmp_path, tensors, message):
    path = write_lora(tmp_path / "layer.safetensors", {f"{P}{k}": v for k, v in tensors.items()} | (
        {} if any(k.startswith("to_q.lora_") or "hada" in k or "lokr" in k for k in tensors) else _good_pair()))
    with pytest.raises(LoraFormatError, match=rf"layer\.safetensors: layer .*{message}"):
        read_lora(path)


def _our_hypernet(tmp_path, **meta) -> Path:
    model = HyperNetwork(HypernetConfig(hidden=8))
    path = tmp_path / "h.safetensors"
    save_file(dict(model.state_dict()), str(path), {**model.config.to_metadata(), **meta})
    return path


@pytest.mark.parametrize("meta, message", [
    ({"format_version": "abc"}, "format_version must be an integer"),
    ({"widths": "-640,1280"}, "widths must be at least 1"),
    ({"widths": "640,640"}, "a width listed twice"),
    ({"hidden": "eight"}, "hidden must be an integer"),
    ({"hidden": "0"}, "hidden must be at least 1"),
    ({"widths": ",".join(str(w) for w in range(1, 20))}, "input widths"),
])
def test_bad_hypernetwork_metadata_is_one_clear_error(tmp_path, meta, message):
    with pytest.raises(HypernetError, match=rf"h\.safetensors: .*{message}"):
        load_hypernet(_our_hypernet(tmp_path, **meta))


@pytest.mark.parametrize("change, message", [
    (lambda sd: {**sd, 0: sd["input_1.bias"]}, "key 0 is a int"),
    (lambda sd: {**sd, "input_1.weight": [1.0, 2.0]}, "is a list, expected a tensor"),
    (lambda sd: {**sd, "input_1.weight": sd["input_1.weight"].to(torch.int32)}, "dtype int32, expected float16"),
    (lambda sd: {**sd, "input_1.weight": sd["input_1.weight"].to(torch.float8_e4m3fn)}, "dtype float8_e4m3fn"),  # found by the fuzzer
    (lambda sd: {**sd, "output.1.weight": torch.ones(2)}, "output.1 has the wrong shape"),
    (lambda sd: {**sd, "input_1.bias": torch.full((128,), float("nan"))}, "contains NaN or Inf"),
    (lambda sd: [1, 2], "expected a state dict"),
])
def test_bad_official_checkpoints_are_one_clear_error(tmp_path, change, message):
    path = tmp_path / "bad.pth"
    torch.save(change(official_state_dict(HyperNetwork(HypernetConfig()))), path)
    with pytest.raises(HypernetError, match=rf"bad\.pth: .*{message}"):
        load_hypernet(path)


# ----------------------------------------------------------------------------- CLI: one error line

def _small_pair(tmp_path):
    shapes = {"middle_block.1.transformer_blocks.0.attn1.to_q": (1280, 1280),
              "middle_block.1.transformer_blocks.0.attn1.to_k": (1280, 1280)}
    return [write_lora(tmp_path / f"{n}.safetensors", synthetic.to_state_dict(synthetic.random_factors(shapes, 8, s)))
            for s, n in ((1, "content"), (2, "style"))]


def _one_error_line(capsys, rc, *expected):
    """The real CLI main, in process: exit 1 and one `error:` line, no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 1, err
    assert "Traceback" not in err and lines[-1].startswith("error: "), err
    for text in expected:
        assert text in lines[-1], lines[-1]


def test_cli_a_too_long_name_is_one_error_line(tmp_path, capsys):
    content, style = _small_pair(tmp_path)
    out = tmp_path / ("x" * 300 + ".safetensors")
    rc = cli_main(["merge", str(content), str(style), "-o", str(out), "--method", "sum"])
    _one_error_line(capsys, rc, "File name too long")


@pytest.fixture
def file_size_limit():
    """RLIMIT_FSIZE makes writes past 64 kB fail with EFBIG, as a full disk fails with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_cli_a_full_disk_is_one_error_line_and_leaves_nothing(tmp_path, capsys, request):
    content, style = _small_pair(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    request.getfixturevalue("file_size_limit")
    rc = cli_main(["merge", str(content), str(style), "-o", str(out_dir / "m.safetensors"), "--method", "sum"])
    _one_error_line(capsys, rc, "File too large")
    assert not list(out_dir.iterdir())


def test_cli_a_folder_it_cannot_write_is_one_error_line(tmp_path, capsys):
    content, style = _small_pair(tmp_path)
    read_only = Path("/proc/self")  # writable by nobody, root included
    if not read_only.is_dir():
        pytest.skip("needs /proc")
    rc = cli_main(["merge", str(content), str(style), "-o", str(read_only / "m.safetensors"), "--method", "sum"])
    _one_error_line(capsys, rc)


# ----------------------------------------------------------------------------- item 9: leftovers

def test_stale_temp_files_of_ours_are_removed_on_the_next_write(tmp_path):
    now = time.time()

    def leftover(name, age):
        path = tmp_path / name
        path.write_bytes(b"x" * 1000)
        os.utime(path, (now - age, now - age))
        return path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old_style = leftover(f".merged.safetensors.{uuid.uuid4().hex}.tmp", STALE_TEMP_S + 60)
    dead_writer = leftover(f".merged.safetensors.{dead.pid}-{uuid.uuid4().hex}.tmp", STALE_DEAD_WRITER_S + 30)
    fresh = leftover(f".merged.safetensors.{uuid.uuid4().hex}.tmp", 5)
    live_writer = leftover(f".merged.safetensors.{os.getppid()}-{uuid.uuid4().hex}.tmp", STALE_DEAD_WRITER_S + 30)
    dead_but_recent = leftover(f".merged.safetensors.{dead.pid}-{uuid.uuid4().hex}.tmp", 10)
    not_ours = [leftover(".merged.safetensors.tmp", STALE_TEMP_S * 2), leftover("notes.tmp", STALE_TEMP_S * 2),
                leftover(".merged.safetensors.12345.tmp", STALE_TEMP_S * 2)]
    (tmp_path / f".dir.{uuid.uuid4().hex}.tmp").mkdir()  # a folder of that name is not a leftover file

    atomic_write(tmp_path / "report.json", lambda tmp: tmp.write_text("{}"))
    assert not old_style.exists() and not dead_writer.exists()
    assert fresh.exists() and live_writer.exists() and dead_but_recent.exists()
    assert all(p.exists() for p in not_ours) and len(list(tmp_path.glob(".dir.*.tmp"))) == 1
    assert remove_stale_temp_files(tmp_path) == []


def test_fsync_before_the_rename(tmp_path, monkeypatch):
    """A spy around the real os.fsync/os.replace records their order."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").is_dir() else fd))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "out.bin", lambda tmp: tmp.write_bytes(b"data"))
    kinds = [kind for kind, _ in events]
    assert kinds.index("fsync") < kinds.index("replace")
    synced, replaced = events[kinds.index("fsync")][1], events[kinds.index("replace")][1]
    assert not isinstance(synced, str) or synced == replaced  # the temporary file itself was synced


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_s_mode_whatever_the_writer(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        model = HyperNetwork(HypernetConfig(hidden=8))
        ours = save_hypernet(model, tmp_path / "h.safetensors")  # safetensors' save_file creates 0600
        official = save_hypernet(model, tmp_path / "h.pth")
    finally:
        os.umask(old)
    assert stat.S_IMODE(ours.stat().st_mode) == mode
    assert stat.S_IMODE(official.stat().st_mode) == mode


def test_convert_hypernet_respects_the_umask(random_hypernet_pth, tmp_path):
    old = os.umask(0o022)
    try:
        assert cli_main(["convert-hypernet", str(random_hypernet_pth), str(tmp_path / "h.safetensors")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "h.safetensors").stat().st_mode) == 0o644  # was 0600


def test_sigterm_during_a_write_unwinds_like_ctrl_c(tmp_path):
    """The real CLI main, a real SIGTERM arriving while a file is half written."""
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from pathlib import Path
        from hypernet import cli
        from hypernet.safetensors_io import atomic_write

        def slow_write(tmp):
            tmp.write_bytes(b"half of a file")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)

        def command(args):
            atomic_write(Path({str(tmp_path / "out.safetensors")!r}), slow_write)

        parser = cli.build_parser
        def build():
            p = parser()
            p.set_defaults(func=command)
            return p
        cli.build_parser = build
        sys.exit(cli.main([]))
    """)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - started < 30
    assert proc.returncode == 128 + signal.SIGTERM and "terminated" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


# ----------------------------------------------------------------------------- item 10: save prefix

def _merged_sd():
    return synthetic.to_state_dict(synthetic.random_factors({"middle_block.1.proj_in": (1280, 1280)}, 2, 0), alpha=2)


def test_a_link_out_of_the_loras_folder_is_refused(tmp_path):
    loras, outside = tmp_path / "models" / "loras", tmp_path / "elsewhere"
    loras.mkdir(parents=True)
    outside.mkdir()
    (loras / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(LoraRarError, match=r"escape links to .*elsewhere, outside the LoRA folders"):
        node_lora.save_lora_model(_merged_sd(), loras, "escape/sub/merged")
    assert list(outside.iterdir()) == []


def test_links_the_user_made_into_lora_folders_are_followed(tmp_path):
    loras, shared, real_models = tmp_path / "loras", tmp_path / "shared_loras", tmp_path / "drive" / "loras"
    real_models.mkdir(parents=True)
    shared.mkdir()
    loras.symlink_to(real_models, target_is_directory=True)  # the whole folder on another drive
    (real_models / "collection").symlink_to(shared, target_is_directory=True)
    (real_models / "inner").mkdir()
    (real_models / "alias").symlink_to(real_models / "inner", target_is_directory=True)
    path = node_lora.save_lora_model(_merged_sd(), loras, "collection/mine", extra_roots=[shared])
    assert path == loras / "collection" / "mine_00001.safetensors" and (shared / "mine_00001.safetensors").is_file()
    assert node_lora.save_lora_model(_merged_sd(), loras, "alias/x").resolve().parent == real_models / "inner"
    with pytest.raises(LoraRarError, match="outside the LoRA folders"):  # not registered: refused
        node_lora.save_lora_model(_merged_sd(), loras, "collection/mine")


def test_a_broken_link_in_the_prefix_is_refused(tmp_path):
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(LoraRarError, match="gone is a broken link"):
        node_lora.save_lora_model(_merged_sd(), tmp_path, "gone/merged")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("prefix, message", [("a/" * 2000 + "merged", "folders deep"), ("x" * 300, "longer than 200 bytes"),
                                             (("x" * 150 + "/") * 8, "bytes long")])
def test_absurd_prefixes_are_one_clean_error(tmp_path, prefix, message):
    with pytest.raises(LoraRarError, match=message):
        node_lora.save_lora_model(_merged_sd(), tmp_path, prefix)
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_loras_folder_is_a_clean_error():
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    with pytest.raises(LoraRarError, match="filename_prefix: cannot write into"):
        node_lora.save_lora_model(_merged_sd(), "/proc/self", "merged")
