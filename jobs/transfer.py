"""`ray job submit -- python jobs/transfer.py --patches ROOT --inits scratch,models:/genesis-pretrained/N ...`: the
transfer grid.

The same job as `genesis transfer`: inside a Ray job the driver connects to the job's cluster (Ray sets
RAY_ADDRESS), so the Tune trials, their Ray Train workers and the MLflow logging run on that cluster. Declare the
`genesis_trial` resource on the head node (ray_cluster.yaml) so trial drivers take no CPU.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["transfer", *sys.argv[1:]]))
