"""`ray job submit -- python jobs/finetune.py --task T --patches TASKSTORE --init INIT ...`: one fine-tuning run.

The same job as `genesis finetune`: inside a Ray job the driver connects to the job's cluster (Ray sets
RAY_ADDRESS), so the workers, checkpoints and MLflow logging run on that cluster.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
