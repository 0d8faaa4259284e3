"""The five Models Genesis target tasks, as task files: `pipeline/tasks/builtin_tasks/<name>.yaml`.

A built-in task is defined the way a user's task is, by a YAML task file (`pipeline.tasks.task_file`), so there is
one way to define a task. Each file's header explains where the reference's values come from, and its `notes`
give every value's origin (file and line of MrGiovanni/ModelsGenesis, keras/downstream_tasks).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from pipeline.tasks.spec import TaskSpec
from pipeline.tasks.task_file import load_task_file

__all__ = ["BUILTIN_NAMES", "BUILTIN_DIR", "builtin_task_path", "load_builtin_tasks", "BUILTIN_TASKS"]

BUILTIN_NAMES = ("ncc", "ncs", "ecc", "lcs", "bms")
"""In the paper's order (the task table's rows)."""
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin_tasks"


def builtin_task_path(name: str) -> Path:
    return BUILTIN_DIR / f"{name}.yaml"


@cache
def load_builtin_tasks() -> tuple[TaskSpec, ...]:
    """The built-in tasks read from their files (once per process); a file whose task is not named as the file
    is refused (the registry finds a task by its file's name)."""
    specs = []
    for name in BUILTIN_NAMES:
        spec = load_task_file(builtin_task_path(name))
        if spec.name != name:
            raise ValueError(f"{builtin_task_path(name)}: name {spec.name!r}, expected {name!r} (the file's name)")
        specs.append(spec)
    return tuple(specs)


def __getattr__(name: str):
    if name == "BUILTIN_TASKS":  # read when asked for, not when the module is imported
        return load_builtin_tasks()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
