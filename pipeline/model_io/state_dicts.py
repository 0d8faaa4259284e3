"""State-dict checks shared by the checkpoint loaders: prefix stripping, a strict comparison that reports every
difference at once, and reading one of our bare state-dict files (`torch.save(model.state_dict())`)."""

from __future__ import annotations

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
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--init {path!r}: expected a state dict of tensors (torch.save(model.state_dict()))")
    return strip_prefix(state)
