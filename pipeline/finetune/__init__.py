"""Fine-tuning on the five target tasks (`genesis finetune`): one run = one task, one init, one seed.

config.py (typed presets from the TaskSpec), init.py (scratch / MLflow / official / state file),
data.py (seeded batches from a task patch store), steps.py (plain train/eval functions),
worker.py (the Ray Train loop), evaluate.py (test split), run.py (the driver: `pipeline.finetune.run.finetune`).

Nothing is imported here: import from the submodule that defines a name.
"""
