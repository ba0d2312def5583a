"""The LoRA.rar hypernetwork H and its two checkpoint formats.

H maps one input column of a layer's content and style updates, [ΔW_c[:, j]; ΔW_s[:, j]]
(length 2·width, content first), to that column's merge coefficients (m_c[j], m_s[j]).
There is one input Linear per layer width and one shared head ReLU → Linear(hidden → 2);
no output nonlinearity, so coefficients are unbounded and may be negative.

Formats:
- official: a pickled state dict `input_1`/`input_2` (Linear 2·640 and 2·1280 → 128) and
  `output.1` — loaded with `weights_only=True` only.
- ours: safetensors `input.<width>.weight/bias`, `output.1.weight/bias`, with metadata that
  records the format version, hidden size, widths, targets, base family and license.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import HypernetError
from .safetensors_io import atomic_write, load_safetensors, read_header

log = logging.getLogger(__name__)

# How H reads its input columns (metadata `extra.input_normalisation`): "none" — the raw ΔW
# columns, as the paper's H; "layer_rms" — each side's columns divided by the RMS of that side's
# ΔW in that layer, so their entries are O(1) whatever the LoRA's magnitude (DESIGN §12: at real
# magnitudes the official H's first layer sees |W1·x| ≪ |b1| and its output barely depends on the
# pair). Applied wherever H is evaluated (training and merging), never to the merged update itself.
INPUT_NORMALISATIONS = ("none", "layer_rms")

FORMAT_NAME = "lorarar-hypernet"
FORMAT_VERSION = 1
DEFAULT_TARGETS = ("to_q", "to_out.0")


@dataclass
class HypernetConfig:
    hidden: int = 128
    widths: tuple[int, ...] = (640, 1280)
    # Layer-name endings (inside attn1/attn2) that H merges; all others are summed.
    targets: tuple[str, ...] = DEFAULT_TARGETS
    base_family: str = "sdxl"
    name: str = ""
    license: str = ""
    # Free-form facts about where the weights came from (training data summary, steps, …).
    extra: dict[str, str] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
            "hidden": str(self.hidden), "widths": ",".join(map(str, self.widths)),
            "targets": ",".join(self.targets), "base_family": self.base_family,
            "name": self.name, "license": self.license,
        }
        meta.update({f"extra.{k}": str(v) for k, v in self.extra.items()})
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str) -> "HypernetConfig":
        if meta.get("format") != FORMAT_NAME:
            raise HypernetError(f"{source}: not a LoRA.rar hypernetwork (metadata format is "
                                f"{meta.get('format')!r}, expected {FORMAT_NAME!r})")
        version = _metadata_int(meta, "format_version", source, default="0", minimum=0)
        if version > FORMAT_VERSION:
            raise HypernetError(f"{source}: format version {version} is newer than this "
                                f"package understands ({FORMAT_VERSION}); update the node pack")
        if "hidden" not in meta or "widths" not in meta:
            raise HypernetError(f"{source}: bad hypernetwork metadata (needs hidden and widths, has "
                                f"{', '.join(sorted(meta)) or 'nothing'})")
        hidden = _metadata_int(meta, "hidden", source)
        widths = tuple(_int_field(w, "widths", source) for w in meta["widths"].split(",") if w.strip())
        config = cls(
            hidden=hidden, widths=widths,
            targets=tuple(t for t in meta.get("targets", ",".join(DEFAULT_TARGETS)).split(",") if t),
            base_family=meta.get("base_family", "sdxl"),
            name=meta.get("name", ""), license=meta.get("license", ""),
            extra={k[6:]: v for k, v in meta.items() if k.startswith("extra.")},
        )
        check_config_size(config, source)
        return config


# What a hypernetwork file may ask for, checked before anything is built: the official H has
# hidden 128 and widths 640/1280 (492,034 parameters). A file claiming more is refused rather than
# given gigabytes (a 3 kB file claiming hidden=150000 would otherwise allocate 2.4 GB).
MAX_HIDDEN = 8192
MAX_WIDTH = 16384
MAX_WIDTHS = 8
MAX_PARAMETERS = 1 << 26


def _int_field(text: str, name: str, source: str, minimum: int = 1) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise HypernetError(f"{source}: bad hypernetwork metadata: {name} must be an integer, found {text[:40]!r}") from None
    if value < minimum:
        raise HypernetError(f"{source}: bad hypernetwork metadata: {name} must be at least {minimum}, found {value}")
    return value


def _metadata_int(meta: dict[str, str], name: str, source: str, default: str | None = None, minimum: int = 1) -> int:
    return _int_field(str(meta.get(name, default)), name, source, minimum)


def parameter_count(config: "HypernetConfig") -> int:
    return sum(2 * w * config.hidden + config.hidden for w in config.widths) + 2 * config.hidden + 2


def check_config_size(config: "HypernetConfig", source: str) -> None:
    """Refuse a configuration beyond the caps above, before a single tensor is allocated."""
    problems = []
    if not 1 <= config.hidden <= MAX_HIDDEN:
        problems.append(f"hidden {config.hidden} (1..{MAX_HIDDEN} accepted)")
    if not 1 <= len(config.widths) <= MAX_WIDTHS:
        problems.append(f"{len(config.widths)} input widths (1..{MAX_WIDTHS} accepted)")
    bad_widths = [w for w in config.widths if not 1 <= w <= MAX_WIDTH]
    if bad_widths:
        problems.append(f"widths {bad_widths} (1..{MAX_WIDTH} accepted)")
    if len(set(config.widths)) != len(config.widths):
        problems.append(f"a width listed twice ({config.widths})")
    if not problems and parameter_count(config) > MAX_PARAMETERS:
        problems.append(f"{parameter_count(config):,} parameters (at most {MAX_PARAMETERS:,} accepted)")
    if problems:
        raise HypernetError(f"{source}: this hypernetwork asks for " + "; ".join(problems)
                            + "; the file is damaged or not a LoRA.rar hypernetwork")


class HyperNetwork(nn.Module):
    def __init__(self, config: HypernetConfig):
        super().__init__()
        self.config = config
        self.input = nn.ModuleDict({str(w): nn.Linear(2 * w, config.hidden) for w in config.widths})
        # Sequential so the head's Linear is `output.1`, as in the official checkpoint.
        self.output = nn.Sequential(nn.ReLU(), nn.Linear(config.hidden, 2))
        self.source_path: Path | None = None  # the file it was loaded from, for provenance

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(int(w) for w in self.input.keys())

    def input_layer(self, width: int) -> nn.Linear:
        try:
            return self.input[str(width)]
        except KeyError:
            raise HypernetError(
                f"this hypernetwork has input layers for widths {'/'.join(map(str, self.widths))}, "
                f"not {width}") from None

    @property
    def input_normalisation(self) -> str:
        value = self.config.extra.get("input_normalisation", "none")
        if value not in INPUT_NORMALISATIONS:
            raise HypernetError(f"this hypernetwork asks for input normalisation {value!r}; this package knows "
                                f"{', '.join(INPUT_NORMALISATIONS)} (update the node pack)")
        return value

    def forward(self, columns: torch.Tensor) -> torch.Tensor:
        """columns (..., 2·width) → coefficients (..., 2) = (m_c, m_s)."""
        return self.output(self.input_layer(columns.shape[-1] // 2)(columns))

    def zero_input_coefficients(self, width: int) -> tuple[float, float]:
        """H(0) = (m_c, m_s) for an all-zero input column of a `width`-wide layer: W2·relu(b1) + b2.
        What H gives any pair whose columns are small next to its first layer's bias — its fixed
        recipe — and the reference its real coefficients are measured against."""
        first, head = self.input_layer(width), self.output[1]
        with torch.no_grad():
            m = head.weight @ torch.relu(first.bias) + head.bias
        return float(m[0]), float(m[1])

    def coefficients_dense(self, delta_c: torch.Tensor, delta_s: torch.Tensor,
                           input_norms: bool = False) -> tuple[torch.Tensor, ...]:
        """Reference formulation: feed every column of [ΔW_c; ΔW_s] (out×in each) through H.
        With `input_norms`, also |W1·x_j| for every column (see `coefficients_factored`)."""
        if self.input_normalisation == "layer_rms":
            delta_c, delta_s = delta_c / _rms(delta_c), delta_s / _rms(delta_s)
        columns = torch.cat([delta_c, delta_s], dim=0).T
        if not input_norms:
            m = self(columns)
            return m[:, 0], m[:, 1]
        first = self.input_layer(columns.shape[-1] // 2)
        term = columns @ first.weight.T
        m = self.output(term + first.bias)
        return m[:, 0], m[:, 1], _detached_norms(term, dim=-1)

    def coefficients_factored(self, up_c: torch.Tensor, down_c: torch.Tensor,
                              up_s: torch.Tensor, down_s: torch.Tensor,
                              input_norms: bool = False) -> tuple[torch.Tensor, ...]:
        """Same result without forming ΔW = up @ down (up already carries alpha/rank).

        H's first layer is linear, so for all columns at once its pre-activation is
        P = (W1_c·up_c)·down_c + (W1_s·up_s)·down_s + b1, a (hidden × in) product of small
        matrices instead of a (2·out × in) one. Factors may carry a leading batch dimension
        (several layers of the same shapes at once); the result then does too.

        With `input_norms`, a third result: |W1·x_j| for every column j, the size of the input's
        term next to the bias b1 (detached: a measurement, never trained through).
        """
        width = up_c.shape[-2]
        if self.input_normalisation == "layer_rms":
            up_c, up_s = up_c / factored_rms(up_c, down_c), up_s / factored_rms(up_s, down_s)
        first = self.input_layer(width)
        w_c, w_s = first.weight[:, :width], first.weight[:, width:]
        # One product with the inner dimension r_c + r_s instead of two plus a sum: a single pass
        # over the (hidden × in) activations, the largest tensor here.
        left = torch.cat([w_c @ up_c, w_s @ up_s], dim=-1)
        right = torch.cat([down_c, down_s], dim=-2)
        head = self.output[1]
        if input_norms:
            term = left @ right
            m = head.weight @ torch.relu(term + first.bias[:, None]) + head.bias[:, None]
            return m[..., 0, :], m[..., 1, :], _detached_norms(term, dim=-2)
        pre = (torch.baddbmm if left.dim() == 3 else torch.addmm)(first.bias[:, None], left, right)
        m = head.weight @ torch.relu_(pre) + head.bias[:, None]
        return m[..., 0, :], m[..., 1, :]

    def check_finite(self, source: str = "") -> None:
        """One clear error when a weight is NaN or Inf (a diverged training run, a damaged file
        loaded elsewhere): every coefficient, and so the whole merge, would be NaN."""
        _check_finite(dict(self.state_dict()), source or f"hypernetwork {self.config.name or '(unnamed)'}")


def _detached_norms(term: torch.Tensor, dim: int) -> torch.Tensor:
    with torch.no_grad():
        term = term.detach()
        return torch.linalg.vecdot(term, term, dim=dim).sqrt_()  # 10× faster than vector_norm on the CPU


def _rms(delta: torch.Tensor) -> torch.Tensor:
    return delta.pow(2).mean().sqrt().clamp(min=1e-12)


def factored_rms(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """RMS of the entries of up @ down without forming it: ‖B·A‖²_F = Σ (BᵀB) ∘ (A·Aᵀ), r × r
    matrices. Batched factors give one value per layer, shaped to broadcast against `up`."""
    gram = (up.transpose(-1, -2) @ up) * (down @ down.transpose(-1, -2))
    size = up.shape[-2] * down.shape[-1]
    return (gram.sum(dim=(-2, -1), keepdim=True) / size).clamp(min=1e-24).sqrt()


# ---------------------------------------------------------------------------------------------
# Loading and saving

_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_official_tensors(sd: object, source: str) -> dict[str, torch.Tensor]:
    """A weights-only state dict whose every entry is a named float tensor backed by its own
    storage. A tensor with more elements than its storage holds (stride 0, overlapping views)
    would expand into memory the file never paid for."""
    if not isinstance(sd, dict):
        raise HypernetError(f"{source}: expected a state dict of tensors, found {type(sd).__name__}")
    for key, value in sd.items():
        if not isinstance(key, str):
            raise HypernetError(f"{source}: state dict key {key!r} is a {type(key).__name__}, expected a name")
        if not isinstance(value, torch.Tensor):
            raise HypernetError(f"{source}: {key} is a {type(value).__name__}, expected a tensor")
        if value.dtype not in _WEIGHT_DTYPES:
            raise HypernetError(f"{source}: {key} has dtype {str(value.dtype).replace('torch.', '')}, expected "
                                "float16, bfloat16, float32 or float64 weights")
        if value.numel() * value.element_size() > value.untyped_storage().nbytes():
            raise HypernetError(f"{source}: {key} claims {value.numel():,} elements on a storage of "
                                f"{value.untyped_storage().nbytes():,} bytes (stride-0 or overlapping tensor); refused")
    return sd


def _from_official_state_dict(sd: dict, source: str) -> HyperNetwork:
    sd = _check_official_tensors(sd, source)
    inputs = sorted({k.rsplit(".", 1)[0] for k in sd if k.startswith("input_")})
    required = {"output.1.weight", "output.1.bias"}
    if not inputs or not required <= sd.keys():
        raise HypernetError(f"{source}: expected keys input_N.weight/bias and output.1.weight/bias, "
                            f"found {sorted(sd)[:8]}")
    head, head_bias = sd["output.1.weight"], sd["output.1.bias"]
    if head.dim() != 2 or head.shape[0] != 2 or tuple(head_bias.shape) != (2,):
        raise HypernetError(f"{source}: output.1 has the wrong shape: expected (2, hidden) and (2,), "
                            f"found {tuple(head.shape)} and {tuple(head_bias.shape)}")
    hidden = head.shape[1]
    widths = []
    for name in inputs:
        weight, bias = sd.get(f"{name}.weight"), sd.get(f"{name}.bias")
        if weight is None or bias is None or weight.dim() != 2 or weight.shape[0] != hidden \
                or weight.shape[1] % 2 or weight.shape[1] == 0 or tuple(bias.shape) != (hidden,):
            raise HypernetError(
                f"{source}: {name} has the wrong shape: expected weight ({hidden}, 2·width) and "
                f"bias ({hidden},), found {None if weight is None else tuple(weight.shape)} and "
                f"{None if bias is None else tuple(bias.shape)}")
        widths.append(weight.shape[1] // 2)
    if len(set(widths)) != len(widths):
        raise HypernetError(f"{source}: two input layers for the same width ({widths})")
    config = HypernetConfig(hidden=hidden, widths=tuple(sorted(widths)))
    check_config_size(config, source)
    _check_finite(sd, source)
    model = HyperNetwork(config)
    ours = {f"input.{w}.{p}": sd[f"{name}.{p}"] for name, w in zip(inputs, widths) for p in ("weight", "bias")}
    ours.update({k: sd[k] for k in required})
    model.load_state_dict({k: v.float() for k, v in ours.items()})
    return model


def _check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise HypernetError(f"{source}: {bad[0]} contains NaN or Inf; the file is damaged or from a diverged training run")


def expected_shapes(config: HypernetConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of our safetensors format for `config` (without building the model)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for w in config.widths:
        shapes[f"input.{w}.weight"] = (config.hidden, 2 * w)
        shapes[f"input.{w}.bias"] = (config.hidden,)
    shapes["output.1.weight"] = (2, config.hidden)
    shapes["output.1.bias"] = (2,)
    return shapes


def official_state_dict(model: HyperNetwork) -> dict[str, torch.Tensor]:
    """Our model → the official layout (`input_1` for the smallest width, `input_2`, …)."""
    sd = {}
    for index, width in enumerate(sorted(model.widths), start=1):
        layer = model.input[str(width)]
        sd[f"input_{index}.weight"] = layer.weight.detach().clone()
        sd[f"input_{index}.bias"] = layer.bias.detach().clone()
    sd["output.1.weight"] = model.output[1].weight.detach().clone()
    sd["output.1.bias"] = model.output[1].bias.detach().clone()
    return sd


def load_hypernet(path: str | Path, expected_sha256: str | None = None) -> HyperNetwork:
    """Load a hypernetwork in either format. With `expected_sha256`, the file must match it."""
    path = Path(path)
    if not path.is_file():
        raise HypernetError(f"{path}: no such hypernetwork file")
    if expected_sha256:
        from .safetensors_io import sha256_file

        actual = sha256_file(path)
        if actual != expected_sha256:
            raise HypernetError(f"{path}: sha256 is {actual}, expected {expected_sha256}; the file "
                                "is damaged or not the checkpoint it is named after")
    source = str(path)
    if path.suffix.lower() == ".safetensors":
        # The header alone says what the file holds: compare it with the metadata before any
        # tensor is read or any layer built.
        header, _ = read_header(path)
        config = HypernetConfig.from_metadata(header.get("__metadata__") or {}, source)
        expected = expected_shapes(config)
        found = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        if expected != found:
            diff = sorted(set(expected.items()) ^ set(found.items()), key=str)[:4]
            raise HypernetError(f"{source}: tensors do not match its metadata "
                                f"(hidden {config.hidden}, widths {config.widths}); differing: {diff}")
        not_float = sorted(k for k, v in header.items() if k != "__metadata__" and v["dtype"] not in ("F16", "BF16", "F32", "F64"))
        if not_float:
            raise HypernetError(f"{source}: {not_float[0]} has dtype {header[not_float[0]]['dtype']}, expected floating point weights")
        tensors, _ = load_safetensors(path)
        _check_finite(tensors, source)
        model = HyperNetwork(config)
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
    else:
        try:
            sd = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:  # torch raises many types for bad/unsafe pickles
            raise HypernetError(f"{source}: cannot load as a weights-only torch checkpoint ({exc})") from None
        model = _from_official_state_dict(sd, source)
        model.config.name = path.stem
    model.eval()
    model.requires_grad_(False)
    model.source_path = path
    return model


def save_hypernet(model: HyperNetwork, path: str | Path, force: bool = False) -> Path:
    """Save in our safetensors format, or — for a `.pth`/`.pt` path — in the official layout."""
    path = Path(path)
    if path.suffix.lower() in (".pth", ".pt"):
        sd = official_state_dict(model)
        return atomic_write(path, lambda tmp: torch.save(sd, tmp), force)
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(sd, str(tmp), model.config.to_metadata()), force)


def describe(model: HyperNetwork) -> str:
    params = sum(p.numel() for p in model.parameters())
    info = {k: v for k, v in asdict(model.config).items() if v}
    return f"{params:,} parameters; " + json.dumps(info, default=list)


def is_hypernet_file(path: Path) -> bool:
    """Cheap check used when listing folders: ours by metadata, official by extension."""
    if path.suffix.lower() == ".safetensors":
        try:
            header, _ = read_header(path)
        except Exception:
            return False
        return (header.get("__metadata__") or {}).get("format") == FORMAT_NAME
    return path.suffix.lower() in (".pth", ".pt")
