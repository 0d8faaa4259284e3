"""`ray job submit -- python jobs/reproduce.py --preset paper --data /shared/datasets --out /shared/reproduce ...`:
data -> stores -> pretraining -> transfer grid -> the table, in one job.

The same job as `genesis reproduce`: inside a Ray job the driver connects to the job's cluster (Ray sets
RAY_ADDRESS), so pretraining and the fine-tunings run on that cluster; --out must be on a filesystem every node
shares (stores, checkpoints), and --tracking-uri should name the MLflow server.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", *sys.argv[1:]]))
