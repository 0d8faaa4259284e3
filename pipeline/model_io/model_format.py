"""The on-disk form of a logged model: an architecture config (JSON) and the weights (safetensors), nothing
that is unpickled on load.

Why: a model logged as a pickled module (MLflow's pytorch flavor, `data/model.pth`) runs whatever code a
replaced file carries when it is loaded. Here the architecture is named in JSON and rebuilt from this
project's classes, and the weights are read by safetensors, a format of raw tensors and a JSON header, so a
tampered file is an error, never code.

A logged model folder (MLflow pyfunc, loader module `pipeline.model_format`: a shim over this module, kept
under that name because every model logged so far names it as its loader):

    MLmodel                      flavors.python_function.loader_module: pipeline.model_format
                                 metadata.genesis_format: genesis-safetensors, genesis_format_version: 1,
                                 genesis_pipeline_version, genesis_git_commit
    data/genesis/architecture.json   {"architecture": "UNet3D", "kwargs": {"base_channels": 32, ...}}
    data/genesis/weights.safetensors the state dict
    data/genesis/task.yaml       (optional) the task file of a fine-tuned model (`pipeline.tasks.task_file`'s
                                 canonical text), read as YAML by a SafeLoader that refuses anchors/aliases
    data/genesis/preprocessing.json  (optional) how to apply the model: orientation, intensity rule, input size,
                                 label values, threshold, sliding window (`pipeline.predict` reads it); models
                                 logged before these files existed load as before, without them
    code/pipeline/...            the model code it was logged with (pipeline/__init__.py, model_format.py,
                                 model_io/ (this module and the state-dict and checkpoint readers the models
                                 use), models/), so `mlflow.pyfunc.load_model` works without this project
                                 installed
    requirements.txt             pinned torch, safetensors, numpy (and MLflow's own pin); no genesis-pipeline,
                                 so a resolver never fetches a same-named package from an index

A tampered folder is one ModelFormatError, and loading it allocates no more than its files hold: every
file is read with a size limit (JSON also with a nesting limit), the architecture's arguments must lie in
`ARG_RANGES`, and the model is built on the meta device and compared key by key (dtype, shape) with the
weights file's header before any tensor is read or allocated.

`pipeline.load_model` reads the folder itself (`read_model_folder`) and never imports the bundled code;
`mlflow.pyfunc.load_model` imports `pipeline.model_format` (the bundled copy when the project is not
installed), which hands it this module's `_load_pyfunc`: it reads the same two files the same safe way.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from itertools import chain
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from pipeline.model_io.safe_yaml import safe_yaml

__all__ = ["FORMAT", "FORMAT_VERSION", "ARG_RANGES", "CONFIG_FILE", "WEIGHTS_FILE", "DATA_DIR", "LOADER_MODULE",
           "architecture_config", "build_from_config", "check_config", "write_model_data", "read_model_data",
           "read_weights_header", "read_model_folder", "bundle_code", "BUNDLED_FILES", "model_requirements",
           "ModelFormatError", "GenesisPyfunc", "model_signature", "classifier_signature", "log_safe_model",
           "log_model", "log_finetuned_model", "TASK_FILE", "PREPROCESSING_FILE", "write_model_card",
           "read_model_card", "read_model_card_folder", "model_data_folder"]

FORMAT, FORMAT_VERSION = "genesis-safetensors", 1
CONFIG_FILE, WEIGHTS_FILE = "architecture.json", "weights.safetensors"
#: How a model is applied, beside its architecture and weights (optional: older models have neither).
TASK_FILE, PREPROCESSING_FILE = "task.yaml", "preprocessing.json"
#: The data folder's name; MLflow copies it to `data/<name>` in the model.
DATA_DIR = "genesis"
#: The pyfunc loader module a logged model names: the shim `pipeline/model_format.py` (already-logged models name
#: it, so it stays; it re-exports this module).
LOADER_MODULE = "pipeline.model_format"
#: What `bundle_code` copies, relative to the `pipeline` folder: the loader shim, this room's files the models
#: need (no `load`/`weights`: they reach the tracking layer), and every file of `models/`.
BUNDLED_FILES = ("__init__.py", "model_format.py", "model_io/__init__.py", "model_io/model_format.py",
                 "model_io/state_dicts.py", "model_io/official.py", "model_io/safe_yaml.py")

#: Size limits of what is read before anything is checked: a file over its limit is refused unread, so a
#: tampered file cannot make the reader allocate more than this (the weights' data is bounded by the model).
MAX_CONFIG_BYTES = 64 * 1024
#: A task file and a preprocessing record are a few kB; a label list of a few hundred names fits easily.
MAX_CARD_BYTES = 256 * 1024
MAX_MLMODEL_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
#: Deepest nesting of JSON arrays/objects accepted (the config needs 2, a safetensors header 3): deeper is
#: refused before parsing, so no parser ever recurses on it.
MAX_JSON_DEPTH = 8
#: Most dimensions of one tensor in a weights header (the model's convs have 5).
MAX_TENSOR_DIMS = 8

#: The constructor arguments each architecture may be rebuilt with: their type and, for ints, the inclusive
#: range. The maxima are far above any model trained here (reference: base_channels 32, 1 input channel) and
#: keep even the shapes a tampered config describes small enough to check on the meta device.
ARG_RANGES: dict[str, tuple[int, int]] = {
    "base_channels": (1, 256), "in_channels": (1, 64), "out_channels": (1, 1024), "n_outputs": (1, 100_000),
    "hidden": (1, 65_536),
}
_ARGS: dict[str, dict[str, type]] = {
    "UNet3D": {"base_channels": int, "in_channels": int, "out_channels": int, "norm": str, "sigmoid": bool},
    "UNet3DClassifier": {"base_channels": int, "in_channels": int, "n_outputs": int, "hidden": int, "norm": str},
}
#: safetensors' dtype names of the dtypes a model's state may hold, and their item sizes.
_ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
_ST_NAMES = {dtype: name for name, (dtype, _) in _ST_DTYPES.items()}
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


class ModelFormatError(ValueError):
    """A logged model that cannot be loaded safely: wrong format, tampered or missing files."""


def architecture_config(model: nn.Module) -> dict:
    """The JSON-able description that `build_from_config` rebuilds `model`'s architecture from."""
    from pipeline.models.classifier import UNet3DClassifier
    from pipeline.models.unet3d import UNet3D

    if isinstance(model, UNet3D):
        kwargs = {"base_channels": model.base_channels, "in_channels": model.in_channels,
                  "out_channels": model.out_channels, "norm": model.norm, "sigmoid": bool(model.out_tr.apply_sigmoid)}
    elif isinstance(model, UNet3DClassifier):
        kwargs = {"base_channels": model.base_channels, "in_channels": model.in_channels, "norm": model.norm,
                  "n_outputs": model.fc2.out_features, "hidden": model.fc1.out_features}
    else:
        raise ModelFormatError(f"cannot log a {type(model).__name__}: only UNet3D and UNet3DClassifier have a "
                               f"safe logged form")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": type(model).__name__,
            "kwargs": kwargs}


