"""Mutation fuzzing of the file readers: LoRAs of every key layout, model family and adapter kind,
and hypernetwork checkpoints. Each case mutates one real-shaped seed file (bytes, header JSON or
tensors) and reads it; the only acceptable outcomes are success or a LoraRarError. Anything else
is a bug, reported with the case that produced it.

`python -m hypernet.tooling.fuzzing --cases N --seed S [--json]` (also `benchmarks/fuzz_reader.py`)
prints: cases, successes, clean errors, other exceptions, peak memory, slowest case.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import naming
from ..errors import LoraRarError
from . import synthetic

# Real SDXL layers, few enough that a case takes milliseconds: a 640-wide self-attention, a
# cross-attention key (2048-wide context), a 1280-wide one, and one layer of each text encoder.
SEED_LAYERS = {
    "input_blocks.4.1.transformer_blocks.0.attn1.to_q": (640, 640),
    "input_blocks.4.1.transformer_blocks.0.attn2.to_k": (640, 2048),
    "middle_block.1.transformer_blocks.0.attn1.to_out.0": (1280, 1280),
    "te1.text_model.encoder.layers.0.self_attn.q_proj": (768, 768),
    "te2.text_model.encoder.layers.0.mlp.fc2": (1280, 5120),
}
UNET_SEED_LAYERS = {k: v for k, v in SEED_LAYERS.items() if not naming.is_text_encoder(k)}
_EXPAND_LIMIT = 1 << 22  # after a successful read, expand layers up to this size to prove they work


def _lycoris_seed(rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    p = "lora_unet_input_blocks_4_1_transformer_blocks_0_"
    return {
        f"{p}attn1_to_q.hada_w1_a": rnd(640, rank), f"{p}attn1_to_q.hada_w1_b": rnd(rank, 640),
        f"{p}attn1_to_q.hada_w2_a": rnd(640, rank), f"{p}attn1_to_q.hada_w2_b": rnd(rank, 640),
        f"{p}attn1_to_q.alpha": torch.tensor(1.0),
        f"{p}attn1_to_k.lokr_w1": rnd(8, 8), f"{p}attn1_to_k.lokr_w2_a": rnd(80, rank),
        f"{p}attn1_to_k.lokr_w2_b": rnd(rank, 80), f"{p}attn1_to_k.alpha": torch.tensor(2.0),
        f"{p}attn1_to_v.diff": rnd(640, 640), f"{p}attn1_to_v.diff_b": rnd(640),
        f"{p}attn1_to_out_0.lora_up.weight": rnd(640, rank), f"{p}attn1_to_out_0.lora_down.weight": rnd(rank, 640),
        f"{p}attn1_to_out_0.dora_scale": rnd(640, 1).abs(),
        "lora_unet_input_blocks_4_0_in_layers_2.lora_up.weight": rnd(640, rank, 1, 1),
        "lora_unet_input_blocks_4_0_in_layers_2.lora_mid.weight": rnd(rank, rank, 3, 3),
        "lora_unet_input_blocks_4_0_in_layers_2.lora_down.weight": rnd(rank, 320, 1, 1),
        "lora_unet_input_blocks_5_1_transformer_blocks_0_attn1_to_q.hada_w1_a": rnd(rank, 640),
        "lora_unet_input_blocks_5_1_transformer_blocks_0_attn1_to_q.hada_w1_b": rnd(rank, 640),
        "lora_unet_input_blocks_5_1_transformer_blocks_0_attn1_to_q.hada_t1": rnd(rank, rank, 1, 1),
        "lora_unet_input_blocks_5_1_transformer_blocks_0_attn1_to_q.hada_w2_a": rnd(rank, 640),
        "lora_unet_input_blocks_5_1_transformer_blocks_0_attn1_to_q.hada_w2_b": rnd(rank, 640),
        "lora_unet_input_blocks_5_1_transformer_blocks_0_attn1_to_q.hada_t2": rnd(rank, rank, 1, 1),
    }


# The other families' key layouts, at a small width (the families are told by names and
# proportions): each trainer's form once, the slices of fused weights among them.
FAMILY_WIDTH = 16


def _factors(rng: torch.Generator, modules: dict[str, tuple[int, int]], up: str, down: str,
             alpha: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for key, (rows, cols) in modules.items():
        out[key + up] = torch.randn(rows, 2, generator=rng) * 0.05
        out[key + down] = torch.randn(2, cols, generator=rng) * 0.05
        if alpha:
            out[key + ".alpha"] = torch.tensor(2.0)
    return out


def _family_seeds() -> list[tuple[str, dict[str, torch.Tensor]]]:
    w, g = FAMILY_WIDTH, torch.Generator().manual_seed(2)
    kohya, peft = (".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")
    return [
        ("flux_kohya_fused", _factors(g, {"lora_unet_double_blocks_0_img_attn_qkv": (3 * w, w),
                                          "lora_unet_single_blocks_0_linear1": (7 * w, w),
                                          "lora_unet_single_blocks_0_linear2": (w, 5 * w)}, *kohya, alpha=True)),
        ("flux_diffusers_slices", _factors(g, {"transformer.transformer_blocks.0.attn.to_q": (w, w),
                                               "transformer.transformer_blocks.0.attn.to_v": (w, w),
                                               "transformer.transformer_blocks.0.attn.add_k_proj": (w, w),
                                               "transformer.single_transformer_blocks.0.proj_mlp": (4 * w, w),
                                               "transformer.single_transformer_blocks.0.attn.to_q": (w, w),
                                               "transformer.norm_out.linear": (2 * w, w)}, *peft)),
        ("flux_xlabs", _factors(g, {"double_blocks.0.processor.qkv_lora1": (3 * w, w),
                                    "single_blocks.0.processor.qkv_lora": (3 * w, w),
                                    "single_blocks.0.processor.proj_lora": (w, 5 * w)}, ".up.weight", ".down.weight")),
        ("sd3_diffusers", _factors(g, {"transformer.transformer_blocks.0.attn.to_q": (w, w),
                                       "transformer.transformer_blocks.0.attn.add_q_proj": (w, w),
                                       "transformer.transformer_blocks.0.norm1_context.linear": (6 * w, w),
                                       "transformer.transformer_blocks.0.ff_context.net.0.proj": (4 * w, w)}, *peft)),
        ("qwen_diffsynth", _factors(g, {"transformer_blocks.30.attn.to_q": (w, w),
                                        "transformer_blocks.30.attn.to_add_out": (w, w),
                                        "transformer_blocks.30.img_mlp.net.0.proj": (4 * w, w)}, *peft)),
        ("zimage_aitoolkit", _factors(g, {"diffusion_model.layers.0.attention.to_q": (w, w),
                                          "diffusion_model.layers.0.attention.to_k": (w, w),
                                          "diffusion_model.layers.0.attention.to_out.0": (w, w)}, *peft)),
        ("wan_musubi", _factors(g, {"lora_unet_blocks_0_self_attn_q": (w, w), "lora_unet_blocks_0_cross_attn_o": (w, w),
                                    "lora_unet_blocks_0_ffn_0": (3 * w, w)}, *kohya, alpha=True)),
        ("sdxl_save_attn_procs", _factors(g, {
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora": (640, 640),
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora": (640, 2048)},
            ".up.weight", ".down.weight")),
    ]


def _cloneofsimo_seed() -> dict[str, torch.Tensor]:
    """A cloneofsimo `lora` file: SD1.5's 144 attention/GEGLU modules and CLIP-L's 48 by position,
    rank 1 (it must be complete: the format is read only where every position fits)."""
    from ..families import cloneofsimo, get

    spec = get("sd15")
    g = torch.Generator().manual_seed(3)
    table, vocabulary = spec.table(), spec.vocabularies["diffusers"]
    out = {}
    for index, path in enumerate(cloneofsimo._unet_modules(spec.unet, geglu_first=True)):
        mapping = next(m for m in vocabulary.lookup(path) if m.regex.match(path))
        rows, cols = table[mapping.target.format(**mapping.regex.match(path).groupdict())][:2]
        out[f"unet:{index}:up"] = (torch.randn(rows, 1, generator=g) * 0.05).half()
        out[f"unet:{index}:down"] = (torch.randn(1, cols, generator=g) * 0.05).half()
    for index in range(48):
        out[f"text_encoder:{index}:up"] = (torch.randn(768, 1, generator=g) * 0.05).half()
        out[f"text_encoder:{index}:down"] = (torch.randn(1, 768, generator=g) * 0.05).half()
    out["<s1>"] = torch.zeros(768)  # a textual-inversion embedding beside the layers
    return out


@dataclass
class Seed:
    name: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    kind: str = "lora"                 # "lora", "peft" (with adapter_config.json), "hypernet", "pth"
    sidecar: dict | None = None        # adapter_config.json for "peft"


def seeds() -> list[Seed]:
    """One small real-shaped file per key layout and adapter kind, and both hypernet formats."""
    result = []
    factors = synthetic.random_factors(SEED_LAYERS, 2, seed=0)
    for layout in synthetic.KEY_LAYOUTS:
        result.append(Seed(layout, synthetic.to_state_dict(factors, layout, alpha=1.0 if layout.startswith("kohya") else None)))
    kohya = synthetic.to_state_dict(factors, "kohya", alpha=2.0)
    result.append(Seed("kohya_int64_alpha", {k: (torch.tensor(2) if k.endswith(".alpha") else v) for k, v in kohya.items()}))
    settings = {c: synthetic.peft_lora_config(r=2, lora_alpha=4, rank_pattern={"attn2.to_k": 2},
                                              alpha_pattern={"attn1.to_q": 8, ".*proj": 1})
                for c in ("unet", "text_encoder", "text_encoder_2")}
    sd, metadata, _ = synthetic.diffusers_lora(SEED_LAYERS, settings, seed=0)
    result.append(Seed("diffusers_save_lora_weights", sd, metadata))
    result.append(Seed("diffusers_kohya_export", synthetic.diffusers_kohya_lora(SEED_LAYERS, rank=2)))
    config = synthetic.peft_lora_config(r=2, lora_alpha=6, use_rslora=True)
    peft_sd, _ = synthetic.peft_adapter(UNET_SEED_LAYERS, config, seed=0)
    result.append(Seed("peft_save_pretrained", peft_sd, kind="peft", sidecar=config))
    result.append(Seed("lycoris", _lycoris_seed()))
    result.extend(Seed(name, tensors) for name, tensors in _family_seeds())
    result.append(Seed("cloneofsimo", _cloneofsimo_seed(), {"unet:0:rank": "1", "text_encoder:0:rank": "1"}))
    from ..model import HypernetConfig, HyperNetwork, official_state_dict

    model = HyperNetwork(HypernetConfig(hidden=8))
    result.append(Seed("hypernet_ours", {k: v.detach().clone() for k, v in model.state_dict().items()},
                       model.config.to_metadata(), kind="hypernet"))
    result.append(Seed("hypernet_official", official_state_dict(model), kind="pth"))
    return result


# ---------------------------------------------------------------------------------------------
# Mutations. Each takes (rng, seed) and returns the file's bytes (and maybe a new sidecar).

def _file_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "seed.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata or None)
        return path.read_bytes()


def _split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def _join(header: dict | str, body: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _flip_bits(rng, data):
    data = bytearray(data)
    end = min(len(data), 8 + struct.unpack("<Q", bytes(data[:8]))[0]) if rng.random() < 0.7 else len(data)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(end)] ^= 1 << rng.randrange(8)
    return bytes(data)


def _truncate(rng, data):
    return data[: rng.randrange(len(data))]


def _garbage_tail(rng, data):
    return data + rng.randbytes(rng.randint(1, 64))


def _header_length(rng, data):
    (length,) = struct.unpack("<Q", data[:8])
    new = rng.choice([0, 1, length - 1, length + 1, length + 8, 2 ** 63, rng.randrange(2 ** 64), len(data)])
    return struct.pack("<Q", new % 2 ** 64) + data[8:]


_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F4", "X", 7, None]


def _json_entry(rng, data):
    header, body = _split(data)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    choice = rng.randrange(9)
    if choice == 0:
        entry["dtype"] = rng.choice(_DTYPES)
    elif choice == 1:
        shape = entry["shape"]
        if shape:
            i = rng.randrange(len(shape))
            shape[i] = rng.choice([0, 1, shape[i] * 2, shape[i] // 2, 2 ** 40, 10 ** 30, -1, "2", 2.5, True])
    elif choice == 2:  # same bytes, other shape: a valid file the layer checks must judge
        n = 1
        for d in entry["shape"]:
            n *= d
        entry["shape"] = rng.choice([[n], [1, n], [n, 1], list(reversed(entry["shape"])), [*entry["shape"], 1],
                                     [1, 1, *entry["shape"]], []])
    elif choice == 3:
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, begin], [begin], [], 5, None, [begin, end + 4], [begin + 4, end],
                                            ["0", str(end)], [begin, 2 ** 70], [True, end]])
    elif choice == 4:
        del header[name]
    elif choice == 5:
        del entry[rng.choice(sorted(entry))]
    elif choice == 6:
        header[name] = rng.choice([[], "x", 5, None, {"dtype": "F32"}])
    elif choice == 7:  # a duplicate key, written by hand (json.dumps cannot)
        text = json.dumps(header)
        dup = json.dumps({name: entry})[1:-1]
        return _join(text[:-1] + ", " + dup + "}", body)
    else:  # rename: another role or another family's prefix
        suffix = rng.choice([".alpha", ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".hada_w1_a",
                             ".hada_t1", ".lokr_w1", ".lokr_t2", ".diff", ".diff_b", ".dora_scale", ".lora_A.weight"])
        stem = name.rsplit(".", 2)[0] if name.endswith(".weight") else name.rsplit(".", 1)[0]
        header[stem + suffix] = header.pop(name)
    return _join(header, body)


def _json_metadata(rng, data):
    header, body = _split(data)
    meta = header.get("__metadata__", {})
    choice = rng.randrange(6)
    if choice == 0:
        header["__metadata__"] = rng.choice([[], "x", 5, None, {"a": 1}, {"a": {"b": "c"}}])
    else:
        components = rng.choice([["unet"], ["text_encoder"], ["text_encoder_2"], ["unet", "text_encoder", "text_encoder_2"]])
        values = [4, 2, 0, -1, 1.5, "4", None, True, [], {}, {"to_q": 2}, {"to_q": 0}, {"(a+)+$": 2}, {".*": 3},
                  {"to_[": 1}, 1e308, 2 ** 80]
        entry = {f"{c}.{k}": rng.choice(values) for c in components
                 for k in rng.sample(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "peft_type"], 3)}
        text = json.dumps(entry)
        if choice == 1:
            text = text[: rng.randrange(len(text))]
        elif choice == 2:
            text = "[" * rng.randint(1, 20000) + "]" * rng.randint(0, 20000)
        meta = {**meta, "lora_adapter_metadata": text} if isinstance(meta, dict) else meta
        header["__metadata__"] = meta
        if choice == 3 and isinstance(meta, dict):
            meta["lora_adapter_metadata"] = text.replace("}", ', "unet.r": 3}', 1)  # duplicate inside the JSON
    return _join(header, body)


def _json_nesting(rng, data):
    header, body = _split(data)
    text = json.dumps(header)
    depth = rng.choice([100, 2000, 50000])
    at = text.rfind("}")
    return _join(text[:at] + ', "deep": ' + "[" * depth + "]" * depth + "}", body)


def _tensor_values(rng, seed: Seed, tensors: dict):
    name = rng.choice(sorted(tensors))
    t = tensors[name].clone()
    if t.is_floating_point() and t.numel():
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), float("-inf"), 1e38])
    else:
        t = torch.tensor(rng.choice([float("nan"), float("inf"), 0.0, -3.0]))
    tensors[name] = t
    return tensors


def _tensor_shape(rng, seed: Seed, tensors: dict):
    name = rng.choice(sorted(tensors))
    t = tensors[name]
    choice = rng.randrange(7)
    if choice == 0:  # thin and huge: the memory-amplification attack on expanding readers
        tensors[name] = torch.ones(rng.choice([(40000, 1), (1, 40000), (20000, 2), (3, 30000)])) * 0.01
    elif choice == 1:
        tensors[name] = torch.ones(tuple(rng.randint(0, 3) for _ in range(rng.randint(0, 5))))
    elif choice == 2:
        tensors[name] = t.reshape(-1)
    elif choice == 3:
        tensors[name] = t.unsqueeze(-1)
    elif choice == 4:
        tensors[name] = t.to(rng.choice([torch.float8_e4m3fn, torch.bool, torch.int8, torch.float64, torch.bfloat16,
                                         torch.int64, torch.float16, torch.uint8]))
    elif choice == 5:
        del tensors[name]
    else:  # add a stray role to a layer
        stem = name.rsplit(".", 2)[0] if name.endswith(".weight") else name.rsplit(".", 1)[0]
        role = rng.choice([".hada_t1", ".lokr_t2", ".lora_mid.weight", ".dora_scale", ".alpha", ".diff"])
        shape = [rng.choice([1, 2, 3, 640]) for _ in range(rng.randint(0, 4))]
        while len([d for d in shape if d > 3]) > 2:  # keep the case small: it is the reader under test
            shape[shape.index(640)] = 3
        tensors[stem + role] = torch.ones(tuple(shape))
    return tensors


def _sidecar(rng, seed: Seed):
    config = dict(seed.sidecar)
    key = rng.choice(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"])
    config[key] = rng.choice([0, -1, "x", None, [], {"to_q": "2"}, {"(x*)*y": 1}, 2 ** 70, True, 3.5])
    if rng.random() < 0.2:
        return rng.choice(["{", "[]", "null", '{"r": 2, "r": 4}', "[" * 30000])
    return json.dumps(config)


BYTE_MUTATIONS: list[Callable] = [_flip_bits, _truncate, _garbage_tail, _header_length]
JSON_MUTATIONS: list[Callable] = [_json_entry, _json_entry, _json_entry, _json_metadata, _json_nesting]
TENSOR_MUTATIONS: list[Callable] = [_tensor_values, _tensor_shape, _tensor_shape]


@dataclass
class Case:
    seed: str
    mutation: str
    data: bytes
    sidecar: str | None = None


def make_case(rng: random.Random, seed: Seed) -> Case:
    family = rng.random()
    sidecar = json.dumps(seed.sidecar) if seed.sidecar else None
    if seed.kind == "pth":
        if family < 0.5:
            tensors = TENSOR_MUTATIONS[rng.randrange(len(TENSOR_MUTATIONS))](rng, seed, dict(seed.tensors))
            if rng.random() < 0.2:  # what the weights-only unpickler still builds: views of one storage
                name = rng.choice(sorted(tensors))
                tensors[name] = torch.zeros(1).expand(rng.choice([(150000, 16), (8, 2 ** 20), (2 ** 16,)]))
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "h.pth"
                torch.save(tensors, path)
                return Case(seed.name, "pth tensors", path.read_bytes())
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "h.pth"
            torch.save(seed.tensors, path)
            data = path.read_bytes()
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return Case(seed.name, "pth bytes", bytes(data))
    if seed.kind == "peft" and family < 0.25:
        return Case(seed.name, "adapter_config.json", _file_bytes(seed.tensors, seed.metadata), _sidecar(rng, seed))
    if family < 0.3:
        mutate = rng.choice(BYTE_MUTATIONS)
        return Case(seed.name, mutate.__name__, mutate(rng, _file_bytes(seed.tensors, seed.metadata)), sidecar)
    if family < 0.7:
        mutate = rng.choice(JSON_MUTATIONS)
        return Case(seed.name, mutate.__name__, mutate(rng, _file_bytes(seed.tensors, seed.metadata)), sidecar)
    mutate = rng.choice(TENSOR_MUTATIONS)
    try:
        tensors = mutate(rng, seed, dict(seed.tensors))
        data = _file_bytes(tensors, seed.metadata)
    except Exception:  # noqa: BLE001 — safetensors cannot store this mutation (e.g. an empty dict); try bytes
        data = _flip_bits(rng, _file_bytes(seed.tensors, seed.metadata))
    return Case(seed.name, mutate.__name__, data, sidecar)


# ---------------------------------------------------------------------------------------------
# Reading a case the way users' files are read

def read_case(case: Case, folder: Path, kind: str) -> str:
    """Read the case as inspect / merge would; returns "ok" (LoraRarError propagates)."""
    from ..inspection import describe_lora
    from ..lora import check_finite, read_lora
    from ..model import load_hypernet

    if kind in ("hypernet", "pth"):
        path = folder / ("h.safetensors" if kind == "hypernet" else "h.pth")
        path.write_bytes(case.data)
        model = load_hypernet(path)
        with torch.no_grad():
            model(torch.zeros(1, 2 * model.widths[0]))
        return "ok"
    path = folder / ("adapter_model.safetensors" if kind == "peft" else "lora.safetensors")
    path.write_bytes(case.data)
    if case.sidecar is not None:
        (folder / "adapter_config.json").write_text(case.sidecar)
    lora = read_lora(path, check_values=False)
    describe_lora(path)  # inspect: reads it once more, reports NaN/Inf instead of refusing
    check_finite(lora)
    lora.family_name  # noqa: B018 - the family's name is looked up as inspect does
    for layer in lora.layers.values():
        _ = (layer.shape, layer.rank, layer.scale, layer.dtype)
        size = 1
        for d in layer.shape:
            size *= d
        if size <= _EXPAND_LIMIT:
            delta = layer.delta()
            assert tuple(delta.shape) == layer.shape, (tuple(delta.shape), layer.shape)
        if layer.is_low_rank:
            layer.scaled_up() @ layer.down_matrix()[:, :1]
    return "ok"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (VmHWM), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024 ** 2)


@dataclass
class Summary:
    cases: int = 0
    ok: int = 0
    clean_errors: int = 0
    other_exceptions: int = 0
    peak_rss_mb: float = 0.0
    baseline_rss_mb: float = 0.0
    slowest_case_s: float = 0.0
    slowest_case: str = ""
    # CPU time (all threads) of the case: on a shared machine wall time includes other people's work
    slowest_case_cpu_s: float = 0.0
    slowest_case_cpu: str = ""
    memory_jumps: list = field(default_factory=list)  # cases that raised the peak by > 50 MB
    total_s: float = 0.0
    by_mutation: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)


def run(cases: int, seed: int = 0, keep_failures: int = 20) -> Summary:
    import logging

    logging.getLogger("hypernet").setLevel(logging.ERROR)  # unrecognised-key warnings by the thousand
    rng = random.Random(seed)
    seed_files = seeds()
    summary = Summary(baseline_rss_mb=peak_rss_mb(), peak_rss_mb=peak_rss_mb())
    outcomes: dict[str, Counter] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for index in range(cases):
            seed_file = seed_files[index % len(seed_files)]
            case = make_case(rng, seed_file)
            folder = Path(root) / str(index)
            folder.mkdir()
            began, began_cpu = time.perf_counter(), time.process_time()
            try:
                outcome = read_case(case, folder, seed_file.kind)
                summary.ok += 1
            except LoraRarError:
                outcome = "clean error"
                summary.clean_errors += 1
            except Exception as exc:  # noqa: BLE001 — exactly what the fuzzer is looking for
                outcome = "other"
                summary.other_exceptions += 1
                if len(summary.failures) < keep_failures:
                    summary.failures.append({"case": index, "seed": case.seed, "mutation": case.mutation,
                                             "exception": f"{type(exc).__name__}: {str(exc)[:300]}",
                                             "where": traceback.format_exc().splitlines()[-3][:200]})
            elapsed, cpu = time.perf_counter() - began, time.process_time() - began_cpu
            if cpu > summary.slowest_case_cpu_s:
                summary.slowest_case_cpu_s = cpu
                summary.slowest_case_cpu = f"#{index} {case.seed} / {case.mutation} ({outcome})"
            rss = peak_rss_mb()
            if rss > summary.peak_rss_mb:
                if rss - summary.peak_rss_mb > 50 and summary.peak_rss_mb:
                    summary.memory_jumps.append(f"#{index} {case.seed} / {case.mutation} ({outcome}): "
                                                f"peak {summary.peak_rss_mb:.0f} -> {rss:.0f} MB")
                summary.peak_rss_mb = rss
            if elapsed > summary.slowest_case_s:
                summary.slowest_case_s = elapsed
                summary.slowest_case = f"#{index} {case.seed} / {case.mutation} ({outcome})"
            outcomes.setdefault(case.mutation, Counter())[outcome] += 1
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()
            summary.cases += 1
    summary.total_s = time.perf_counter() - started
    summary.peak_rss_mb = peak_rss_mb()
    summary.by_mutation = {k: dict(v) for k, v in sorted(outcomes.items())}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    summary = run(args.cases, args.seed)
    if args.json:
        print(json.dumps(vars(summary), indent=2))
    else:
        print(f"cases tried:        {summary.cases}")
        print(f"read fine:          {summary.ok}")
        print(f"clean errors:       {summary.clean_errors}")
        print(f"other exceptions:   {summary.other_exceptions}")
        print(f"peak memory:        {summary.peak_rss_mb:.0f} MB (after start-up {summary.baseline_rss_mb:.0f} MB)")
        print(f"slowest case:       {summary.slowest_case_s * 1000:.0f} ms wall ({summary.slowest_case})")
        print(f"                    {summary.slowest_case_cpu_s * 1000:.0f} ms CPU ({summary.slowest_case_cpu})")
        print(f"total:              {summary.total_s:.1f} s")
        for jump in summary.memory_jumps:
            print(f"  memory: {jump}")
        for failure in summary.failures:
            print(f"  FAILURE {failure}")
    return 1 if summary.other_exceptions else 0


if __name__ == "__main__":
    sys.exit(main())
