"""State-dict checks shared by the checkpoint loaders: the one safe read of a weights file (`load_weights_file`,
weights_only=True, its refusals in one line), prefix stripping, a strict comparison that reports every difference
at once, and reading one of our bare state-dict files (`torch.save(model.state_dict())`)."""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping

import torch

#: Buffers that older torch versions did not save; their absence is tolerated.
TOLERATED_MISSING_SUFFIXES = ("num_batches_tracked",)
#: BatchNorm buffers, dropped when the target norm has none (instance norm).
BATCH_STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


class CheckpointError(ValueError):
    """A checkpoint file cannot be read as Genesis weights."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's state dict does not match the model.

    Attributes ``missing``, ``unexpected`` (key lists) and ``shape_mismatches``
    (key -> (expected shape, got shape)) hold the details; the message (one line) gives the counts and the
    first few of each.
    """

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 shape_mismatches: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        self.source = source
        self.missing = missing
        self.unexpected = unexpected
        self.shape_mismatches = shape_mismatches
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_some(unexpected)}")
        shapes = [f"{key}: expected {list(want)} vs got {list(got)}" for key, (want, got) in shape_mismatches.items()]
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_some(shapes, 4)}")
        # one line: the CLI prints an error's first line only
        super().__init__(f"state dict from {source} does not match the model: {'; '.join(parts)} (check "
                         f"base_channels / in_channels / out_channels / norm against the checkpoint)")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _unpickler_detail(err: BaseException) -> str:
    """What torch's weights-only unpickler refused, without the advice around it (torch suggests loading with
    weights_only=False, which runs whatever code the file holds: that advice is never passed on)."""
    text = _ANSI.sub("", str(err))
    found = _GLOBAL.search(text)
    if found:
        return f"a Python object of type {found.group(1)}"
    _, _, rest = text.partition("WeightsUnpickler error:")
    rest = rest.split("Please use", 1)[0].split("Check the documentation", 1)[0]
    return " ".join(rest.split()).rstrip(".")


def _without_unsafe_advice(text: str) -> str:
    """`text`'s first line, minus any sentence that suggests weights_only=False."""
    line = next((ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()), "")
    kept = [s for s in re.split(r"(?<=\.)\s+", line) if not ("weights_only" in s and "False" in s)]
    return " ".join(kept).strip()


def load_weights_file(path: str) -> object:
    """`torch.load(path, weights_only=True)` on the CPU: tensors and plain containers only, so the file cannot run
    code. Anything else is a CheckpointError in one line naming the file and what was refused or why it is not a
    weights file; FileNotFoundError for a missing file. Never repeats torch's advice to load with
    weights_only=False: a file that needs it is one this project refuses."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        detail = _unpickler_detail(err)
        if detail.startswith("a Python object"):
            raise CheckpointError(
                f"{path}: refused: it holds {detail} besides tensors and plain containers, and weights files are "
                f"read with weights_only=True only, so that no file can run code; save the weights alone "
                f"(torch.save(model.state_dict(), FILE)) and use that file") from None
        raise CheckpointError(f"{path}: not a torch weights file ({detail or 'not a pickle torch.load reads'})") \
            from None
    except EOFError:
        raise CheckpointError(f"{path}: empty or truncated: no torch data in it") from None
    except Exception as err:  # noqa: BLE001 - not a zip, a damaged archive, an old-format file gone wrong
        detail = re.split(r"(?<=\.)\s+", _without_unsafe_advice(str(err)))[0].rstrip(".") or type(err).__name__
        raise CheckpointError(f"{path}: not a torch weights file, or a damaged one ({detail[:200]})") from None


def _some(items: list[str], limit: int = 8) -> str:
    """The first `limit` items, comma-separated, and how many more there are."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more)"


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Remove ``prefix`` (added by nn.DataParallel) from the keys that carry it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def check_state_dict(expected: Mapping[str, torch.Tensor], got: Mapping[str, object],
                     source: str) -> None:
    """Raise CheckpointMismatchError unless ``got`` has exactly ``expected``'s keys and
    shapes (missing ``num_batches_tracked`` buffers are tolerated)."""
    missing = [k for k in expected if k not in got and not k.endswith(TOLERATED_MISSING_SUFFIXES)]
    unexpected = [k for k in got if k not in expected]
    shapes = {}
    for key, want in expected.items():
        value = got.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            shapes[key] = (tuple(want.shape), (type(value).__name__,))
        elif tuple(value.shape) != tuple(want.shape):
            shapes[key] = (tuple(want.shape), tuple(value.shape))
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(source, missing, unexpected, shapes)


def load_checked(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Check ``state_dict`` against ``module`` and load it; BatchNorm buffers are
    dropped when the module has none (a batch-norm checkpoint into instance norm)."""
    expected = module.state_dict()
    has_batch_stats = any(k.endswith(BATCH_STAT_SUFFIXES) for k in expected)
    if not has_batch_stats:
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith(BATCH_STAT_SUFFIXES)}
    check_state_dict(expected, state_dict, source)
    module.load_state_dict(state_dict, strict=False)


def read_state_file(path: str) -> dict[str, torch.Tensor]:
    """The state dict in `path` (`torch.save(model.state_dict())`, or a dict holding one under `state_dict`),
    ``module.`` prefix removed, read with weights_only=True so the file cannot run code. The message of the
    ValueError for anything else names the file as the `--init` it was given as (fine-tuning's init and
    `load_model` both read state-dict files through here)."""
    state = load_weights_file(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--init {path!r}: expected a state dict of tensors (torch.save(model.state_dict()))")
    return strip_prefix(state)