def build_from_config(config: object, source: str = "the config", device: str | torch.device | None = None
                      ) -> nn.Module:
    """A freshly initialised model of the architecture `config` names (checked: known class, known
    arguments of the right types within `ARG_RANGES`; the constructor checks the rest), built on `device`
    (default: torch's default). `read_model_data` builds on "meta", which allocates no memory, so the
    shapes a config describes are compared with the weights file before anything real is allocated."""
    from pipeline.models.classifier import UNet3DClassifier
    from pipeline.models.unet3d import UNet3D

    arch, kwargs = check_config(config, source)
    cls = {"UNet3D": UNet3D, "UNet3DClassifier": UNet3DClassifier}[arch]
    try:
        if device is None:
            return cls(**kwargs)
        with torch.device(device):
            return cls(**kwargs)
    except ValueError as err:
        raise ModelFormatError(f"{source}: {err}") from None


def check_config(config: object, source: str = "the config") -> tuple[str, dict]:
    """(architecture name, constructor arguments) of an architecture config, or a ModelFormatError naming
    the field that is not what `architecture_config` writes."""
    if not isinstance(config, dict):
        raise ModelFormatError(f"{source}: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(f"{source}: format {config.get('format')!r} version {config.get('format_version')!r}, "
                               f"expected {FORMAT!r} version {FORMAT_VERSION} (logged by another genesis version?)")
    arch, kwargs = config.get("architecture"), config.get("kwargs")
    if not isinstance(arch, str) or arch not in _ARGS:
        raise ModelFormatError(f"{source}: architecture {arch!r} is not one of {sorted(_ARGS)}")
    if not isinstance(kwargs, dict):
        raise ModelFormatError(f"{source}: 'kwargs' must be an object, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        want = _ARGS[arch].get(key)
        if want is None:
            raise ModelFormatError(f"{source}: {arch} has no argument {key!r} (allowed: {sorted(_ARGS[arch])})")
        if type(value) is not want:  # noqa: E721 - bool is not an int here
            raise ModelFormatError(f"{source}: {arch} argument {key}={value!r} must be a {want.__name__}")
        if want is int:
            low, high = ARG_RANGES[key]
            if not low <= value <= high:
                raise ModelFormatError(f"{source}: {arch} argument {key}={value} is outside the allowed range "
                                       f"{low}..{high}")
    return arch, dict(kwargs)


def write_model_data(model: nn.Module, folder: str | Path) -> Path:
    """Write `folder`/architecture.json and `folder`/weights.safetensors (CPU, contiguous) for `model`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = architecture_config(model)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "genesis_format": FORMAT})
    return folder


def read_model_data(folder: str | Path, source: str | None = None) -> nn.Module:
    """The model in `folder` (architecture.json + weights.safetensors), in eval mode on the CPU. Nothing in
    the folder is unpickled or executed: a file that is not what it should be is a ModelFormatError.

    Order matters: the config is read (bounded) and its model built on the meta device; the weights
    file's header alone (bounded) must then name exactly the meta model's keys, shapes and dtypes, with data
    offsets that tile the file. Only then is the data read, so the memory a load takes is that of the
    weights file, whatever a tampered config or header claims."""
    folder = Path(folder)
    source = source or str(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelFormatError(f"{source}: no {path.name} in the model's data folder")
    config = _read_json(config_path, MAX_CONFIG_BYTES, f"{source}: {CONFIG_FILE}")
    model = build_from_config(config, f"{source}: {CONFIG_FILE}", device="meta")
    expected = {key: (_dtype_name(value.dtype), tuple(value.shape)) for key, value in model.state_dict().items()}
    _check_weights(expected, read_weights_header(weights_path, source), config, source)
    state = _read_weights(weights_path, source)
    # checked again on what was read: the file may have changed since its header was
    _check_weights(expected, {k: (_dtype_name(v.dtype), tuple(v.shape)) for k, v in state.items()}, config, source)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ModelFormatError(f"{source}: {WEIGHTS_FILE} does not load into the model ({_first_line(err)})") from None
    left = [name for name, tensor in chain(model.named_parameters(), model.named_buffers()) if tensor.is_meta]
    if left:
        raise ModelFormatError(f"{source}: {WEIGHTS_FILE} leaves {len(left)} tensors unset: {', '.join(left[:4])}")
    model.genesis_task_file, model.genesis_preprocessing = read_model_card(folder, source)
    return model.eval()


def write_model_card(folder: str | Path, task_file: str | None = None, preprocessing: dict | None = None) -> None:
    """Write how the model is applied beside its weights: `task.yaml` (the task file's text) and
    `preprocessing.json` (a JSON object of plain values); either may be None (not written). Checked here as the
    reader checks them, so a model is never logged with a card that would not load."""
    folder = Path(folder)
    if task_file is not None:
        if not isinstance(task_file, str):
            raise ModelFormatError(f"task_file must be the task file's text (a str), got {type(task_file).__name__}")
        _check_task_text(task_file.encode("utf-8"), f"the task file logged with the model")
        (folder / TASK_FILE).write_text(task_file, encoding="utf-8")
    if preprocessing is not None:
        if not isinstance(preprocessing, dict):
            raise ModelFormatError(f"preprocessing must be a dict, got {type(preprocessing).__name__}")
        try:
            raw = json.dumps(preprocessing, indent=1, allow_nan=False, sort_keys=False) + "\n"
        except (TypeError, ValueError) as err:
            raise ModelFormatError(f"preprocessing is not plain JSON data ({_first_line(err)})") from None
        _parse_json(raw.encode("utf-8"), lambda problem: ModelFormatError(f"preprocessing: {problem}"))
        if len(raw.encode("utf-8")) > MAX_CARD_BYTES:
            raise ModelFormatError(f"preprocessing: {len(raw)} bytes, over the {MAX_CARD_BYTES}-byte limit")
        (folder / PREPROCESSING_FILE).write_text(raw, encoding="utf-8")


def read_model_card(folder: str | Path, source: str | None = None) -> tuple[str | None, dict | None]:
    """(task file text, preprocessing dict) of a model's data folder; None for a file the model does not have
    (models logged before these files existed). Bounded reads, YAML without anchors/aliases and strict JSON: nothing is
    built or run; a file that is there but not what it should be is a ModelFormatError."""
    folder = Path(folder)
    source = source or str(folder)
    task_path, pre_path = folder / TASK_FILE, folder / PREPROCESSING_FILE
    task_text = None
    if task_path.exists():
        raw = _read_bounded(task_path, MAX_CARD_BYTES, f"{source}: {TASK_FILE}")
        task_text = _check_task_text(raw, f"{source}: {TASK_FILE}")
    preprocessing = None
    if pre_path.exists():
        preprocessing = _read_json(pre_path, MAX_CARD_BYTES, f"{source}: {PREPROCESSING_FILE}")
        if not isinstance(preprocessing, dict):
            raise ModelFormatError(f"{source}: {PREPROCESSING_FILE} is a {type(preprocessing).__name__}, "
                                   f"not a JSON object")
    return task_text, preprocessing


def _check_task_text(raw: bytes, what: str) -> str:
    """The task file's text when it is UTF-8 YAML of one mapping (its keys are checked by the task layer)."""
    import yaml

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ModelFormatError(f"{what}: not UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        data = safe_yaml(text)
    except (yaml.YAMLError, RecursionError) as err:
        why = getattr(err, "problem", None) if isinstance(err, yaml.YAMLError) else None
        raise ModelFormatError(f"{what}: not valid YAML ({type(err).__name__}{': ' + why if why else ''})"
                               ) from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{what}: a task file is a mapping, got {type(data).__name__}")
    return text


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as err:
        raise ModelFormatError(f"{what}: cannot read it ({_first_line(err)})") from None
    if len(raw) > limit:
        raise ModelFormatError(f"{what}: over the {limit}-byte limit, refusing to read it")
    return raw


def read_weights_header(path: str | Path, source: str | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (safetensors dtype name, shape)} from a safetensors file's header, reading the header only
    (at most MAX_HEADER_BYTES). Checked: every entry well formed, every tensor's byte range of its dtype
    and shape, the ranges tiling the data exactly up to the end of the file."""
    path = Path(path)
    source = source or str(path)

    def bad(problem: str) -> ModelFormatError:
        return ModelFormatError(f"{source}: {path.name} is not a valid safetensors file, refusing to load it "
                                f"({problem})")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            length = int.from_bytes(head, "little")
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise bad(f"header length {length} exceeds "
                          + ("the file" if length > size - 8 else f"the {MAX_HEADER_BYTES}-byte limit"))
            raw = f.read(length)
    except OSError as err:
        raise ModelFormatError(f"{source}: cannot read {path.name} ({_first_line(err)})") from None
    if len(raw) != length:
        raise bad("file shorter than its header")
    header = _parse_json(raw, lambda problem: bad(f"header: {problem}"))
    if not isinstance(header, dict):
        raise bad(f"header is a {type(header).__name__}, not an object")
    entries, ranges = {}, []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise bad("__metadata__ is not an object of strings")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {key!r} is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise bad(f"{key!r} has dtype {dtype!r}, not one of {sorted(_ST_DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= MAX_TENSOR_DIMS
                and all(type(n) is int and n >= 0 for n in shape)):
            raise bad(f"{key!r} has shape {shape!r}, not a list of at most {MAX_TENSOR_DIMS} sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"{key!r} has data_offsets {offsets!r}")
        if offsets[1] - offsets[0] != math.prod(shape) * _ST_DTYPES[dtype][1]:
            raise bad(f"{key!r}: {offsets[1] - offsets[0]} bytes for a {dtype} tensor of shape {shape}")
        entries[key] = (dtype, tuple(shape))
        ranges.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(ranges):
        if begin != end:
            raise bad(f"{key!r} starts at byte {begin} of the data, expected {end} (overlapping or a gap)")
        end = stop
    if end != size - 8 - length:
        raise bad(f"the tensors take {end} bytes, the file holds {size - 8 - length} after its header")
    return entries


def _check_weights(expected: dict[str, tuple[str, tuple[int, ...]]], got: dict[str, tuple[str, tuple[int, ...]]],
                   config: dict, source: str) -> None:
    """One ModelFormatError naming every key that is missing, unexpected, or of another dtype or shape."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    differ = [f"{k}: expected {expected[k][0]} {list(expected[k][1])}, got {got[k][0]} {list(got[k][1])}"
              for k in expected if k in got and got[k] != expected[k]]
    if not (missing or unexpected or differ):
        return
    parts = [f"{label} ({len(items)}): {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}"
             for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                  ("dtype/shape mismatches", differ)) if items]
    kwargs = ", ".join(f"{k}={v!r}" for k, v in config["kwargs"].items())
    raise ModelFormatError(f"{source}: {WEIGHTS_FILE} does not match {CONFIG_FILE} ({config['architecture']}"
                           f"({kwargs})): {'; '.join(parts)}")


def _read_weights(path: Path, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each copied out of the file's memory map (a tensor left on the
    map would change when the file does)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key).clone() for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ModelFormatError(f"{source}: {path.name} is not a valid safetensors file, refusing to load it "
                               f"({_first_line(err)})") from None


