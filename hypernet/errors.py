"""Exception types. Every expected failure is a LoraRarError subclass whose message names the
file or input, what was expected and what was found; the CLI prints it as one line and the
ComfyUI nodes re-raise it as the node's error message."""


class LoraRarError(Exception):
    """Base class for expected, user-facing errors."""


class LoraFormatError(LoraRarError, ValueError):
    """A LoRA file that cannot be read or is not what it claims to be."""


class LoraMismatchError(LoraRarError, ValueError):
    """Two LoRAs (or a LoRA and a hypernetwork) that cannot be combined."""


class HypernetError(LoraRarError, ValueError):
    """A hypernetwork checkpoint with the wrong layout, shapes or hash."""


class OutputExistsError(LoraRarError, FileExistsError):
    """Refusing to overwrite an existing file."""


class JudgeInputError(LoraRarError, ValueError):
    """MLLM judge: an image, folder or setting that cannot be judged as given."""


class JudgeBackendError(LoraRarError, RuntimeError):
    """MLLM judge: the model server or local model failed (after any retries)."""


class TrainingError(LoraRarError, ValueError):
    """ZipLoRA merge / hypernetwork training: inputs, data or settings that cannot be used."""


class ManifestError(TrainingError):
    """A training manifest with bad entries; the message lists every problem, one per line."""


# ComfyUI shows an error's type as `<class.__module__>.<class name>`, and it imports this pack
# under its folder path, so users read "/…/custom_nodes/ComfyUI-LoRA-rar.hypernet.errors.
# HypernetError" before the message. There the types carry a short module name instead
# ("LoRA.rar.HypernetError"); imported as the `hypernet` library they keep their real one
# (pickling and tracebacks find them).
if not __name__.startswith("hypernet."):
    for _error in [v for v in globals().values() if isinstance(v, type) and issubclass(v, LoraRarError)]:
        _error.__module__ = "LoRA.rar"
