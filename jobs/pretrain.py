"""`ray job submit -- python jobs/pretrain.py --patches PATCHSTORE --preset tiny|stable|paper ...`.

The same job as `genesis pretrain`: inside a Ray job the driver connects to the job's cluster
(Ray sets RAY_ADDRESS), so the workers, checkpoints and MLflow logging run on that cluster.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