def _read_json(path: Path, limit: int, what: str) -> object:
    """`path` parsed as JSON, refused unread when over `limit` bytes; see `_parse_json`."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise ModelFormatError(f"{what}: {size} bytes, over the {limit}-byte limit, refusing to read it")
        with open(path, "rb") as f:
            raw = f.read(limit + 1)  # bounded even if the file grew since
    except OSError as err:
        raise ModelFormatError(f"{what}: cannot read it ({_first_line(err)})") from None
    if len(raw) > limit:
        raise ModelFormatError(f"{what}: over the {limit}-byte limit, refusing to read it")
    return _parse_json(raw, lambda problem: ModelFormatError(f"{what} is not valid JSON ({problem})"))


def _parse_json(raw: bytes, bad) -> object:
    """Strict JSON from `raw`: UTF-8, nesting at most MAX_JSON_DEPTH (checked before parsing, so the
    parser never recurses deeply), no NaN/Infinity, no repeated keys (two readers could take different
    ones). `bad(problem)` makes the error raised."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise bad(f"not UTF-8: {err.reason} at byte {err.start}") from None
    depth = 0
    for char in re.sub(r"[^\[\]{}]", "", _JSON_STRING.sub("", text)):  # the brackets outside strings
        depth += 1 if char in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise bad(f"nested deeper than {MAX_JSON_DEPTH} levels")

    def constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    def pairs(items: list[tuple[str, object]]) -> dict:
        seen = set()
        for key, _ in items:
            if key in seen:
                raise ValueError(f"repeated key {key!r}")
            seen.add(key)
        return dict(items)

    try:
        return json.loads(text, parse_constant=constant, object_pairs_hook=pairs)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise bad(_first_line(err)) from None


