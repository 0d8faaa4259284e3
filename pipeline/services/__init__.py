"""The services a cluster runs beside Ray, and a local multi-node cluster to try them on one machine.

- `mlflow_server`: MLflow's basic-auth tracking server with a generated admin password, detached, stopped by pid.
- `ray_token`: the Ray token file (0600) that nodes and clients read.
- `local_cluster`: `make cluster-up` / `make cluster-down` (a Ray head and a second node with token auth, and
  the MLflow server, all on 127.0.0.1).
- `processes`, `private_files`: start detached and stop exactly what was started; files only the owner reads.

Command line: `python -m pipeline.services --help` (ray_cluster.yaml's head commands call it). Nothing here
is imported by the pipeline's stages.
"""
