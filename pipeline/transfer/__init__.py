"""The transfer grid (`genesis transfer`): many fine-tunings in parallel on Ray Tune, one MLflow parent run
with a child run per fine-tuning, and the paper's table (mean ± sd over folds x seeds, t-test against scratch,
the published numbers beside ours where they are computed the same way).

grid.py (which fine-tunings, their test folds, keys, trial groups), trial.py (one Tune trial = one TorchTrainer
running a group, fitted through `pipeline.runtime.driver`; the child runs and their tags), run.py (the driver:
checks, reuse of finished fine-tunings, Tune, champions), table.py (the table and figures from MLflow alone),
protocol.py (whether a row is computed as the published value: metric, unit, protocol).

Nothing is imported here: import from the submodule that defines a name (`pipeline.transfer.run.transfer`,
`pipeline.transfer.grid.GridConfig`).
"""