def _dtype_name(dtype: torch.dtype) -> str:
    return _ST_NAMES.get(dtype, str(dtype))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def read_model_folder(folder: str | Path, source: str | None = None) -> nn.Module:
    """The model of a logged MLflow model folder (one holding `MLmodel`), read with `read_model_data`.
    A model in MLflow's pickle format (pytorch flavor) is refused, not unpickled."""
    folder = Path(folder)
    source = source or str(folder)
    return read_model_data(model_data_folder(folder, source), source)


def read_model_card_folder(folder: str | Path, source: str | None = None) -> tuple[str | None, dict | None]:
    """`read_model_card` of a logged MLflow model folder: its task file and preprocessing, weights unread."""
    folder = Path(folder)
    source = source or str(folder)
    return read_model_card(model_data_folder(folder, source), source)


def model_data_folder(folder: str | Path, source: str | None = None) -> Path:
    """The data folder (architecture, weights, card) of a logged MLflow model folder, from its MLmodel file;
    a ModelFormatError when it is not a Genesis model in this format."""
    import yaml

    folder = Path(folder)
    source = source or str(folder)
    try:
        with open(folder / "MLmodel", "rb") as f:
            raw = f.read(MAX_MLMODEL_BYTES + 1)
        if len(raw) > MAX_MLMODEL_BYTES:
            raise ModelFormatError(f"{source}: its MLmodel file is over the {MAX_MLMODEL_BYTES}-byte limit, "
                                   f"refusing to read it")
        meta = yaml.safe_load(raw.decode("utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:
        raise ModelFormatError(f"{source}: cannot read its MLmodel file ({type(err).__name__})") from None
    meta = meta if isinstance(meta, dict) else {}
    flavors = meta.get("flavors") if isinstance(meta.get("flavors"), dict) else {}
    metadata = meta.get("metadata") if isinstance(meta.get("metadata"), dict) else {}
    if metadata.get("genesis_format") != FORMAT:
        if "pytorch" in flavors:
            fmt = flavors["pytorch"].get("serialization_format", "pickle") if isinstance(flavors["pytorch"], dict) \
                else "pickle"
            raise ModelFormatError(
                f"{source}: logged in MLflow's pytorch flavor ({fmt} serialization, data/model.pth), which is "
                f"refused because unpickling it can run arbitrary code; if you trust where it came from, "
                f"re-publish it in the safe format: torch.save(mlflow.pytorch.load_model(URI).state_dict(), "
                f"'w.pt'), then `genesis weights import w.pt --axes zyx --name NAME`")
        raise ModelFormatError(f"{source}: not a Genesis model (no genesis_format {FORMAT!r} in its MLmodel "
                               f"metadata; flavors: {sorted(flavors) or 'none'})")
    version = metadata.get("genesis_format_version")
    if version != FORMAT_VERSION:
        raise ModelFormatError(f"{source}: genesis_format_version {version!r}, this genesis reads version "
                               f"{FORMAT_VERSION}")
    pyfunc = flavors.get("python_function") if isinstance(flavors.get("python_function"), dict) else {}
    data = folder / str(pyfunc.get("data") or f"data/{DATA_DIR}")
    if not data.resolve().is_relative_to(folder.resolve()):
        raise ModelFormatError(f"{source}: its MLmodel points the model data outside the model folder ({data})")
    return data


def bundle_code(dest: str | Path) -> Path:
    """Copy the code a logged model needs (`BUNDLED_FILES` and `models/*.py`; no caches) to `dest`/pipeline,
    for MLflow's `code_paths`; returns that folder."""
    src = Path(__file__).resolve().parent.parent
    out = Path(dest) / "pipeline"
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "model_io").mkdir(parents=True, exist_ok=True)
    for name in BUNDLED_FILES:
        shutil.copy2(src / name, out / name)
    for path in sorted((src / "models").glob("*.py")):
        shutil.copy2(path, out / "models" / path.name)
    return out


def model_requirements() -> list[str]:
    """The pip requirements of a logged model, every one pinned to the version logging it: the model code
    travels in the model (`bundle_code`), so this project itself is not a requirement."""
    import importlib.metadata as md

    return [f"{name}=={md.version(name).split('+')[0]}" for name in ("torch", "safetensors", "numpy")]


class GenesisPyfunc:
    """What `mlflow.pyfunc.load_model` wraps: (N, C, D, H, W) float32 arrays in, the model's output out.

    A cube's output does not depend on the rest of its batch, as with `pipeline.load_model`: a "batch" model uses
    its running statistics, a "batch_stats" model (pretrained restoration models, older fine-tuned models)
    predicts each cube on its own, normalised with its own statistics as the reference normalises a batch of one
    (`pipeline.models.norms.set_per_cube_statistics`)."""

    def __init__(self, model: nn.Module):
        from pipeline.models.norms import set_per_cube_statistics

        set_per_cube_statistics(model)
        self.model = model.eval()

    def predict(self, model_input, params=None):
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(model_input, dtype=np.float32)))
        with torch.no_grad():
            return self.model(x).numpy()


