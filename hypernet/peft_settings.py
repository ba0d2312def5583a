"""peft's settings for a LoRA file, where alpha lives outside the tensors.

diffusers' `save_lora_weights` writes them per component into the safetensors header entry
`lora_adapter_metadata` ({"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {…}, …});
peft's `save_pretrained` writes `adapter_config.json` beside `adapter_model.safetensors`. Both are
validated here, with caps on what a hostile file may ask for (size, pattern count and length, and
the time the few patterns that need the regex engine may take). `hypernet/lora.py` applies them.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import LoraFormatError
from .safetensors_io import strict_json_loads

MAX_ADAPTER_CONFIG_BYTES = 16 << 20
MAX_PATTERNS = 4096          # rank_pattern / alpha_pattern entries per component
MAX_PATTERN_LENGTH = 256
_PATTERN_TIME_BUDGET_S = 2.0  # for the few patterns that need the regex engine

# Where a layer's alpha came from (LoraLayer.alpha_source).
ALPHA_FROM_TENSOR = "tensor"
ALPHA_FROM_HEADER = "lora_adapter_metadata"
ALPHA_FROM_ADAPTER_CONFIG = "adapter_config.json"
ALPHA_NONE = "none"



@dataclass
class PeftSettings:
    r: int
    alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool
    origin: str     # ALPHA_FROM_HEADER or ALPHA_FROM_ADAPTER_CONFIG
    where: str      # names the settings in messages


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def peft_settings_of(config: dict, origin: str, where: str) -> PeftSettings:
    """Validate one component's peft settings (peft's defaults r = 8, lora_alpha = 8 where absent,
    as `LoraConfig(**settings)` would use)."""
    def bad(name: str, expected: str) -> LoraFormatError:
        return LoraFormatError(f"{where}: {name} must be {expected}, found {str(config.get(name))[:80]!r}")

    r = config.get("r", 8)
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise bad("r", "a positive integer")
    alpha_key = "lora_alpha" if "lora_alpha" in config else "alpha"  # LoHa/LoKr configs say `alpha`
    alpha = config.get(alpha_key, 8)
    if not _number(alpha):
        raise bad(alpha_key, "a finite number")
    patterns = []
    for name, check, expected in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                                   "positive integers"),
                                  ("alpha_pattern", _number, "finite numbers")):
        value = config.get(name) or {}
        if not isinstance(value, dict) or not all(check(v) for v in value.values()):
            raise bad(name, f"an object mapping module patterns to {expected}")
        if len(value) > MAX_PATTERNS:
            raise LoraFormatError(f"{where}: {name} has {len(value)} entries; at most {MAX_PATTERNS} accepted")
        for key in value:
            check_pattern(key, f"{where}: {name}")
        patterns.append(value)
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise bad("use_rslora", "true or false")
    return PeftSettings(r, float(alpha), patterns[0], {k: float(v) for k, v in patterns[1].items()},
                         use_rslora, origin, where)


def header_settings(metadata: dict[str, str], source: str) -> dict[str, PeftSettings]:
    """diffusers' `lora_adapter_metadata`: {"unet.r": 4, "unet.lora_alpha": 8, …} → per component."""
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return {}
    where = f"{source}: header entry lora_adapter_metadata"
    parsed = strict_json_loads(raw, where)
    if not isinstance(parsed, dict):
        raise LoraFormatError(f"{where}: expected a JSON object, found {type(parsed).__name__}")
    components: dict[str, dict] = {}
    for key, value in parsed.items():
        component, dot, setting = key.partition(".")
        if dot:
            components.setdefault(component, {})[setting] = value
    return {component: peft_settings_of(config, ALPHA_FROM_HEADER, f"{where} ({component}.*)")
            for component, config in components.items()}


def adapter_config_for(path: str | Path) -> dict | None:
    """The `adapter_config.json` that peft's save_pretrained writes beside `adapter_model.safetensors`,
    parsed; None when `path` is not such a file or has no config beside it. Only that pairing is
    read: one stray adapter_config.json in a folder of LoRAs must not change all of them."""
    path = Path(path)
    config_path = path.with_name("adapter_config.json")
    if path.name != "adapter_model.safetensors" or not config_path.is_file():
        return None
    size = config_path.stat().st_size
    if size > MAX_ADAPTER_CONFIG_BYTES:
        raise LoraFormatError(f"{config_path}: {size} bytes; an adapter config is a few kB (at most "
                              f"{MAX_ADAPTER_CONFIG_BYTES} accepted)")
    parsed = strict_json_loads(config_path.read_bytes(), str(config_path))
    if not isinstance(parsed, dict):
        raise LoraFormatError(f"{config_path}: expected a JSON object, found {type(parsed).__name__}")
    parsed.setdefault("__path__", str(config_path))
    return parsed


_LITERAL_PATTERN = re.compile(r"\^?[\w.\-]+")
_GROUP_REPETITION = re.compile(r"\)[*+{]")
_UNBOUNDED = re.compile(r"(?<!\\)(?:[*+]|\{\d*,\})")


def check_pattern(pattern: str, where: str) -> None:
    """peft patterns are regular expressions; a hostile one could take exponential time. Module
    names (`down_blocks.1.attentions.0…to_q`) are accepted as such; other expressions only without
    repeated groups and with at most one unbounded repetition, which keeps matching polynomial."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_LENGTH:
        raise LoraFormatError(f"{where}: pattern {str(pattern)[:80]!r} is empty or longer than {MAX_PATTERN_LENGTH}")
    if _LITERAL_PATTERN.fullmatch(pattern):
        return
    if _GROUP_REPETITION.search(pattern) or len(_UNBOUNDED.findall(pattern)) > 1:
        raise LoraFormatError(f"{where}: pattern {pattern[:80]!r} repeats a group or has more than one unbounded "
                              "repetition; this reader evaluates only simple patterns (it could take "
                              "exponential time otherwise)")
    try:
        re.compile(rf"(.*\.)?({pattern})$")
    except re.error as exc:
        raise LoraFormatError(f"{where}: pattern {pattern[:80]!r} is not a valid regular expression ({exc})") from None


class PatternMatcher:
    """peft's get_pattern_key: the first key (in order) with re.match(rf"(.*\\.)?({key})$", module).
    Module-name patterns (the common case) are checked without the regex engine's backtracking."""

    def __init__(self, source: str):
        self.source = source
        self.regex_time = 0.0
        self._compiled: dict[str, re.Pattern] = {}

    def _matches(self, pattern: str, module: str) -> bool:
        if _LITERAL_PATTERN.fullmatch(pattern):
            anchored = pattern.startswith("^")
            body = pattern[1:] if anchored else pattern
            start = len(module) - len(body)
            if start < 0:
                return False
            compiled = self._compiled.get(body)
            if compiled is None:
                compiled = self._compiled[body] = re.compile(body)
            if not compiled.fullmatch(module, start):
                return False
            return start == 0 or (not anchored and module[start - 1] == ".")
        began = time.perf_counter()
        try:
            return re.match(rf"(.*\.)?({pattern})$", module) is not None
        finally:
            self.regex_time += time.perf_counter() - began
            if self.regex_time > _PATTERN_TIME_BUDGET_S:
                raise LoraFormatError(f"{self.source}: the rank/alpha patterns in its settings take too long to "
                                      "evaluate; refusing the file")

    def first(self, patterns: dict, module: str) -> str | None:
        return next((key for key in patterns if self._matches(key, module)), None)
