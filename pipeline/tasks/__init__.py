"""The five target tasks as data (`TaskSpec`), their splits, and their task patch stores."""

from pipeline.tasks.registry import all_tasks, get_task, register, task_names, tasks_table
from pipeline.tasks.spec import INITS, Intensity, Optimisation, Published, Sampling, SplitRule, TaskSpec
from pipeline.tasks.splits import with_splits_file

__all__ = ["INITS", "Intensity", "Optimisation", "Published", "Sampling", "SplitRule", "TaskSpec", "all_tasks",
           "get_task", "register", "task_names", "tasks_table", "with_splits_file"]
