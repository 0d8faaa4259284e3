"""The Ray cluster's authentication token (Ray 2.60 token auth).

`RAY_AUTH_MODE=token ray start` refuses to start without a token (the error "no authentication token was
found"); Ray reads it from RAY_AUTH_TOKEN, else from the file RAY_AUTH_TOKEN_PATH names, else from
~/.ray/auth_token. We keep it in one 0600 file under the cluster folder, so the nodes (started with
RAY_AUTH_TOKEN_PATH pointing at it) and the people allowed to submit jobs read the same file, and nothing
is written into a home folder Ray would pick up for every other cluster on the machine.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.services.private_files import ensure_secret

__all__ = ["TOKEN_FILE", "ensure_ray_token", "ray_auth_env"]

TOKEN_FILE = "ray-token"


def ensure_ray_token(root: Path) -> Path:
    """ROOT/ray-token: 256 random bits as hex (what `ray get-auth-token --generate` makes), created with mode
    0600 when absent; returns its path."""
    path = Path(root).resolve() / TOKEN_FILE
    ensure_secret(path, nbytes=32)
    return path


def ray_auth_env(token_file: Path) -> dict[str, str]:
    """What a Ray process (node, `ray job submit`, a driver) needs in its environment to use the token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
