"""`python -m pipeline.services COMMAND`: the cluster's services, started detached and stopped by pid.

    start-mlflow --root DIR --host HOST --port PORT [--backend-store-uri URI] [--artifacts-destination PATH_OR_URI]
                 [--allowed-hosts H1,H2] [--public] [--workers N]
    stop-mlflow  --root DIR
    ray-token    --root DIR                      creates DIR/ray-token (0600) if absent, prints its path
    cluster-up   [--dir cluster] [--head-cpus N] [--node-cpus N] [--object-store-mb M]   (make cluster-up)
                 [--artifacts-destination s3://BUCKET/PREFIX]
    cluster-down [--dir cluster]                                                          (make cluster-down)
    add-node     [--dir cluster] [--cpus N]      one more worker node (e.g. replacing one that died)
    env          [--dir cluster]                 shell exports for `ray job submit` and MLflow: eval "$(...)"

--dir defaults to $GENESIS_CLUSTER, else ./cluster.
Exit status: 0 done; 1 a service failed to start or stop; 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.runtime.help_format import Parser, examples
from pipeline.runtime.net import port, positive_int

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


PROG = "python -m pipeline.services"


def build_parser() -> argparse.ArgumentParser:
    """The launchers' command line; every option's help shows its default (`pipeline.runtime.help_format`)."""
    p = Parser(prog=PROG, description=__doc__.split("\n")[0],
               epilog=__doc__.split("\n", 1)[1].strip("\n") + "\n\n"
               + examples(f"{PROG} cluster-up --dir cluster", f"{PROG} cluster-down --dir cluster"))
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start-mlflow", help="the authenticated MLflow server, detached",
                       description="the authenticated MLflow server, detached",
                       epilog=examples(f"{PROG} start-mlflow --root /shared/mlflow --host 10.0.0.5 --port 5000",
                                       f"{PROG} start-mlflow --root mlflow_server --host 127.0.0.1 --port 5000 "
                                       "--workers 1"))
    s.add_argument("--root", required=True, type=Path, metavar="DIR",
                   help="folder of its database, auth files, artifacts, pid, log")
    s.add_argument("--host", required=True, metavar="HOST",
                   help="interface to listen on (a private address; one that binds every interface, 0.0.0.0 in any "
                        "spelling such as 0 or ::, needs --public)")
    s.add_argument("--port", required=True, type=port, metavar="PORT", help="port to listen on")
    s.add_argument("--backend-store-uri", metavar="URI", help="runs and models (default: sqlite:///ROOT/mlflow.db)")
    s.add_argument("--artifacts-destination", metavar="PATH_OR_URI",
                   help="artifact store, a path or s3://BUCKET/PREFIX (proxied: only the server needs the AWS_* "
                        "variables; AWS_ENDPOINT_URL for MinIO/Ceph) (default: ROOT/artifacts)")
    s.add_argument("--allowed-hosts", default="", metavar="H1,H2",
                   help="Host headers accepted besides HOST:PORT and localhost:PORT (default: none)")
    s.add_argument("--public", action="store_true", help="allow a --host that binds every interface")
    s.add_argument("--workers", type=positive_int, default=2, metavar="N", help="server worker processes")
    s.add_argument("--timeout", type=float, default=180.0, metavar="SECONDS", help="seconds to wait for it to answer")
    t = sub.add_parser("stop-mlflow", help="stop the server ROOT/mlflow.pid names",
                       description="stop the server ROOT/mlflow.pid names",
                       epilog=examples(f"{PROG} stop-mlflow --root /shared/mlflow"))
    t.add_argument("--root", required=True, type=Path, metavar="DIR", help="the folder start-mlflow was given")
    r = sub.add_parser("ray-token", help="create ROOT/ray-token (0600) if absent; print its path",
                       description="create ROOT/ray-token (0600) if absent; print its path",
                       epilog=examples(f"{PROG} ray-token --root /shared/secrets"))
    r.add_argument("--root", required=True, type=Path, metavar="DIR", help="the folder that holds the token")
    for name, text, example in (
            ("cluster-up", "Ray head + a second node + MLflow, all on 127.0.0.1",
             f"{PROG} cluster-up --dir cluster --head-cpus 2 --node-cpus 2"),
            ("cluster-down", "stop the local cluster's processes", f"{PROG} cluster-down --dir cluster"),
            ("add-node", "one more Ray worker node for the local cluster", f"{PROG} add-node --dir cluster --cpus 2"),
            ("env", "shell exports that point ray job submit and MLflow at the local cluster",
             f"{PROG} env --dir cluster     # in a shell: eval \"$({PROG} env)\"")):
        c = sub.add_parser(name, help=text, description=text, epilog=examples(example))
        c.add_argument("--dir", type=Path, default=Path(os.environ.get("GENESIS_CLUSTER") or "cluster"),
                       metavar="DIR", help="the cluster folder (default: $GENESIS_CLUSTER, else ./cluster)")
        if name == "cluster-up":
            c.add_argument("--head-cpus", type=positive_int, default=1, metavar="N", help="CPUs the head node declares")
            c.add_argument("--node-cpus", type=positive_int, default=1, metavar="N",
                           help="CPUs the second node declares")
            c.add_argument("--object-store-mb", type=positive_int, default=256, metavar="MB",
                           help="object store of each node, in MB (Ray needs at least 80)")
            c.add_argument("--mlflow-port", type=port, metavar="PORT",
                           help="the MLflow server's port (default: a free one)")
            c.add_argument("--dashboard-port", type=port, metavar="PORT",
                           help="the Ray dashboard's port (default: a free one)")
            c.add_argument("--artifacts-destination", metavar="PATH_OR_URI",
                           help="the MLflow server's artifact store, e.g. s3://BUCKET/mlflow (default: "
                                "DIR/mlflow/artifacts)")
        if name == "add-node":
            c.add_argument("--cpus", type=positive_int, default=1, metavar="N", help="CPUs the new node declares")
    return p


def run(args: argparse.Namespace) -> int:
    from pipeline.services import local_cluster as lc
    from pipeline.services.mlflow_server import MlflowServerConfig, start_mlflow, stop_mlflow
    from pipeline.services.ray_token import ensure_ray_token

    if args.command == "start-mlflow":
        config = MlflowServerConfig(root=args.root, host=args.host, port=args.port,
                                    backend_store_uri=args.backend_store_uri,
                                    artifacts_destination=args.artifacts_destination,
                                    allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()),
                                    public=args.public, workers=args.workers, start_timeout_s=args.timeout)
        server = start_mlflow(config)
        print(f"MLflow server {server.url} (pid {server.pid}): user {server.user}, password in {server.password_file}; "
              f"log {server.log}")
    elif args.command == "stop-mlflow":
        stopped = stop_mlflow(args.root)
        print(f"stopped the MLflow server of {args.root.resolve()} (pids {', '.join(map(str, stopped))})" if stopped
              else f"no MLflow server of {args.root.resolve()} was running")
    elif args.command == "ray-token":
        print(ensure_ray_token(args.root))
    elif args.command == "cluster-up":
        config = lc.LocalClusterConfig(dir=args.dir, head_cpus=args.head_cpus, node_cpus=args.node_cpus,
                                       object_store_mb=args.object_store_mb, mlflow_port=args.mlflow_port,
                                       dashboard_port=args.dashboard_port,
                                       artifacts_destination=args.artifacts_destination)
        print(lc.describe(lc.cluster_up(config)))
    elif args.command == "cluster-down":
        stopped = lc.cluster_down(args.dir)
        print(f"local cluster {args.dir.resolve()} stopped ({len(stopped)} processes)" if stopped
              else f"no local cluster running in {args.dir.resolve()}")
    elif args.command == "add-node":
        node = lc.add_node(args.dir, cpus=args.cpus)
        print(f"node {node['name']} joined (pid {node['pid']})")
    elif args.command == "env":
        sys.stdout.write(lc.cluster_env(args.dir))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from pipeline.services.processes import ServiceError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ValueError as err:  # a bad option value (the config dataclasses name it)
        print(f"python -m pipeline.services {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ServiceError, OSError) as err:
        print(f"python -m pipeline.services {args.command}: failed: {err}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
