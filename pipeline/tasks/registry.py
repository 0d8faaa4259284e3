"""The task registry: name -> `TaskSpec`. The five built-in tasks are registered on first use."""

from __future__ import annotations

import pandas as pd

from pipeline.tasks.spec import TaskSpec

__all__ = ["register", "get_task", "task_names", "all_tasks", "tasks_table", "builtin_names"]

_TASKS: dict[str, TaskSpec] = {}


def _ensure_builtin() -> None:
    if not _TASKS:
        from pipeline.tasks.builtin import BUILTIN_TASKS

        for spec in BUILTIN_TASKS:
            _TASKS[spec.name] = spec


def builtin_names() -> tuple[str, ...]:
    """The names of the built-in tasks (a task file may not reuse one)."""
    from pipeline.tasks.builtin import BUILTIN_TASKS

    return tuple(spec.name for spec in BUILTIN_TASKS)


def register(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Add a task (a sixth one, or a variant); refuses to shadow an existing name unless asked."""
    _ensure_builtin()
    if spec.name in _TASKS and not replace:
        raise ValueError(f"task {spec.name!r} is already registered; pass replace=True to redefine it")
    _TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    _ensure_builtin()
    key = name.lower()
    if key not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_TASKS))}")
    return _TASKS[key]


def task_names() -> list[str]:
    _ensure_builtin()
    return list(_TASKS)


def all_tasks() -> list[TaskSpec]:
    _ensure_builtin()
    return list(_TASKS.values())


def tasks_table(markdown: bool = False) -> str:
    """The registry as a table (plain text for the terminal, Markdown for docs)."""
    df = pd.DataFrame([t.row() for t in all_tasks()])
    if markdown:
        head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
        return head + "\n".join("| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(index=False))
    with pd.option_context("display.width", 250, "display.max_colwidth", 60):
        return df.to_string(index=False)
