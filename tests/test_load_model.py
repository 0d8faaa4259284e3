"""`from pipeline import load_model`: a tiny U-Net logged and registered through the Tracker in a real
MLflow SQLite store, loaded back by version, alias, run and folder, and from state files; outputs must equal the
original model's on the same cubes, each predicted on its own (a batch-statistics model is loaded to predict cube
by cube). No Ray."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest
import torch

from pipeline import load_model
from pipeline.model_io.official import save_official_layout
from pipeline.models.classifier import UNet3DClassifier
from pipeline.models.unet3d import UNet3D
from pipeline.runtime.tracking import Tracker
from pipeline.model_io.model_format import log_model

NAME = "genesis-load-test"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """(tracking URI, run id, the logged model): one registered version of a width-4 U-Net, alias `champion`."""
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp}/mlflow.db"
    # the experiment's artifacts under tmp: nothing may land in ./mlruns
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("load-test", artifact_location=str(tmp / "artifacts"))
    torch.manual_seed(3)
    model = UNet3D(base_channels=4).eval()
    tracker = Tracker(uri)
    run_id = tracker.create_run("load-test", "tiny-unet")
    logger = tracker.logger(run_id, system_metrics=False)
    try:
        info = log_model(model)
        tracker.register_model(info.model_uri, NAME, aliases=("champion",), tags={"run_id": run_id})
    finally:
        logger.end()
    return uri, run_id, model


def _cube(channels: int = 1) -> torch.Tensor:
    return torch.rand(2, channels, 16, 32, 32, generator=torch.Generator().manual_seed(11))


def _same_outputs(loaded: torch.nn.Module, original: torch.nn.Module, channels: int = 1) -> None:
    """The loaded model's output for a batch equals the original's for each cube alone."""
    assert not loaded.training
    x = _cube(channels)
    with torch.no_grad():
        one_at_a_time = torch.cat([original.eval()(x[i:i + 1]) for i in range(len(x))])
        torch.testing.assert_close(loaded(x), one_at_a_time, rtol=0, atol=1e-6)


@pytest.mark.parametrize("which", ["version", "alias", "run"])
def test_registered_model_loads_by_uri(registry, which):
    uri, run_id, model = registry
    model_uri = {"version": f"models:/{NAME}/1", "alias": f"models:/{NAME}@champion", "run": f"runs:/{run_id}/model"}
    loaded = load_model(model_uri[which], tracking_uri=uri)
    assert isinstance(loaded, UNet3D) and loaded.base_channels == 4
    assert next(loaded.parameters()).device.type == "cpu"
    _same_outputs(loaded, model)


def test_local_mlflow_model_folder(registry, tmp_path):
    uri, _, model = registry
    mlflow.set_tracking_uri(uri)
    folder = mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path / "m"))
    _same_outputs(load_model(folder), model)


def test_missing_model_is_a_value_error_naming_it(registry):
    uri, _, _ = registry
    for missing in (f"models:/{NAME}/7", f"models:/{NAME}@nope", "models:/no-such-model/1"):
        with pytest.raises(ValueError, match=missing.replace("/", ".")):
            load_model(missing, tracking_uri=uri)
    with pytest.raises(ValueError, match="nothing-here.pt"):
        load_model("nothing-here.pt")
    with pytest.raises(ValueError, match=r"official:nothing-here\.pt"):
        load_model("official:nothing-here.pt")


def test_state_dict_files(tmp_path):
    torch.manual_seed(5)
    unet = UNet3D(base_channels=4)
    torch.save({f"module.{k}": v for k, v in unet.state_dict().items()}, tmp_path / "unet.pt")
    loaded = load_model(str(tmp_path / "unet.pt"))
    assert isinstance(loaded, UNet3D) and loaded.base_channels == 4
    _same_outputs(loaded, unet)

    classifier = UNet3DClassifier(base_channels=4, in_channels=2, hidden=16, norm="instance")
    torch.save(classifier.state_dict(), tmp_path / "classifier.pt")
    loaded = load_model(str(tmp_path / "classifier.pt"))
    assert isinstance(loaded, UNet3DClassifier) and loaded.in_channels == 2 and loaded.norm == "instance"
    _same_outputs(loaded, classifier, channels=2)

    save_official_layout(unet, tmp_path / "official.pt")  # kernels written (x, y, z), read back (z, y, x)
    _same_outputs(load_model(f"official:{tmp_path / 'official.pt'}"), unet)

    torch.save({"weights": [1, 2]}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="junk.pt"):
        load_model(str(tmp_path / "junk.pt"))


def test_import_pipeline_stays_cheap():
    code = "import sys, pipeline; print(any(m in sys.modules for m in ('torch', 'mlflow', 'ray')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", errors="replace", check=True).stdout
    assert out.strip() == "False"
