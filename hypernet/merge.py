"""Merge a content (subject) LoRA and a style LoRA — the one entry point for CLI, nodes and the
testbed, whatever the method.

    merged = merge(content, style, hypernet, content_strength=1.0, style_strength=0.8, method="lorarar")

Methods register here by name (`METHODS`); each computes a strength-free `MergedLora`
(hypernet/merged.py), and the strengths are applied afterwards (docs/methods.md), so a strength change
never reruns a method. Callers that merge the same inputs repeatedly (the ComfyUI node) pass a
`cache`; the CLI passes none.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import families
from .errors import HypernetError, LoraFormatError, LoraMismatchError, LoraRarError
from .lora import LoraFile
from .merged import CONTENT, STYLE, Coefficients, MergedLayer, MergedLora, Side, assemble, layer_names  # noqa: F401 - re-exported: the result types' home is merged.py
from .methods import k_lora, np_lora
from .methods.lorarar import WIDTH_POLICIES, lorarar_merge
from .model import HyperNetwork
from .progress import Progress

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Widget:
    """How the ComfyUI merge node shows a setting. Saved workflows store widget values by position:
    a new widget goes after every existing one (the registry's order is the node's order)."""

    name: str                       # the input's name on the node (forever: workflows store it)
    kind: str                       # "float", "int" or "combo"
    default: Any
    tooltip: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    to_param: Callable[[Any], Any] | None = None   # the widget's value → the library's (np_rank 0 = "all")


@dataclass(frozen=True)
class Param:
    """One method-specific setting: its default, type and a sentence for help texts — and where
    the CLI (`flag`, or a `switch` that sets `switch` when given) and the node (`widget`) expose it;
    `device`: the node fills it with ComfyUI's compute device. The CLI's options, the node's widgets
    and how their values reach `merge` are all made from these (hypernet/cli/merge.py,
    hypernet/nodelogic/merge.py, nodes/nodes_merge.py)."""

    default: Any
    kind: type
    help: str
    choices: tuple = ()
    flag: str = ""
    metavar: str | None = None
    switch: Any = None
    widget: Widget | None = None
    device: bool = False


@dataclass(frozen=True)
class Method:
    name: str
    summary: str                  # one line: what it does (CLI help, node tooltip)
    needs_hypernet: bool
    # (content, style, hypernet or None, resolved params, progress) → strength-free MergedLora
    run: Callable[..., MergedLora]
    params: Mapping[str, Param] = field(default_factory=dict)

    def resolve(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults filled in, names and types checked; errors name the parameter."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            known = ", ".join(self.params) or "none"
            raise LoraRarError(f"method {self.name}: unknown parameter(s) {', '.join(unknown)} (known: {known})")
        out = {}
        for name, param in self.params.items():
            value = given.get(name, param.default)
            if value is not None and not isinstance(value, param.kind):
                try:
                    value = param.kind(value)
                except (TypeError, ValueError):
                    raise LoraRarError(f"method {self.name}: {name} must be {param.kind.__name__}, "
                                       f"got {value!r}") from None
            if param.choices and value not in param.choices:
                raise LoraRarError(f"method {self.name}: {name} must be one of "
                                   f"{', '.join(map(str, param.choices))}, got {value!r}")
            out[name] = value
        return out


def _run_sum(content, style, hypernet, params, progress) -> MergedLora:
    return assemble(content, style, method="sum")


def _run_lorarar(content, style, hypernet, params, progress) -> MergedLora:
    return lorarar_merge(content, style, hypernet, params["unsupported_width"], progress, params["device"])


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


register(Method(
    "lorarar", "LoRA.rar: a hypernetwork predicts per-column coefficients for to_q/to_out.0 of every "
    "attention layer; every other layer is summed", needs_hypernet=True, run=_run_lorarar,
    params={"unsupported_width": Param("error", str, "sum layers whose width the hypernetwork has no input for, "
                                       "instead of failing", WIDTH_POLICIES, flag="--allow-width-fallback",
                                       switch="sum"),
            "device": Param("cpu", str, "torch device the hypernetwork runs on (cpu, cuda, …; the ComfyUI "
                            "node uses the model's); coefficients equal the CPU's to float32 rounding",
                            flag="--h-device", metavar="DEVICE", device=True)}))


def _run_np_lora(content, style, hypernet, params, progress) -> MergedLora:
    return np_lora.np_lora_merge(content, style, params["mu"], params["rank"], params["side"], progress)


def _run_k_lora(content, style, hypernet, params, progress) -> MergedLora:
    return k_lora.k_lora_merge(content, style, params["top_k"], params["alpha"], params["beta"], progress,
                               params["device"])


def _np_rank(value) -> str | None:
    """The node's np_rank (an INT widget: 0 = all of the style's directions) → the method's rank."""
    return None if int(value) == 0 else str(int(value))


