"""Training checkpoints without pickles: `step_NNNNNN/hypernet.safetensors` (our hypernetwork
format, loadable as is) + `step_NNNNNN/state.safetensors` (optimizer tensors; param groups,
grad-scaler state, RNG scheme and settings as JSON metadata).

Randomness is counter-based: every step's pairs, timesteps and noise come from a generator
seeded with (seed, step), so (seed, next step) is the whole RNG state and a resumed run draws
exactly what an uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TrainingError
from ..model import HyperNetwork, load_hypernet, save_hypernet
from ..safetensors_io import atomic_write, load_safetensors

STATE_FORMAT = "lorarar-train-state"
_STEP_DIR = re.compile(r"step_(\d+)$")


@dataclass
class TrainState:
    step: int
    hypernet: HyperNetwork
    optimizer_state: dict
    scaler_state: dict
    extra: dict


def save_checkpoint(directory: Path, step: int, hypernet: HyperNetwork, optimizer: torch.optim.Optimizer,
                    scaler_state: dict, extra: dict) -> Path:
    folder = directory / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    save_hypernet(hypernet, folder / "hypernet.safetensors", force=True)
    sd = optimizer.state_dict()
    tensors = {f"opt.{index}.{key}": value.detach().cpu().contiguous()
               for index, state in sd["state"].items() for key, value in state.items()
               if isinstance(value, torch.Tensor)}
    scalars = {f"{index}.{key}": value for index, state in sd["state"].items()
               for key, value in state.items() if not isinstance(value, torch.Tensor)}
    metadata = {
        "format": STATE_FORMAT, "step": str(step),
        "param_groups": json.dumps(sd["param_groups"]),
        "optimizer_scalars": json.dumps(scalars),
        "scaler": json.dumps(scaler_state),
        "rng": json.dumps({"scheme": "torch.Generator seeded per step from (seed, step)",
                           "seed": extra.get("seed"), "next_step": step}),
        "extra": json.dumps(extra),
    }
    from safetensors.torch import save_file

    # safetensors refuses an empty dict of tensors only in old versions; keep one marker anyway.
    tensors.setdefault("step", torch.tensor(step, dtype=torch.int64))
    state_path = folder / "state.safetensors"
    atomic_write(state_path, lambda tmp: save_file(tensors, str(tmp), metadata), force=True)
    return folder


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder itself, or the newest complete one under a run folder."""
    path = Path(path)
    if (path / "state.safetensors").is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = sorted((int(m.group(1)), p) for p in root.glob("step_*")
                   if (m := _STEP_DIR.search(p.name)) and (p / "state.safetensors").is_file()
                   and (p / "hypernet.safetensors").is_file())
    if not found:
        raise TrainingError(f"{path}: no training checkpoint found (expected step_NNNNNN folders with "
                            "hypernet.safetensors and state.safetensors)")
    return found[-1][1]


def load_checkpoint(path: Path) -> TrainState:
    folder = find_checkpoint(path)
    hypernet = load_hypernet(folder / "hypernet.safetensors")
    tensors, meta = load_safetensors(folder / "state.safetensors")
    if meta.get("format") != STATE_FORMAT:
        raise TrainingError(f"{folder / 'state.safetensors'}: not a LoRA.rar training state "
                            f"(format {meta.get('format')!r})")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in json.loads(meta.get("optimizer_scalars", "{}")).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer_state = {"state": state, "param_groups": json.loads(meta["param_groups"])}
    return TrainState(int(meta["step"]), hypernet, optimizer_state, json.loads(meta.get("scaler", "{}")),
                      json.loads(meta.get("extra", "{}")))
