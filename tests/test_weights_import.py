"""`genesis weights import`: official-layout checkpoints into a real MLflow registry (SQLite)."""

from __future__ import annotations

import mlflow
import torch

from pipeline.cli import main
from pipeline.models import UNet3D, load_official_genesis, save_official_layout


def test_official_layout_is_registered_and_loads_back_identically(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    path = tmp_path / "Genesis_Chest_CT.pt"
    save_official_layout(UNet3D(base_channels=4), str(path), epoch=7)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["weights", "import", str(path), "--name", "genesis-official", "--alias", "official",
                 "--tracking-uri", uri]) == 0
    assert "models:/genesis-official@official" in capsys.readouterr().out
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    loaded = mlflow.pytorch.load_model("models:/genesis-official@official").eval()
    expected = load_official_genesis(str(path)).eval()
    x = torch.rand(2, 1, 16, 24, 32)
    assert torch.equal(loaded(x), expected(x))
    # The file is in the official (x, y, z) kernel order; the registered model in ours (z, y, x).
    stored = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    for key in ("down_tr64.ops.0.conv1.weight", "up_tr128.up_conv.weight"):
        assert torch.equal(loaded.state_dict()[key], stored[f"module.{key}"].permute(0, 1, 4, 3, 2)), key
    assert torch.equal(loaded.state_dict()["down_tr64.ops.0.bn1.weight"], stored["module.down_tr64.ops.0.bn1.weight"])
    run = mlflow.search_runs(experiment_names=["genesis-weights"], output_format="list")[0]
    assert run.data.params["kernel_axes_in_file"] == "xyz"


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