register(Method(
    "np-lora", "NP-LoRA: the content LoRA is projected off the style LoRA's principal singular directions "
    "on every shared layer (exact, low-rank; no hypernetwork)", needs_hypernet=False, run=_run_np_lora,
    params={"mu": Param(np_lora.DEFAULT_MU, float, "projection strength: 0 = plain sum, larger = harder "
                        "projection (c = mu/(1+mu))", flag="--mu", metavar="MU",
                        widget=Widget("mu", "float", np_lora.DEFAULT_MU, "np-lora only: projection strength. 0 = "
                                      "plain sum; 0.5 = the paper's default; larger removes more of the subject LoRA "
                                      "along the style's directions (c = mu/(1+mu)).", 0.0, 1000.0, 0.05)),
            "rank": Param(None, str, "style directions to project out: 'all' (default: the style LoRA's rank) "
                          "or a number k", flag="--np-rank", metavar="K",
                          widget=Widget("np_rank", "int", 0, "np-lora only: how many of the style LoRA's strongest "
                                        "directions to project out per layer; 0 = all of them (the style LoRA's rank).",
                                        0, 4096, to_param=_np_rank)),
            "side": Param("input", str, "which space of the content update is projected: 'input' (the "
                          "paper's Eq. 11, default) or 'output' (its Eq. 21)", np_lora.SIDES, flag="--np-side",
                          widget=Widget("np_side", "combo", "input", "np-lora only: 'input' projects what the "
                                        "subject LoRA reads (the paper's Eq. 11, default); 'output' what it writes "
                                        "(Eq. 21)."))}))
register(Method(
    "k-lora", "K-LoRA: each attention projection uses the content LoRA early in sampling and the style LoRA "
    "from its precomputed switch point on (top-k magnitudes); other layers summed. Not one LoRA file",
    needs_hypernet=False, run=_run_k_lora,
    params={"top_k": Param(k_lora.DEFAULT_TOP_K, int, "entries of each |ΔW| summed into its magnitude S",
                           flag="--k-top-k", metavar="K",
                           widget=Widget("k_top_k", "int", k_lora.DEFAULT_TOP_K, "k-lora only: how many of each "
                                         "layer's largest LoRA entries are summed to compare the two LoRAs (official: "
                                         "64).", 1, 1 << 20)),
            "alpha": Param(k_lora.DEFAULT_ALPHA, float, "how fast the style LoRA takes over as sampling "
                           "progresses (> 0)", flag="--k-alpha", metavar="A",
                           widget=Widget("k_alpha", "float", k_lora.DEFAULT_ALPHA, "k-lora only: how fast the style "
                                         "LoRA takes over as sampling progresses (official: 1.5; larger = earlier).",
                                         0.01, 100.0, 0.05)),
            "beta": Param(k_lora.DEFAULT_BETA, float, "the style's weight at the start of sampling", flag="--k-beta",
                          metavar="B",
                          widget=Widget("k_beta", "float", k_lora.DEFAULT_BETA, "k-lora only: the style LoRA's weight "
                                        "at the start of sampling (official: 0.5; larger = style takes over earlier).",
                                        -10.0, 10.0, 0.05)),
            "device": Param("cpu", str, "torch device that forms the dense products for the magnitudes "
                            "(cpu, cuda, …; the ComfyUI node uses its own)", flag="--k-device", metavar="DEVICE",
                            device=True)}))
register(Method("sum", "direct merge: the plain sum of both LoRAs (baseline)", needs_hypernet=False, run=_run_sum))

METHODS = tuple(REGISTRY)


def widgets() -> list[tuple[str, str, Param]]:
    """(method, parameter, Param) of every setting the merge node shows, in the node's order."""
    return [(method.name, name, param) for method in REGISTRY.values() for name, param in method.params.items()
            if param.widget is not None]