def _load_pyfunc(data_path: str, model_config=None) -> GenesisPyfunc:
    """MLflow's entry point for the python_function flavor (loader_module)."""
    return GenesisPyfunc(read_model_data(data_path))


# --------------------------------------------------------------------------- logging into an MLflow run

def model_signature(channels: int = 1):
    """Any batch size and any cube size: (-1, C, -1, -1, -1) float32 in and out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    spec = TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1, -1))
    return ModelSignature(inputs=Schema([spec]), outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1, -1))]))


def log_safe_model(model, name: str = "model", signature=None, task_file: str | None = None,
                   preprocessing: dict | None = None):
    """Log `model` into the active run (the one a `pipeline.runtime.tracking.RunLogger` holds open) as an MLflow
    pyfunc model in this form: architecture JSON + safetensors weights, the model code bundled (`code_paths`),
    every requirement pinned; the project's version, git commit and U-Net width (`genesis_width`, which
    `Tracker.register_model` reads to group versions) in the model's metadata. `task_file` (the task file's
    text) and `preprocessing` (how to apply the model) go beside the weights (`write_model_card`), so whoever
    applies the model need not guess them. Returns MLflow's ModelInfo."""
    import tempfile
    import warnings

    import mlflow.pyfunc

    from pipeline.runtime.tracking import git_state, project_version

    version = project_version()
    commit, dirty = git_state(Path(__file__).resolve().parents[2])
    with tempfile.TemporaryDirectory(prefix="genesis-model-") as tmp, warnings.catch_warnings():
        # the signature says it all (any batch and cube size); an example would make MLflow run the model here
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        data = write_model_data(model, Path(tmp) / DATA_DIR)
        write_model_card(data, task_file, preprocessing)
        code = bundle_code(Path(tmp) / "code")
        return mlflow.pyfunc.log_model(
            name=name, loader_module=LOADER_MODULE, data_path=str(data), code_paths=[str(code)],
            pip_requirements=model_requirements(), signature=signature,
            metadata={"genesis_format": FORMAT, "genesis_format_version": FORMAT_VERSION,
                      "genesis_pipeline_version": version, "genesis_git_commit": commit,
                      "genesis_git_dirty": dirty, "genesis_architecture": type(model).__name__,
                      "genesis_width": getattr(model, "base_channels", None),
                      "genesis_task": _task_name(task_file)})


