# Genesis Pipeline on a `ray up` cluster: the one place for the cluster's paths, ports and settings.
# Sourced (never executed) by every command of ray_cluster.yaml and, through the line that
# deploy/ray/setup-node.sh adds to ~/.bashrc, by the shells `ray down`, `ray exec` and `ray attach` open.
# Edit the values below (or export them before `ray up`); the head's address is read from the YAML.
# Written for bash and kept free of `set -e`/`exit`: sourcing it must never end the calling shell.

# Shared storage: a filesystem every node mounts at the same path (NFS, Lustre, CephFS...).
export GENESIS_SHARED="${GENESIS_SHARED:-/shared}"
export GENESIS_STORES="${GENESIS_STORES:-$GENESIS_SHARED/stores}"              # volume stores
export GENESIS_PATCHES="${GENESIS_PATCHES:-$GENESIS_SHARED/patch_stores}"      # patch stores
export GENESIS_RAY_RESULTS="${GENESIS_RAY_RESULTS:-$GENESIS_SHARED/ray_results}"  # checkpoints (--storage-path)
export GENESIS_MLFLOW_ARTIFACTS="${GENESIS_MLFLOW_ARTIFACTS:-$GENESIS_SHARED/mlflow/artifacts}"

# Per node, on local disk: the code shipped by file_mounts, its virtual environment, and a 0700 state
# folder holding the secrets (ray-token, mlflow-admin-password, the Dask TLS key) and the services' pids and logs.
export GENESIS_HOME="$HOME/genesis-pipeline"
export GENESIS_VENV="${GENESIS_VENV:-$HOME/genesis-venv}"
export GENESIS_STATE="${GENESIS_STATE:-$HOME/genesis-state}"
export GENESIS_PYTHON="${GENESIS_PYTHON:-python3.11}"   # builds the venv (setup-node.sh)

# MLflow tracking server on the head. SQLite on the head's local disk by default (SQLite must not live on
# NFS); for PostgreSQL set e.g. postgresql://genesis@db.lab:5432/mlflow (password in the head's ~/.pgpass).
export GENESIS_MLFLOW_PORT="${GENESIS_MLFLOW_PORT:-5000}"
export GENESIS_MLFLOW_BACKEND="${GENESIS_MLFLOW_BACKEND:-sqlite:///$GENESIS_STATE/mlflow.db}"
export GENESIS_MLFLOW_USER="${GENESIS_MLFLOW_USER:-admin}"

# Dask for `genesis convert` / `genesis patches` (--dask-scheduler tls://HEAD:8786): a scheduler on the head's
# private address and GENESIS_DASK_WORKERS single-threaded worker processes on each worker node, all with mutual
# TLS (python -m pipeline.services.dask_tls). The head generates ca.pem, dask.pem and dask-key.pem (0600) at
# `ray up` into GENESIS_DASK_TLS_DIR, next to the Ray token; cluster_synced_files copies them to the workers. Only
# processes holding dask-key.pem can connect; our clients find it through GENESIS_DASK_TLS_DIR.
export GENESIS_DASK_PORT="${GENESIS_DASK_PORT:-8786}"
export GENESIS_DASK_WORKERS="${GENESIS_DASK_WORKERS:-4}"
export GENESIS_DASK_TLS_DIR="$GENESIS_STATE"   # the paths ray_cluster.yaml's cluster_synced_files names

# The head's private address: RAY_HEAD_IP on workers (set by the autoscaler), else provider.head_ip of
# the YAML as `ray up` copied it to the head (~/ray_bootstrap_config.yaml), so it is written only once.
if [ -n "${RAY_HEAD_IP:-}" ]; then
    GENESIS_HEAD_IP="$RAY_HEAD_IP"
elif [ -r "$HOME/ray_bootstrap_config.yaml" ]; then
    GENESIS_HEAD_IP="$(python3 -c 'import json, os; print(json.load(open(os.path.expanduser("~/ray_bootstrap_config.yaml")))["provider"]["head_ip"])' 2>/dev/null)"
fi
export GENESIS_HEAD_IP="${GENESIS_HEAD_IP:-}"

# The project's interpreter first on PATH: `ray`, `python` (also in `ray job submit -- python ...`, whose
# drivers inherit the environment Ray was started with) and `genesis` are the venv's.
case ":$PATH:" in
    *":$GENESIS_VENV/bin:"*) ;;
    *) export PATH="$GENESIS_VENV/bin:$PATH" ;;
esac

# Ray token authentication: every Ray process and CLI on a node reads the token file the head generated
# (copied to the workers by cluster_synced_files in ray_cluster.yaml).
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$GENESIS_STATE/ray-token"

if [ -n "$GENESIS_HEAD_IP" ]; then
    export MLFLOW_TRACKING_URI="http://$GENESIS_HEAD_IP:$GENESIS_MLFLOW_PORT"
    export GENESIS_DASK_SCHEDULER="tls://$GENESIS_HEAD_IP:$GENESIS_DASK_PORT"
fi

