"""`genesis weights import`: official-layout checkpoints into a real MLflow registry (SQLite)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch

from pipeline import load_model
from pipeline.cli import main
from pipeline.model_io.official import load_official_genesis, save_official_layout
from pipeline.models.unet3d import UNet3D


def test_official_layout_is_registered_and_loads_back_identically(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    path = tmp_path / "Genesis_Chest_CT.pt"
    save_official_layout(UNet3D(base_channels=4), str(path), epoch=7)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["weights", "import", str(path), "--name", "genesis-official", "--alias", "official",
                 "--tracking-uri", uri]) == 0
    assert "models:/genesis-official@official" in capsys.readouterr().out
    loaded = load_model("models:/genesis-official@official", tracking_uri=uri)
    expected = load_official_genesis(str(path)).eval()
    x = torch.rand(2, 1, 16, 24, 32)
    # the reference's norm uses each batch's statistics: load_model predicts cube by cube (batch-independent)
    torch.testing.assert_close(loaded(x), torch.cat([expected(x[i:i + 1]) for i in range(len(x))]), rtol=0, atol=1e-6)
    # The file is in the official (x, y, z) kernel order; the registered model in ours (z, y, x).
    stored = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    for key in ("down_tr64.ops.0.conv1.weight", "up_tr128.up_conv.weight"):
        assert torch.equal(loaded.state_dict()[key], stored[f"module.{key}"].permute(0, 1, 4, 3, 2)), key
    assert torch.equal(loaded.state_dict()["down_tr64.ops.0.bn1.weight"], stored["module.down_tr64.ops.0.bn1.weight"])
    run = mlflow.search_runs(experiment_names=["genesis-weights"], output_format="list")[0]
    assert run.data.params["kernel_axes_in_file"] == "xyz"
    # re-published safely: architecture JSON + safetensors, no pickle anywhere in the registered model
    folder = Path(mlflow.artifacts.download_artifacts("models:/genesis-official@official",
                                                      dst_path=str(tmp_path / "m")))
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"data/genesis/weights.safetensors", "data/genesis/architecture.json"} <= files
    assert not [f for f in files if f.endswith((".pth", ".pkl", ".pt"))], files
    assert "pytorch" not in (folder / "MLmodel").read_text(encoding="utf-8")
    assert run.data.tags["genesis.entry_point"] and run.data.tags["genesis.user"]


def test_mismatched_or_unsafe_files_are_refused_with_the_reason(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    bad = tmp_path / "bad.pt"
    sd = {f"module.{k}": v for k, v in UNet3D(base_channels=4).state_dict().items() if not k.startswith("out_tr")}
    torch.save({"state_dict": sd}, bad)
    assert main(["weights", "import", str(bad), "--name", "x", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "out_tr.final_conv.weight" in err and "bad.pt" in err
    assert main(["weights", "import", str(tmp_path / "missing.pt"), "--name", "x", "--tracking-uri", uri]) == 2
    assert main(["weights", "import", str(bad), "--name", "x", "--alias", "latest", "--tracking-uri", uri]) == 2
    assert "reserved" in capsys.readouterr().err


def test_state_dict_in_our_order_imports_any_architecture(tmp_path, capsys):
    """`--axes zyx`: the architecture is read from the weights (here an instance-norm classifier, which the
    official-layout reader cannot build), the remedy the loader names for models of the old pickle format."""
    from pipeline.models.classifier import UNet3DClassifier

    torch.manual_seed(2)
    classifier = UNet3DClassifier(base_channels=4, in_channels=2, hidden=8, norm="instance").eval()
    torch.save(classifier.state_dict(), tmp_path / "clf.pt")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["weights", "import", str(tmp_path / "clf.pt"), "--axes", "zyx", "--name", "clf",
                 "--tracking-uri", uri]) == 0
    assert "models:/clf@imported" in capsys.readouterr().out
    loaded = load_model("models:/clf@imported", tracking_uri=uri)
    assert isinstance(loaded, UNet3DClassifier) and loaded.in_channels == 2 and loaded.norm == "instance"
    x = torch.rand(2, 2, 16, 16, 16)
    assert torch.equal(loaded(x), classifier(x))