def classifier_signature(channels: int = 1):
    """Any batch and cube size in, one logit per cube out: (-1, C, -1, -1, -1) -> (-1, 1)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    spec = TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1, -1))
    return ModelSignature(inputs=Schema([spec]), outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1))]))


def log_finetuned_model(model, in_channels: int = 1, kind: str = "segmentation", name: str = "model",
                        task_file: str | None = None, preprocessing: dict | None = None):
    """A fine-tuned model: the U-Net (probabilities (-1, 1, D, H, W)) or the classifier (logits (-1, 1)), with
    its task file's text (`pipeline.tasks.task_file.task_file_text(spec)`: this floor does not read TaskSpecs)
    and its preprocessing (`pipeline.finetune.worker` writes both)."""
    sig = model_signature(in_channels) if kind == "segmentation" else classifier_signature(in_channels)
    return log_safe_model(model, name=name, signature=sig, task_file=task_file, preprocessing=preprocessing)


def log_model(model, name: str = "model", preprocessing: dict | None = None, task_file: str | None = None):
    """A pretrained U-Net (or an imported classifier) into the active run, in the safe logged form; its
    `preprocessing` (the pretraining recipe: orientation, intensity normalisation) beside the weights."""
    from pipeline.models.classifier import UNet3DClassifier

    sig = (classifier_signature if isinstance(model, UNet3DClassifier) else model_signature)(model.in_channels)
    return log_safe_model(model, name=name, signature=sig, task_file=task_file, preprocessing=preprocessing)


def _task_name(task_file: str | None) -> str | None:
    """The `name:` of a task file's text, for the model's metadata (None without one)."""
    if task_file is None:
        return None
    data = safe_yaml(task_file)  # checked by write_model_card first: one mapping, no aliases
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None