def method_spec(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise LoraRarError(f"method: expected one of {', '.join(REGISTRY)}, got {name!r}") from None


class MergeCache(Protocol):
    """What `merge` needs of a cache: results keyed by the identity of `objects` (LoRAs,
    hypernetwork) and the equality of `key` (method and parameters)."""

    def get_or_compute(self, objects: tuple, compute: Callable[[], MergedLora], key: tuple = ()) -> MergedLora: ...


def _describe(lora: LoraFile) -> str:
    names = [families.name_of(f) for f in lora.family_candidates] or [lora.family_name]
    return " or ".join(names) + (f" ({lora.family_evidence})" if lora.family_evidence else "")


def _hypernet_families(hypernet: HyperNetwork | None) -> tuple[str, ...]:
    return families.for_hypernet(hypernet.config.base_family) if hypernet is not None else ()


def resolve_family(content: LoraFile, style: LoraFile, hypernet: HyperNetwork | None = None,
                   expected: str | None = None) -> tuple[LoraFile, LoraFile, str | None]:
    """The base-model family of a merge, from its inputs — never a constant: the family both LoRAs
    are for (each may fit several equally, e.g. a file that touches only attention layers named
    alike in two models), narrowed by `expected` (the CLI's --family, the ComfyUI model's family)
    and by the hypernetwork's base family (when the method uses one). Each LoRA comes back read for
    that family (read again where it was read as another of its candidates). One error naming both
    sides where they disagree."""
    def candidates(lora: LoraFile) -> tuple[str, ...]:
        return lora.family_candidates or ((lora.family,) if lora.family else ())

    c, s = candidates(content), candidates(style)
    allowed = set(families.FAMILY_IDS)
    constraint = ""
    if expected:
        allowed &= {expected}
        constraint = f"expected {families.name_of(expected)}"
    by_hypernet = _hypernet_families(hypernet)
    if by_hypernet:
        allowed &= set(by_hypernet)
        constraint = (f"{constraint}; " if constraint else "") + (
            f"this hypernetwork is for {' or '.join(families.name_of(f) for f in by_hypernet)} (base family "
            f"{hypernet.config.base_family!r}, widths {'/'.join(map(str, hypernet.widths))})")
    if not c and not s:  # LoraFiles built in code, without a family: nothing to check
        return content, style, expected
    for role, lora, own in (("content LoRA", content, c), ("style LoRA", style, s)):
        if own and not allowed & set(own):
            raise LoraFormatError(f"{role} {lora.source} looks like {_describe(lora)}; {constraint}")
    common = [f for f in families.FAMILY_IDS if f in allowed and (not c or f in c) and (not s or f in s)]
    if not common:
        raise LoraMismatchError(
            f"content LoRA {content.source} looks like {_describe(content)} but style LoRA {style.source} looks like "
            f"{_describe(style)}: a merge needs two LoRAs of one base model")
    chosen = next((f for f in (content.family, style.family) if f in common), common[0])
    return (content.as_family(chosen) if content.family else content,
            style.as_family(chosen) if style.family else style, chosen)


# What a merge does with DoRA layers (a LoRA plus a magnitude vector that rescales each output or
# input of W + ΔW — which needs the base weight W, which two LoRA files do not have).
DORA_REFUSE = "refuse"                  # CLI and library default: one clear error
DORA_DROP_MAGNITUDE = "drop-magnitude"  # merge them as plain LoRAs, said on every surface
DORA_EXACT_IN_COMFYUI = "comfyui"       # the node: ComfyUI applies them with the model's weights
DORA_MODES = (DORA_REFUSE, DORA_DROP_MAGNITUDE, DORA_EXACT_IN_COMFYUI)


def _dora_layers(lora: LoraFile) -> list[str]:
    return [name for name, layer in lora.layers.items() if layer.is_dora]


def _without(lora: LoraFile, names: set[str]) -> LoraFile:
    return dataclasses.replace(lora, layers={n: layer for n, layer in lora.layers.items() if n not in names})


def _magnitude_dropped(lora: LoraFile) -> LoraFile:
    layers = {}
    for name, layer in lora.layers.items():
        if layer.is_dora:
            layer = dataclasses.replace(layer, tensors={k: v for k, v in layer.tensors.items() if k != "dora_scale"})
        layers[name] = layer
    return dataclasses.replace(lora, layers=layers)


def _refuse_dora(lora: LoraFile, role: str, names: list[str]) -> None:
    raise LoraFormatError(
        f"{role} {lora.source}: {len(names)} layer(s) are DoRA (e.g. {names[0]}): their magnitude rescales "
        "the base model's weight, which a merge of two files does not have. ComfyUI's LoRA.rar Merge node "
        "applies them exactly; here, ask for the approximation that merges them without their magnitude "
        f"(--dora {DORA_DROP_MAGNITUDE}, or dora='{DORA_DROP_MAGNITUDE}'), which the report and the "
        "written file then state")


def merge(content: LoraFile, style: LoraFile, hypernet: HyperNetwork | None = None,
          content_strength: float = 1.0, style_strength: float = 1.0, method: str = "lorarar", *,
          params: Mapping[str, Any] | None = None, unsupported_width: str | None = None,
          expected_family: str | None = None, progress: Progress | None = None,
          cache: MergeCache | None = None, dora: str = DORA_REFUSE) -> MergedLora:
    """Merge `content` and `style` with `method` (see `METHODS`) at the given strengths.

    `params` are the method's own settings (`REGISTRY[method].params`); `unsupported_width` is
    shorthand for LoRA.rar's. The base-model family comes from the inputs (`resolve_family`: both
    LoRAs must be for one family, and the hypernetwork for it too); `expected_family` (a family id:
    the CLI's --family, the ComfyUI model's family) narrows it; an ambiguous input is read again
    for the family chosen.
    `dora` (DORA_MODES): what DoRA layers get — an error (default), the magnitude-free
    approximation, or (the node) ComfyUI's own DoRA with the model's weights: those layers are
    then kept out of the method, summed, and patched as ComfyUI patches them; a file written from
    such a merge carries them without their magnitude, as its report says.
    """
    if dora not in DORA_MODES:
        raise LoraRarError(f"dora: expected one of {', '.join(DORA_MODES)}, got {dora!r}")
    spec = method_spec(method)
    if unsupported_width is not None:
        params = {**(params or {}), "unsupported_width": unsupported_width}
    resolved = spec.resolve(params)
    if spec.needs_hypernet and hypernet is None:
        raise HypernetError(
            f"hypernetwork: method {method!r} needs a hypernetwork — connect 'Load Hypernetwork (LoRA.rar)' "
            f"in ComfyUI or pass --hypernet on the command line — or choose another method "
            f"({', '.join(m for m, s in REGISTRY.items() if not s.needs_hypernet)})")
    hypernet = hypernet if spec.needs_hypernet else None
    content, style, _ = resolve_family(content, style, hypernet, expected_family)

    doras = {CONTENT: _dora_layers(content), STYLE: _dora_layers(style)}
    if dora == DORA_REFUSE:
        for (role, names), lora in zip(doras.items(), (content, style)):
            if names:
                _refuse_dora(lora, f"{role} LoRA", names)

    def compute() -> MergedLora:
        if not (doras[CONTENT] or doras[STYLE]):
            return spec.run(content, style, hypernet, resolved, progress)
        if dora == DORA_DROP_MAGNITUDE:
            merged = spec.run(_magnitude_dropped(content), _magnitude_dropped(style), hypernet, resolved, progress)
            dropped = len(set(doras[CONTENT]) | set(doras[STYLE]))
            merged.report.dora_magnitude_dropped = dropped
            merged.report.notes.append(
                f"{dropped} DoRA layer(s) merged WITHOUT their magnitude, as asked (dora={DORA_DROP_MAGNITUDE}): "
                "an approximation of what those LoRAs do")
            return merged
        # ComfyUI applies DoRA with the model's weights: keep those layers out of the method
        names = set(doras[CONTENT]) | set(doras[STYLE])
        merged = spec.run(_without(content, names), _without(style, names), hypernet, resolved, progress)
        for name in layer_names(content, style):
            if name in names:
                c, s = content.layers.get(name), style.layers.get(name)
                merged.layers[name] = MergedLayer(Side.of(c) if c else None, Side.of(s) if s else None)
                merged.report.summed_layers += c is not None and s is not None
                merged.report.content_only_layers += s is None
                merged.report.style_only_layers += c is None
                merged.report.dense_layers += 1
        merged.report.dora_magnitude_dropped = len(names)
        merged.report.notes.append(
            f"{len(names)} DoRA layer(s) are applied to the model as ComfyUI applies DoRA (with the model's "
            "weights), summed, not merged by the method; merged_lora and Save Merged LoRA carry them WITHOUT "
            "their magnitude (a LoRA file cannot hold DoRA merged with another LoRA)")
        return merged

    key = (method, tuple(sorted(resolved.items())), dora)
    base = cache.get_or_compute((content, style, hypernet), compute, key) if cache is not None else compute()
    merged = base.with_strengths(content_strength, style_strength)
    if merged.layers and content_strength == 0 and style_strength == 0:
        empty = "both strengths are 0: the merge changes nothing (the model passes through unchanged and nothing is saved)"
        merged.report.notes.append(empty)
        merged.report.alerts.append(empty)
    log.info("merge: %s", merged.report.summary())
    return merged
