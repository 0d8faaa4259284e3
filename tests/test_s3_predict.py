"""`genesis predict` on the scans of a volume store in a bucket (issue 20): the same as on a local store.

One source (a bright ball on an oblique grid, `test_predict._oblique`) is converted twice: into a folder and into
`s3://BUCKET/vs` on the session's moto server (a real S3 API on 127.0.0.1; nothing of S3, Zarr or MLflow is
mocked). The tiny sphere U-Net of tests/test_predict.py, logged into a SQLite MLflow store, predicts one scan of
each store (`STORE::SCAN_ID`) and the whole bucket store (`STORE`): the label maps, probabilities and the
content digests recorded in predictions.json are the same. The outputs stay local files; a bad bucket URL is
one line, exit 2, before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_mhd
from test_predict import _dice, _log, _oblique, _predict, _same_geometry, _spec, _train

from pipeline.runtime.errors import UsageError
from pipeline.runtime.tracking import Tracker
from pipeline.volume_store.convert import convert
from pipeline.volume_store.store import VolumeStore


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, model URI) of the sphere segmenter, trained for a few dozen steps."""
    tmp = tmp_path_factory.mktemp("s3-predict-registry")
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("predict-test", artifact_location=str(tmp / "artifacts"))
    return uri, _log(Tracker(uri), _train(), _spec(), "genesis-spheres")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A LUNA-style source folder of one scan with a ball in it, and the ball's (z, y, x) mask."""
    image, mask = _oblique(shape_xyz=(40, 36, 20), centre_xyz=(20, 18, 10), radius=6.0, seed=3)
    src = tmp_path_factory.mktemp("s3-predict-src") / "luna"
    arr = sitk.GetArrayFromImage(image)
    write_mhd(src / "subset0" / "1.3.6.7.mhd", arr, spacing=image.GetSpacing(), origin=image.GetOrigin(),
              direction=image.GetDirection())
    return src, mask


def _predict_cpu(uri: str, model_uri: str, inputs: list[str], out: "Path | str", *more: str) -> int:
    return _predict("--model", model_uri, "--input", *inputs, "--out", str(out), "--tracking-uri", uri,
                    "--device", "cpu", *more)


def _summary(out: Path) -> dict:
    return json.loads((out / "predictions.json").read_text(encoding="utf-8"))


def test_a_scan_of_a_bucket_store_is_predicted_as_the_same_scan_of_a_local_store(model, source, bucket, tmp_path):
    uri, model_uri = model
    src, mask = source
    local = tmp_path / "vs"
    url = f"s3://{bucket}/stores/vs"
    for where in (str(local), url):
        done = convert([str(src)], where, workers=1, progress=False)
        assert done.ok and len(done.converted) == 1, done.report()
    (scan_id,) = VolumeStore(url).scan_ids()
    assert VolumeStore(local).scan_ids() == [scan_id]

    assert _predict_cpu(uri, model_uri, [f"{local}::{scan_id}"], tmp_path / "out-local", "--probabilities") == 0
    assert _predict_cpu(uri, model_uri, [f"{url}::{scan_id}"], tmp_path / "out-s3", "--probabilities") == 0
    assert not (Path.cwd() / "s3:").exists()  # the URL was never taken for a local path

    names = [f"{scan_id}.nii.gz", f"{scan_id}_probabilities.nii.gz"]
    for name in names:
        a = sitk.ReadImage(str(tmp_path / "out-local" / name))
        b = sitk.ReadImage(str(tmp_path / "out-s3" / name))
        _same_geometry(b, a)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(b), sitk.GetArrayFromImage(a))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out-s3" / names[0])))
    assert set(np.unique(label)) <= {0, 2} and np.count_nonzero(label) > 0
    # the store holds the scan in LPS (z, y, x): the ball is found there too
    store_mask = VolumeStore(url).read_scan(scan_id) > 500
    assert _dice(label == 2, store_mask) > 0.8 and np.count_nonzero(store_mask) == np.count_nonzero(mask)

    here, there = _summary(tmp_path / "out-local"), _summary(tmp_path / "out-s3")
    (case_here,), (case_there,) = here["cases"], there["cases"]
    assert case_there["status"] == "ok" and case_there["case_id"] == case_here["case_id"] == scan_id
    assert case_there["inputs"] == [{"path": f"{url}::{scan_id}", "kind": "store",
                                     "content_digest": case_here["inputs"][0]["content_digest"]}]
    assert case_there["inputs"][0]["content_digest"].startswith("xxh3-128:")
    assert case_there["outputs"] == case_here["outputs"] == names
    assert case_there["foreground_voxels"] == case_here["foreground_voxels"]

    # the whole store named by its URL (a trailing slash too): its one scan, the same label map
    assert _predict_cpu(uri, model_uri, [url + "/"], tmp_path / "out-all") == 0
    (case_all,) = _summary(tmp_path / "out-all")["cases"]
    assert case_all["inputs"][0]["path"] == f"{url}::{scan_id}"
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out-all" / names[0]))), label)


def test_bucket_inputs_that_are_not_stores_or_cannot_be_reached(model, bucket, s3_server, tmp_path, capsys):
    uri, model_uri = model
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="notes/readme.txt", Body=b"not a store")
    # a prefix that is no volume store: that input is reported (one line) and the run exits 1
    assert _predict_cpu(uri, model_uri, [f"s3://{bucket}/notes::x"], tmp_path / "o1") == 1
    err = capsys.readouterr().err
    assert f"s3://{bucket}/notes is not a volume store" in err
    assert _predict_cpu(uri, model_uri, [f"s3://{bucket}/notes"], tmp_path / "o2") == 1
    assert "not a volume store" in capsys.readouterr().err
    # a bucket that does not exist, or no bucket at all: exit 2 before anything is written
    with pytest.raises(UsageError, match=r"bucket 'no-such-bucket-here' does not exist"):
        _predict_cpu(uri, model_uri, ["s3://no-such-bucket-here/vs::x"], tmp_path / "o3")
    with pytest.raises(UsageError, match=r"no bucket name"):
        _predict_cpu(uri, model_uri, ["s3:///vs"], tmp_path / "o4")
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o4").exists()
    # outputs are local files
    with pytest.raises(UsageError, match=r"--out s3://.*local files"):
        _predict_cpu(uri, model_uri, [f"s3://{bucket}/notes"], f"s3://{bucket}/preds")
