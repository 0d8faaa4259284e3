"""The authenticated MLflow launcher with its artifacts in a bucket (the moto S3 server of tests/s3_server.py):
the server alone holds the bucket's credentials; a client with no AWS variable at all logs and reads artifacts
through it (proxied artifacts), and they land as objects in the bucket. A destination that cannot be used is one
line, exit 2, before a server starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from s3_server import KEYS

from pipeline.services.__main__ import main as services_main
from pipeline.services.mlflow_server import MlflowServerConfig, start_mlflow, stop_mlflow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLIENT = textwrap.dedent("""
    import json, os, sys, tempfile
    import mlflow
    assert not [k for k in os.environ if k.startswith("AWS_")]
    mlflow.set_tracking_uri(sys.argv[1])
    mlflow.set_experiment("bucketed")
    with mlflow.start_run() as run:
        mlflow.log_text("the table of a run\\n", "tables/results.md")
        mlflow.log_dict({"dice": 0.5}, "metrics.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="tables/results.md",
                                                   dst_path=tmp)
        text = open(path).read()
    print(json.dumps({"run_id": run.info.run_id, "artifact_uri": run.info.artifact_uri, "text": text}))
""")


@pytest.mark.timeout(300)
def test_artifacts_land_in_the_bucket_and_clients_need_no_bucket_credentials(s3_server, bucket, tmp_path):
    root = tmp_path / "mlflow"
    code = services_main(["start-mlflow", "--root", str(root), "--host", "127.0.0.1", "--port", str(_free_port()),
                          "--workers", "1", "--artifacts-destination", f"s3://{bucket}/mlflow"])
    assert code == 0
    try:
        info = json.loads((root / "mlflow.json").read_text())
        assert info["artifacts_destination"] == f"s3://{bucket}/mlflow"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(MLFLOW_TRACKING_USERNAME=info["user"],
                   MLFLOW_TRACKING_PASSWORD=(root / "mlflow-admin-password").read_text().strip())
        done = subprocess.run([sys.executable, "-c", CLIENT, info["url"]], env=env, capture_output=True,
                              timeout=240, encoding="utf-8", errors="replace")
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout.strip().splitlines()[-1])
        assert out["text"] == "the table of a run\n"  # read back through the server
        assert out["artifact_uri"].startswith("mlflow-artifacts:")  # proxied: the client never sees the bucket

        s3 = s3_server.client()
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="mlflow/").get("Contents", [])]
        mine = [k for k in keys if out["run_id"] in k]
        assert any(k.endswith("/artifacts/tables/results.md") for k in mine), keys
        assert any(k.endswith("/artifacts/metrics.json") for k in mine), keys
        body = s3.get_object(Bucket=bucket, Key=next(k for k in mine if k.endswith("results.md")))["Body"].read()
        assert body == b"the table of a run\n"
        # the bucket's keys stay in the server's environment: not in its folder, its log or its records
        for p in root.rglob("*"):
            if p.is_file():
                assert KEYS["AWS_SECRET_ACCESS_KEY"].encode() not in p.read_bytes(), p
    finally:
        stop_mlflow(root)


@pytest.mark.parametrize("dest, needle", [("s3://genesis-no-such-bucket-zz/mlflow", "does not exist"),
                                          ("s3:///mlflow", "no bucket")])
def test_an_unusable_artifact_bucket_is_one_line_before_a_server_starts(s3_server, tmp_path, dest, needle, capsys):
    root = tmp_path / "mlflow"
    code = services_main(["start-mlflow", "--root", str(root), "--host", "127.0.0.1", "--port", str(_free_port()),
                          "--workers", "1", "--artifacts-destination", dest])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "--artifacts-destination" in lines[0], err
    assert not (root / "mlflow.pid").exists()
