"""Shared fixtures: small volumes written in the field's real formats with known geometry."""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

# the test-only hooks (pipeline.runtime.hooks: kill points, fault injection) act only with this set; the Ray
# workers and the processes the tests start inherit it
os.environ["GENESIS_TEST_HOOKS"] = "1"

sys.path.insert(0, str(Path(__file__).parent))


def make_image(arr: np.ndarray, spacing=(0.7, 0.8, 2.5), origin=(-120.0, -110.0, -300.0),
               direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    """`arr` in (z, y, x); spacing/origin in ITK (x, y, z) order."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def ct_array(rng: np.random.Generator, shape=(24, 32, 40)) -> np.ndarray:
    return rng.integers(-1024, 1500, size=shape, dtype=np.int16)


def one_line_error(err: str, *needles: str) -> str:
    """The one line a failing command printed on stderr (no traceback), which must contain every needle."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_mhd(path: Path, arr: np.ndarray, **geom) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(make_image(arr, **geom), str(path), useCompression=False)
    return path


def write_dicom_series(folder: Path, arr: np.ndarray, spacing=(0.75, 0.75), positions=None,
                       series_uid="1.2.826.0.1.3680043.2.1125.1", origin=(-100.0, -90.0),
                       shuffle_names: bool = True, modality: str = "CT") -> list[Path]:
    """One file per slice with the tags a scanner writes; file names do not follow slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    if positions is None:
        positions = [-200.0 + 2.5 * k for k in range(arr.shape[0])]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    order = list(range(arr.shape[0]))
    if shuffle_names:
        order = list(np.random.default_rng(1).permutation(order))
    paths = []
    for name_idx, k in enumerate(order):
        sl = sitk.GetImageFromArray(arr[k:k + 1].astype(np.int16))
        sl.SetSpacing((spacing[0], spacing[1], 1.0))
        tags = {
            "0008|0060": modality, "0020|000d": "1.2.826.0.1.3680043.2.1125.9", "0020|000e": series_uid,
            "0010|0020": "PATIENT1", "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0032": f"{origin[0]}\\{origin[1]}\\{positions[k]}",
            "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(k + 1),
            "0028|1052": "0", "0028|1053": "1", "0028|1054": "HU",
            "0028|0030": f"{spacing[1]}\\{spacing[0]}",
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        p = folder / f"IM{name_idx:04d}.dcm"
        writer.SetFileName(str(p))
        writer.Execute(sl)
        paths.append(p)
    return paths


def zip_folder(folder: Path, out: Path, arc_prefix: str = "") -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, arc_prefix + str(p.relative_to(folder)))
    return out


def pytest_configure(config):
    """The test S3 server's endpoint and dummy keys go into the environment before anything starts (Ray, Dask),
    so every process the tests start inherits them (tests/s3_server.py)."""
    from s3_server import configure_environment

    configure_environment()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the session (a real S3 API over HTTP; stopped at the end)."""
    from s3_server import S3Server

    server = S3Server(os.environ["GENESIS_TEST_S3_ENDPOINT"])
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh empty bucket on the test S3 server: its name."""
    from s3_server import new_bucket

    return new_bucket(s3_server)


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray for the whole test session (a Ray start costs seconds; Ray Train fits share it)."""
    import ray

    from pipeline.transfer.run import TRIAL_RESOURCE

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             resources={TRIAL_RESOURCE: 100})
    yield ray
    ray.shutdown()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    yield


TASK_CUBE = (16, 32, 32)


@pytest.fixture(scope="session")
def task_stores(tmp_path_factory):
    """ECC (PE sample, classification), LCS (LiTS sample, whole-volume segmentation) and NCS (LIDC sample,
    segmentation on cubes) task stores with 16x32x32 cubes, shared by the fine-tuning and transfer tests."""
    from pipeline.patches.task_extract import extract_task
    from pipeline.sample_data.datasets import write_sample
    from pipeline.tasks import get_task
    from pipeline.volume_store.convert import convert

    root = tmp_path_factory.mktemp("task_data")
    out = {}
    for dataset, task, scans in (("pe", "ecc", 6), ("lits", "lcs", 6), ("lidc", "ncs", 4)):
        write_sample(dataset, root / dataset, n_scans=scans, small=True, seed=0)
        assert convert([str(root / dataset)], str(root / f"{dataset}_vs"), workers=1, progress=False).ok
        spec = get_task(task).with_overrides(cube_size=TASK_CUBE)
        out[task] = str(extract_task(str(root / f"{dataset}_vs"), spec, out_root=str(root / "ps"), workers=1,
                                     progress=False).path)
    return out


def assert_no_test_patient_in_training(store_path, rows: dict) -> None:
    """`rows`: a fine-tuning run's data/training_rows.json; none of its rows or patients is a test patient."""
    from pipeline.patches.store import PatchStore

    store = PatchStore(store_path)
    idx = store.index.set_index("row")
    test_patients = set(store.scans.loc[store.scans["split"] == "test", "patient_id"])
    assert test_patients and rows["train_rows"]
    assert not test_patients & set(idx.loc[rows["train_rows"], "patient_id"])
    assert not test_patients & set(rows["train_patient_ids"])
