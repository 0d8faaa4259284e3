"""`ray job submit -- python jobs/convert.py SOURCE... --store STORE [--dask-scheduler ADDR]`.

The same job as `genesis convert`, as an entry point for a cluster job; arguments are those of
`genesis convert`. With --dask-scheduler the scans are converted by that Dask cluster;
without it, by a local Dask cluster on the node the job runs on.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
