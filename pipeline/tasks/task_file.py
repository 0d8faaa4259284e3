"""Task files: a `TaskSpec` as YAML, read strictly and written with comments where a person should look.

A task is data, so it lives in a file a person can read, diff and hand to `genesis finetune --task FILE`; the
five built-in tasks are such files too. Reading is strict in the way a config a run depends on should be: an
unknown key (a typo would otherwise fall back to a default silently) or a value of the wrong type is an error that
names the file, the key and the value. The spec's own checks (`TaskSpec.__post_init__` and its parts) then check
what the values mean together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import reprlib
import types
import typing
from pathlib import Path

import yaml

from pipeline.model_io.safe_yaml import NoAliasLoader, safe_yaml
from pipeline.tasks.spec import TaskSpec

__all__ = ["TaskFileError", "NoAliasLoader", "safe_yaml", "shown", "task_from_dict", "task_to_dict", "task_to_yaml",
           "load_task_file", "task_from_text", "task_file_text", "task_file_sha256", "is_task_file", "TASK_FILE_SUFFIXES", "TaskRecord", "task_record"]

TASK_FILE_SUFFIXES = (".yaml", ".yml")


class TaskFileError(ValueError):
    """A task file that cannot be read as a TaskSpec; the message names the file, the key and the value."""


_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxtuple, _SHOW.maxdict = 2, 6, 6, 6
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 80, 80, 40
SHOWN_CHARS = 160
"""The most characters of a value an error message shows."""


def shown(value) -> str:
    """`repr(value)` capped (reprlib: two levels, a few items, then at most SHOWN_CHARS characters), for error
    messages: a value from a file is shown, never expanded in full."""
    text = _SHOW.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def is_task_file(ref: str) -> bool:
    """A task reference that names a file rather than a built-in task."""
    return str(ref).lower().endswith(TASK_FILE_SUFFIXES) or "/" in str(ref) or Path(str(ref)).is_file()


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, key: str):
    """`value` (from YAML/JSON) as annotation `tp` wants it: lists become tuples, nested dicts dataclasses.
    Raises TaskFileError naming `key` and the value when it cannot be."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except TaskFileError as exc:
                errors.append(str(exc))
        raise TaskFileError(errors[0] if len(errors) == 1 else f"{key}: {shown(value)} is not a valid value "
                            f"(expected {' or '.join(_type_name(a) for a in args)})")
    if origin is typing.Literal:
        if value not in args:
            raise TaskFileError(f"{key}: {shown(value)} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return _dataclass_from(value, tp, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TaskFileError(f"{key}: expected a list, got {shown(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise TaskFileError(f"{key}: expected a list of {len(args)} values, got {shown(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise TaskFileError(f"{key}: expected a mapping, got {shown(value)}")
        kt, vt = args or (str, object)
        return {_convert(k, kt, f"{key} key"): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise TaskFileError(f"{key}: expected true or false, got {shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise TaskFileError(f"{key}: expected an integer, got {shown(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TaskFileError(f"{key}: expected a finite number, got {shown(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TaskFileError(f"{key}: expected a string, got {shown(value)}")
        return value
    if tp is object:
        return value
    raise TaskFileError(f"{key}: unsupported type {_type_name(tp)}")


def _dataclass_from(value, cls, where: str):
    if not isinstance(value, dict):
        raise TaskFileError(f"{where}: expected a mapping of {cls.__name__}'s keys, got {shown(value)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, value)) - set(fields))
    if unknown:
        raise TaskFileError(f"unknown key {shown(_join(where, unknown[0]))} (value {shown(value[unknown[0]])}); "
                            f"{cls.__name__} has {', '.join(fields)}")
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in value]
    if missing:
        raise TaskFileError(f"missing key {_join(where, missing[0])!r} ({cls.__name__} needs "
                            f"{', '.join(required)})")
    hints = _hints(cls)
    kwargs = {name: _convert(v, hints[name], _join(where, name)) for name, v in value.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise TaskFileError(str(exc)) from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def task_from_dict(d: dict, where: str = "task") -> TaskSpec:
    """A TaskSpec from plain data (a parsed task file); `where` prefixes every message (the file's name).

    Every key must be a TaskSpec field (nested: `sampling.label`); a wrong type or an unknown key is a
    TaskFileError naming the key and the value, and TaskSpec's own checks run last."""
    try:
        return _dataclass_from(d, TaskSpec, "")
    except TaskFileError as exc:
        raise TaskFileError(f"{where}: {exc}") from None


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def task_to_dict(spec: TaskSpec) -> dict:
    """The spec as plain data (lists, not tuples) in field order; `task_from_dict` reads it back equal."""
    return _plain(dataclasses.asdict(spec))


def _scalar(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True, sort_keys=False).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") else text


LONG_TEXT = 100
"""A string longer than this is wrapped over several lines (a note reads as a paragraph, not one long line)."""


def _emit(d: dict, comments: dict[str, str], prefix: str, indent: int, out: list[str]) -> None:
    pad = "  " * indent
    for key, value in d.items():
        dotted = _join(prefix, key)
        for line in (comments.get(dotted) or "").splitlines():
            out.append(f"{pad}# {line}".rstrip())
        if isinstance(value, dict) and value:
            out.append(f"{pad}{key}:")
            _emit(value, comments, dotted, indent + 1, out)
        elif isinstance(value, str) and len(value) > LONG_TEXT:
            # PyYAML folds the quoted string itself (continuation lines indented under the key): it reads back equal
            text = yaml.safe_dump({key: value}, width=LONG_TEXT + 10, allow_unicode=True, sort_keys=False)
            out.extend(f"{pad}{line}" for line in text.rstrip("\n").splitlines())
        else:
            out.append(f"{pad}{key}: {_scalar(value)}")


def task_to_yaml(spec: TaskSpec | dict, comments: dict[str, str] | None = None, header: str = "") -> str:
    """The spec as a YAML task file. `comments` maps a key (dotted for nested keys: "sampling.label") to a comment
    written above it (where a person should check a value); `header` is a comment block at the top. Lists are
    written inline ([32, 64, 64]) so that a cube size reads as one value."""
    data = task_to_dict(spec) if isinstance(spec, TaskSpec) else _plain(spec)
    out = [f"# {line}".rstrip() for line in header.splitlines()]
    _emit(data, comments or {}, "", 0, out)
    return "\n".join(out) + "\n"


def task_file_text(spec: TaskSpec) -> str:
    """The canonical task file of a spec (no comments): what stores and MLflow runs record."""
    return task_to_yaml(spec)


def task_file_sha256(spec: TaskSpec) -> str:
    return hashlib.sha256(task_file_text(spec).encode()).hexdigest()


def task_from_text(text: str, where: str) -> TaskSpec:
    """A TaskSpec from a task file's text (a file, a store's attributes, an MLflow artifact); `where` names it.
    Read with `safe_yaml`: an anchor or alias is an error, and values in messages are capped (`shown`)."""
    try:
        data = safe_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise TaskFileError(f"{where}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise TaskFileError(f"{where}: not valid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise TaskFileError(f"{where}: a task file is a mapping of TaskSpec keys (name, kind, ...), got "
                            f"{type(data).__name__}")
    return task_from_dict(data, where=where)


def load_task_file(path: str | Path) -> TaskSpec:
    """Read a YAML task file; every error names the file."""
    p = Path(path)
    if p.is_dir():
        raise TaskFileError(f"{p}: is a folder, not a task file (.yaml)")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskFileError(f"{p}: no such task file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskFileError(f"{p}: cannot read the task file ({exc})") from None
    return task_from_text(text, str(p))


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    """What a run or a store records about the task it used: the canonical task file, its digest, and where the
    task came from (`builtin`, the task file's path, or the patch store whose attributes held it)."""

    name: str
    text: str
    sha256: str
    source: str

    @property
    def artifact_file(self) -> str:
        """Where an MLflow run keeps the task file."""
        return f"task/{self.name}.yaml"

    def tags(self) -> dict[str, str]:
        return {"task_file_sha256": self.sha256, "task_source": self.source}


def task_record(spec: TaskSpec, source: str) -> TaskRecord:
    text = task_file_text(spec)
    return TaskRecord(name=spec.name, text=text, sha256=hashlib.sha256(text.encode()).hexdigest(), source=source)