genesis_require_head_ip() {
    # Why: without the head's private address the services would have nothing safe to bind to.
    if [ -z "$GENESIS_HEAD_IP" ]; then
        echo "genesis-env.sh: the head's address is unknown (no RAY_HEAD_IP, no ~/ray_bootstrap_config.yaml): run this through 'ray up ray_cluster.yaml'" >&2
        return 2
    fi
}

genesis_gpu_count() {
    # GPUs this node declares to Ray: all that nvidia-smi lists, 0 without a driver.
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

genesis_start_services() {
    # Head only: the authenticated MLflow server on the private address, then the client credentials the
    # jobs read (~/.mlflow/credentials, 0600; cluster_synced_files copies it to the workers).
    genesis_require_head_ip || return
    case "$GENESIS_MLFLOW_ARTIFACTS" in *://*) ;; *) mkdir -p "$GENESIS_MLFLOW_ARTIFACTS" || return ;; esac
    python -m pipeline.services start-mlflow --root "$GENESIS_STATE" \
        --host "$GENESIS_HEAD_IP" --port "$GENESIS_MLFLOW_PORT" \
        --backend-store-uri "$GENESIS_MLFLOW_BACKEND" --artifacts-destination "$GENESIS_MLFLOW_ARTIFACTS" \
        --allowed-hosts "$GENESIS_HEAD_IP:$GENESIS_MLFLOW_PORT,localhost:$GENESIS_MLFLOW_PORT,127.0.0.1:$GENESIS_MLFLOW_PORT" \
        || return
    (
        umask 077
        mkdir -p "$HOME/.mlflow"
        printf '[mlflow]\nmlflow_tracking_username = %s\nmlflow_tracking_password = %s\n' \
            "$GENESIS_MLFLOW_USER" "$(cat "$GENESIS_STATE/mlflow-admin-password")" > "$HOME/.mlflow/credentials"
    )
}

genesis_make_dask_certs() {
    # Head only, at `ray up` (head_setup_commands): the cluster's CA and the one certificate it signs, kept
    # when present so the workers' copies stay valid.
    genesis_require_head_ip || return
    python -m pipeline.services.dask_tls certs --root "$GENESIS_DASK_TLS_DIR" --hosts "$GENESIS_HEAD_IP"
}

genesis_start_dask_scheduler() {
    # Head only: the TLS scheduler on the private address (its HTTP server on 127.0.0.1), detached, pid in
    # $GENESIS_DASK_TLS_DIR/dask-scheduler.pid.
    genesis_require_head_ip || return
    python -m pipeline.services.dask_tls start-scheduler --root "$GENESIS_DASK_TLS_DIR" \
        --host "$GENESIS_HEAD_IP" --port "$GENESIS_DASK_PORT"
}

genesis_start_dask_worker() {
    # Worker nodes: GENESIS_DASK_WORKERS single-threaded processes under one nanny, TLS, on this node's address
    # toward the head; they exit by themselves when the scheduler stops (`ray down`), at most a minute after
    # losing it.
    genesis_require_head_ip || return
    python -m pipeline.services.dask_tls start-worker --root "$GENESIS_DASK_TLS_DIR" \
        --scheduler "tls://$GENESIS_HEAD_IP:$GENESIS_DASK_PORT" --nworkers "$GENESIS_DASK_WORKERS"
}

genesis_stop_services() {
    # Stops what genesis_start_services and genesis_start_dask_* started on this node (exactly the pids they
    # recorded); a no-op where nothing was started.
    if [ -e "$GENESIS_STATE/mlflow.pid" ]; then
        python -m pipeline.services stop-mlflow --root "$GENESIS_STATE"
    fi
    if [ -e "$GENESIS_DASK_TLS_DIR/dask-scheduler.pid" ] || [ -e "$GENESIS_DASK_TLS_DIR/dask-worker.pid" ]; then
        python -m pipeline.services.dask_tls stop --root "$GENESIS_DASK_TLS_DIR"
    fi
}

genesis_install_bashrc_hook() {
    # One line at the end of ~/.bashrc (added once) that sources this file: Ray's launcher runs every
    # remote command, `ray down`'s `ray stop` included, in a login shell that sources ~/.bashrc.
    local hook='[ -r "$HOME/genesis-pipeline/deploy/ray/genesis-env.sh" ] && . "$HOME/genesis-pipeline/deploy/ray/genesis-env.sh"  # genesis-pipeline'
    touch "$HOME/.bashrc"
    grep -qxF "$hook" "$HOME/.bashrc" || printf '%s\n' "$hook" >> "$HOME/.bashrc"
}

# `ray stop` on a node also stops the Genesis services there (MLflow, the Dask scheduler or workers). This is
# the hook that makes `ray down` leave nothing running: `ray down` runs `ray stop` on the head in a login shell
# that sources ~/.bashrc; the worker nodes' Dask workers then exit on their own (--death-timeout).
ray() {
    if [ "${1:-}" = stop ]; then
        genesis_stop_services
    fi
    command ray "$@"
}
