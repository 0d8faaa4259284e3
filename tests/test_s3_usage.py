"""Bad store locations are one line and exit 2, before anything is written, for every command that takes a store:
an s3:// URL without a bucket, an unknown scheme, a bucket that does not exist, missing credentials, an endpoint
that does not answer (found in seconds). Run as `genesis` runs, in a subprocess, against the test S3 server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import one_line_error

REPO = Path(__file__).resolve().parents[1]

COMMANDS = [
    ["convert", "SRC", "--store", "{url}"],
    ["stores", "show", "{url}"],
    ["stores", "verify", "{url}"],
    ["stores", "list", "{url}"],
    ["patches", "pretrain", "--store", "{url}", "--workers", "1"],
    ["pretrain", "--patches", "{url}", "--preset", "tiny"],
]


def _genesis(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True,
                          encoding="utf-8", errors="replace", env=env, timeout=120)


def _args(command: list[str], url: str, src: Path) -> list[str]:
    return [a.replace("{url}", url).replace("SRC", str(src)) for a in command]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_bad_bucket_urls_are_one_line_exit_2(command, bucket, s3_server, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    cases = [("s3:///vol", "no bucket name"), ("gs://b/vol", "unknown scheme 'gs://'"),
             (f"s3://missing-{bucket}/vol", "does not exist")]
    for url, needle in cases:
        done = _genesis(_args(command, url, src))
        assert done.returncode == 2, (url, done.stderr)
        one_line_error(done.stderr, needle)
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_credentials_and_endpoint_problems_are_said_in_seconds(bucket, s3_server, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    url = f"s3://{bucket}/vol"
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    bare.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
                AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"])
    done = _genesis(["convert", str(src), "--store", url], env=bare)
    assert done.returncode == 2
    one_line_error(done.stderr, "no S3 credentials", "AWS_ACCESS_KEY_ID")
    dead = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    t0 = time.monotonic()
    done = _genesis(["convert", str(src), "--store", url], env=dead)
    assert done.returncode == 2
    one_line_error(done.stderr, "http://127.0.0.1:9 does not answer")
    assert time.monotonic() - t0 < 30
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in done.stderr + done.stdout
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
