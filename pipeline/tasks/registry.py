"""The task registry: name -> `TaskSpec`. The five built-in tasks (their task files) are registered on first use;
a task file given by path (`resolve_task`) is registered for the rest of the process, with where it came from."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.tasks.spec import TaskSpec
from pipeline.tasks.task_file import TaskFileError, is_task_file, load_task_file

__all__ = ["register", "get_task", "task_names", "all_tasks", "tasks_table", "builtin_names", "resolve_task",
           "task_source", "BUILTIN_SOURCE"]

BUILTIN_SOURCE = "builtin"
_TASKS: dict[str, TaskSpec] = {}
_SOURCES: dict[str, str] = {}


def _ensure_builtin() -> None:
    if not _TASKS:
        from pipeline.tasks.builtin import load_builtin_tasks

        for spec in load_builtin_tasks():
            _TASKS[spec.name] = spec
            _SOURCES[spec.name] = BUILTIN_SOURCE


def builtin_names() -> tuple[str, ...]:
    """The names of the built-in tasks (a task file may not reuse one)."""
    from pipeline.tasks.builtin import BUILTIN_NAMES

    return BUILTIN_NAMES


def register(spec: TaskSpec, *, replace: bool = False, source: str = "registered") -> TaskSpec:
    """Add a task (a sixth one, or a variant); refuses to shadow an existing name unless asked, and never a
    built-in task's name. `source` says where it came from (a task file's path), recorded on the runs using it."""
    _ensure_builtin()
    if spec.name in builtin_names() and _TASKS.get(spec.name) != spec:
        raise ValueError(f"task {spec.name!r} is a built-in task's name; give the task its own name (models are "
                         f"registered as genesis-<name>)")
    if spec.name in _TASKS and not replace:
        raise ValueError(f"task {spec.name!r} is already registered; pass replace=True to redefine it")
    _TASKS[spec.name] = spec
    if spec.name not in builtin_names():
        _SOURCES[spec.name] = source
    return spec


def get_task(name: str) -> TaskSpec:
    _ensure_builtin()
    key = name.lower()
    if key not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_TASKS))} (or give a task file: "
                         f"a path to a .yaml file; `genesis tasks init` drafts one)")
    return _TASKS[key]


def task_source(name: str) -> str:
    """Where a registered task came from: `builtin`, a task file's path, or what registered it."""
    _ensure_builtin()
    return _SOURCES.get(name.lower(), "registered")


def resolve_task(ref: str) -> TaskSpec:
    """A built-in (or registered) task by name, case-insensitive, or a task file by path (.yaml/.yml).

    A task file's task is registered for this process, so later look-ups by its name find it (the transfer grid
    and its table); a file may not reuse a built-in task's name (its models and stores would mix with the built-in
    task's)."""
    text = str(ref)
    if not is_task_file(text):
        return get_task(text)
    spec = load_task_file(text)
    if spec.name in builtin_names():
        raise TaskFileError(f"{text}: name {spec.name!r} is a built-in task's; give the task file's task its own "
                            f"name (models are registered as genesis-<name>)")
    return register(spec, replace=True, source=str(Path(text).resolve()))


def task_names() -> list[str]:
    _ensure_builtin()
    return list(_TASKS)


def all_tasks(*, builtin_only: bool = False) -> list[TaskSpec]:
    """Every task this process knows: the built-in ones, then task files resolved here (`builtin_only`: only the
    five, which is what `genesis reproduce` and the README's table mean by "every task", whatever files an earlier
    command in the same process resolved)."""
    _ensure_builtin()
    names = builtin_names()
    return [t for t in _TASKS.values() if not builtin_only or t.name in names]


def tasks_table(markdown: bool = False, *, builtin_only: bool = False) -> str:
    """The registry as a table (plain text for the terminal, Markdown for docs); `builtin_only`: the five built-in
    tasks alone (the README's table), whatever task files this process resolved."""
    df = pd.DataFrame([t.row() for t in all_tasks(builtin_only=builtin_only)])
    if markdown:
        head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
        return head + "\n".join("| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(index=False))
    with pd.option_context("display.width", 250, "display.max_colwidth", 60):
        return df.to_string(index=False)
