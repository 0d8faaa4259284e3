#!/usr/bin/env bash
# Builds the project's environment on one node, the same on every node: a venv at $GENESIS_VENV with
# exactly deploy/requirements.lock, the shipped code installed on top (editable, no dependency
# resolution), and the line in ~/.bashrc that sources deploy/ray/genesis-env.sh (so that `ray down`
# stops the services, see there). Idempotent: the lock's hash is stamped into the venv, a rerun with
# the same lock only checks. Run by ray_cluster.yaml's setup_commands; by hand: bash deploy/ray/setup-node.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deploy/ray/genesis-env.sh
. "$here/genesis-env.sh"
code="$(cd "$here/../.." && pwd)"
lock="$code/deploy/requirements.lock"

if ! command -v "$GENESIS_PYTHON" >/dev/null 2>&1; then
    echo "setup-node.sh: $GENESIS_PYTHON not found on $(hostname): install Python 3.11 or set GENESIS_PYTHON in deploy/ray/genesis-env.sh" >&2
    exit 2
fi
test -x "$GENESIS_VENV/bin/python" || "$GENESIS_PYTHON" -m venv "$GENESIS_VENV"

stamp="$GENESIS_VENV/.genesis-lock-$(sha256sum "$lock" | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    "$GENESIS_VENV/bin/python" -m pip install -q --upgrade pip
    "$GENESIS_VENV/bin/python" -m pip install -q -r "$lock"
    rm -f "$GENESIS_VENV"/.genesis-lock-*
    touch "$stamp"
fi
"$GENESIS_VENV/bin/python" -m pip install -q --no-deps -e "$code"
# runtime_env.yaml runs jobs with $GENESIS_HOME/.venv (as in a plain checkout): point it at the node's venv,
# which lives outside the synced code (file_mounts sync subfolders of $GENESIS_HOME, never this link).
if [ "$(readlink -f "$GENESIS_HOME/.venv" 2>/dev/null)" != "$(readlink -f "$GENESIS_VENV")" ]; then
    rm -rf "$GENESIS_HOME/.venv"
    ln -s "$GENESIS_VENV" "$GENESIS_HOME/.venv"
fi

mkdir -p "$GENESIS_STATE"
chmod 700 "$GENESIS_STATE"
# The Dask TLS key the head synced here (cluster_synced_files): owner-only whatever the copy did to its mode.
if [ -e "$GENESIS_DASK_TLS_DIR/dask-key.pem" ]; then
    chmod 600 "$GENESIS_DASK_TLS_DIR/dask-key.pem"
fi

genesis_install_bashrc_hook
