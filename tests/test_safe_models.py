"""Models that are safe to load (issue 9, section 7) and runs that say where they came from (issue 11).

Real MLflow (SQLite in tmp_path), real files, no Ray. A logged model is architecture JSON + safetensors; a
weights file replaced by a pickle whose `__reduce__` creates a marker file is refused by `pipeline.load_model`
and by `mlflow.pyfunc.load_model`, and the marker never appears. The same payload in a model of the old
format (MLflow's pytorch flavor, pickle) does create the marker through `mlflow.pytorch.load_model`, which
shows the payload is live, and `pipeline.load_model` refuses that model without unpickling it.
"""

from __future__ import annotations

import getpass
import importlib.metadata as md
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from pipeline import load_model
from pipeline.models import UNet3D, UNet3DClassifier
from pipeline.runtime.tracking import Tracker, artifact_location, entry_point, git_state
from pipeline.model_io.model_format import log_finetuned_model, log_model

NAME = "genesis-safe-test"
REPO = Path(__file__).resolve().parent.parent


class Payload:
    """Unpickling this creates `path`: the stand-in for arbitrary code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _log(uri: str, model: torch.nn.Module, experiment: str = "safe", kind: str | None = None) -> tuple[str, str]:
    """(run id, model URI) of `model` logged through RunLogger."""
    tracker = Tracker(uri)
    run_id = tracker.create_run(experiment, "tiny")
    logger = tracker.logger(run_id, system_metrics=False)
    try:
        info = log_model(model) if kind is None else log_finetuned_model(model, kind=kind)
    finally:
        logger.end()
    return run_id, info.model_uri


def _model_dir(uri: str, model_uri: str) -> Path:
    """The logged model's folder in the artifact store (a local folder beside the SQLite database)."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    location = client.get_logged_model(model_uri.rsplit("/", 1)[-1]).artifact_location
    return Path(location.removeprefix("file://"))


def _cube(channels: int = 1) -> torch.Tensor:
    return torch.rand(2, channels, 16, 16, 16, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """(tracking URI, run id, model, model URI): a width-4 U-Net logged and registered as NAME/1 @champion."""
    tmp = tmp_path_factory.mktemp("safe")
    uri = f"sqlite:///{tmp}/mlflow.db"
    torch.manual_seed(1)
    model = UNet3D(base_channels=4, norm="instance").eval()
    run_id, model_uri = _log(uri, model)
    Tracker(uri).register_model(model_uri, NAME, aliases=("champion",))
    return uri, run_id, model, model_uri


def test_loads_by_version_alias_and_run_with_identical_outputs(registry, tmp_path):
    uri, run_id, model, _ = registry
    expected = model(_cube())
    for model_uri in (f"models:/{NAME}/1", f"models:/{NAME}@champion", f"runs:/{run_id}/model"):
        loaded = load_model(model_uri, tracking_uri=uri)
        assert isinstance(loaded, UNet3D) and loaded.norm == "instance" and not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(_cube()), expected, rtol=0, atol=0)
    # a fine-tuned classifier (logits head, 2 input channels) goes through the same format
    classifier = UNet3DClassifier(base_channels=4, in_channels=2, hidden=8, norm="instance").eval()
    _, clf_uri = _log(uri, classifier, experiment="finetune", kind="classification")
    Tracker(uri).register_finetuned(clf_uri, "genesis-safe-clf")
    loaded = load_model("models:/genesis-safe-clf/1", tracking_uri=uri)
    assert isinstance(loaded, UNet3DClassifier) and loaded.fc1.out_features == 8
    torch.testing.assert_close(loaded(_cube(2)), classifier(_cube(2)), rtol=0, atol=0)


def test_logged_model_holds_no_pickle_and_pins_its_environment(registry):
    uri, _, _, model_uri = registry
    folder = _model_dir(uri, model_uri)
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"MLmodel", "data/genesis/architecture.json", "data/genesis/weights.safetensors",
            "code/pipeline/model_format.py", "code/pipeline/models/unet3d.py"} <= names
    assert not [n for n in names if n.endswith((".pth", ".pkl", ".pt", ".pyc"))], names
    meta = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8"))
    assert set(meta["flavors"]) == {"python_function"}
    assert meta["flavors"]["python_function"]["loader_module"] == "pipeline.model_format"
    assert meta["metadata"]["genesis_pipeline_version"] == md.version("genesis-pipeline")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, encoding="utf-8")
    assert meta["metadata"]["genesis_git_commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    config = json.loads((folder / "data/genesis/architecture.json").read_text(encoding="utf-8"))
    assert config["architecture"] == "UNet3D" and config["kwargs"]["base_channels"] == 4
    # the code is bundled as it was when logged; every requirement is pinned, none is this project
    assert (folder / "code/pipeline/model_format.py").read_bytes() == (REPO / "pipeline/model_format.py").read_bytes()
    reqs = (folder / "requirements.txt").read_text(encoding="utf-8").split()
    assert reqs and all("==" in r for r in reqs), reqs
    assert f"torch=={torch.__version__.split('+')[0]}" in reqs and any(r.startswith("safetensors==") for r in reqs)
    conda = yaml.safe_load((folder / "conda.yaml").read_text(encoding="utf-8"))
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip_deps) == sorted(reqs)
    assert not any("genesis" in r for r in reqs + pip_deps)


def test_pyfunc_loads_from_the_bundled_code_without_the_project_installed(registry, tmp_path):
    """A fresh interpreter whose import system cannot see the installed project: MLflow's generic loader
    imports the bundled `pipeline.model_format` and gives the model's output."""
    uri, _, model, model_uri = registry
    folder = _model_dir(uri, model_uri)
    x = _cube().numpy()
    torch.save({"x": torch.from_numpy(x), "y": model(_cube()).detach()}, tmp_path / "xy.pt")
    code = f"""
import sys, torch
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "") + repr(f)]
try:
    import pipeline
    sys.exit("the installed project is still importable: " + pipeline.__file__)
except ImportError:
    pass
import mlflow.pyfunc
xy = torch.load({str(tmp_path / 'xy.pt')!r}, weights_only=True)
out = mlflow.pyfunc.load_model({str(folder)!r}).predict(xy["x"].numpy())
# another process may sum convolutions in another thread order: equal to float32 rounding, not bit for bit
assert torch.allclose(torch.from_numpy(out), xy["y"], rtol=1e-5, atol=1e-6), "outputs differ"
print(sys.modules["pipeline"].__file__)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, encoding="utf-8",
                          errors="replace", env={**os.environ, "PYTHONPATH": ""}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout
    assert Path(proc.stdout.strip().splitlines()[-1]).is_relative_to(folder / "code"), proc.stdout


def test_tampered_weights_raise_and_run_no_code(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _, model_uri = _log(uri, UNet3D(base_channels=4))
    Tracker(uri).register_model(model_uri, "tampered")
    weights = _model_dir(uri, model_uri) / "data/genesis/weights.safetensors"
    marker = tmp_path / "PAYLOAD_RAN"
    weights.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match=r"models:/tampered/1.*weights\.safetensors is not a valid safetensors"):
        load_model("models:/tampered/1", tracking_uri=uri)
    assert not marker.exists()
    torch.save(Payload(marker), weights)  # the torch zip container around the same pickle
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_model("models:/tampered/1", tracking_uri=uri)
    with pytest.raises(Exception, match="not a valid safetensors"):  # MLflow's own loader reads it the same way
        mlflow.pyfunc.load_model("models:/tampered/1")
    assert not marker.exists()
    # the architecture JSON names a class from a fixed list of two; anything else is refused
    config = weights.parent / "architecture.json"
    config.write_text(json.dumps({"format": "genesis-safetensors", "format_version": 1, "architecture": "os.system",
                                  "kwargs": {"command": f"touch {marker}"}}), encoding="utf-8")
    with pytest.raises(ValueError, match="architecture 'os.system' is not one of"):
        load_model("models:/tampered/1", tracking_uri=uri)
    assert not marker.exists()


# --- issue 9, section 7 (hostile finding): a tampered artifact is one ModelFormatError, and costs no memory ---

#: What the child below runs: under a 3 GiB address-space limit (so the old behaviour, which allocated the
#: model a tampered config describes before checking it, fails fast instead of swapping the machine), every
#: case through `pipeline.load_model` or MLflow's own loader, printing the error and how much the peak
#: resident memory grew. A warm-up load of the untampered model first does every import a load needs.
_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
import mlflow.pyfunc
from pipeline import load_model
cases = json.loads(sys.argv[1])
mlflow.pyfunc.load_model(cases.pop("clean")[1]).predict(__import__("numpy").zeros((1, 1, 16, 16, 16), "float32"))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name, (how, target) in cases.items():
    try:
        (mlflow.pyfunc.load_model if how == "pyfunc" else load_model)(target)
        out = {"type": "loaded", "msg": ""}
    except BaseException as err:  # RuntimeError, MemoryError, RecursionError: what the old code raised
        out = {"type": type(err).__name__, "msg": (str(err).splitlines() or [""])[0]}
    out["grew_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(json.dumps({name: out}), flush=True)
"""


def _tampered(src: Path, dest: Path, config: dict | None = None, text: str | None = None) -> str:
    """A copy of the logged model folder `src` at `dest` with its architecture.json replaced."""
    shutil.copytree(src, dest)
    path = dest / "data/genesis/architecture.json"
    path.write_text(text if text is not None else json.dumps(config), encoding="utf-8")
    return str(dest)


def test_tampered_architecture_is_refused_before_anything_is_allocated(registry, tmp_path):
    """The hostile finding: base_channels 4 -> 256 (in range) used to build a 1.2 G-parameter model before
    the weights were compared, 3000 died in torch's allocator, a deeply nested JSON raised RecursionError.
    Now each is one error naming the field or key, through both loaders, with no memory growth to speak of;
    a state file whose first conv claims width 256 likewise."""
    uri, _, _, model_uri = registry
    folder = _model_dir(uri, model_uri)
    config = json.loads((folder / "data/genesis/architecture.json").read_text(encoding="utf-8"))

    def kwargs(**changes) -> dict:
        return {**config, "kwargs": {**config["kwargs"], **changes}}

    wide = _tampered(folder, tmp_path / "wide", kwargs(base_channels=256))
    huge = _tampered(folder, tmp_path / "huge", kwargs(base_channels=3000))
    deep = _tampered(folder, tmp_path / "deep", text="[" * 30_000 + "]" * 30_000)  # under the size limit
    state = tmp_path / "wide_state.pt"
    torch.save({"down_tr64.ops.0.conv1.weight": torch.zeros(256, 1, 3, 3, 3),
                "out_tr.final_conv.weight": torch.zeros(1, 512, 1, 1, 1)}, state)
    cases = {"clean": ("pyfunc", str(folder)), "wide": ("load", wide), "wide_pyfunc": ("pyfunc", wide),
             "huge": ("load", huge), "huge_pyfunc": ("pyfunc", huge), "deep": ("load", deep),
             "deep_pyfunc": ("pyfunc", deep), "state": ("load", str(state))}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases)], cwd=tmp_path, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {k: v for line in proc.stdout.splitlines() if line.startswith("{") for k, v in json.loads(line).items()}
    mismatch = (r"weights\.safetensors does not match architecture\.json \(UNet3D\(base_channels=256, .*\)\): "
                r"dtype/shape mismatches \(\d+\): down_tr64\.ops\.0\.conv1\.weight: expected F32 \[256, 1, 3, 3, 3\], "
                r"got F32 \[4, 1, 3, 3, 3\]")
    expected = {"wide": ("ValueError", mismatch), "wide_pyfunc": ("ModelFormatError", mismatch),
                "huge": ("ValueError", r"architecture\.json: UNet3D argument base_channels=3000 is outside the "
                                       r"allowed range 1\.\.256"),
                "huge_pyfunc": ("ModelFormatError", r"base_channels=3000 is outside the allowed range"),
                "deep": ("ValueError", r"architecture\.json is not valid JSON \(nested deeper than 8 levels\)"),
                "deep_pyfunc": ("ModelFormatError", r"architecture\.json is not valid JSON \(nested deeper"),
                "state": ("ValueError", r"wide_state\.pt.* does not match the model: missing keys")}
    assert set(got) == set(expected), (got, proc.stderr[-2000:])
    for name, (kind, pattern) in expected.items():
        assert got[name]["type"] == kind and re.search(pattern, got[name]["msg"]), (name, got[name])
        # the old code's peak for "wide" was the 4.9 GB model (here: the 3 GiB limit); a refusal costs ~nothing
        assert got[name]["grew_mb"] < 64, (name, got[name])


def test_weights_must_match_the_architecture_key_by_key_in_dtype_and_shape(registry, tmp_path):
    """The safetensors header is compared with the model (built on the meta device) before its data is read:
    a tensor of another dtype (which the old code silently cast), an extra tensor, a header whose length lies,
    data offsets that overlap; and the config is strict JSON (a repeated key, which two readers could read
    differently, and NaN). Each is one ValueError naming the key or field."""
    from safetensors.torch import load_file, save_file

    uri, _, model, model_uri = registry
    folder = _model_dir(uri, model_uri)
    state = load_file(str(folder / "data/genesis/weights.safetensors"))
    first = "down_tr64.ops.0.conv1.weight"

    def with_weights(name: str, tensors: dict) -> str:
        dest = tmp_path / name
        shutil.copytree(folder, dest)
        save_file(tensors, str(dest / "data/genesis/weights.safetensors"))
        return str(dest)

    def with_bytes(name: str, edit) -> str:
        dest = tmp_path / name
        shutil.copytree(folder, dest)
        path = dest / "data/genesis/weights.safetensors"
        path.write_bytes(edit(path.read_bytes()))
        return str(dest)

    def overlap(data: bytes) -> bytes:  # the second tensor's range moved back over the first's, same sizes
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        key = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[1]
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [begin - 4, end - 4]
        text = json.dumps(header, separators=(",", ":")).encode("utf-8").ljust(n)
        return data[:8] + text + data[8 + n:] if len(text) == n else pytest.fail("header grew")

    config_text = (folder / "data/genesis/architecture.json").read_text(encoding="utf-8")
    cases = {
        with_weights("f64", {**state, first: state[first].double()}):
            rf"does not match architecture\.json .*dtype/shape mismatches \(1\): {first}: expected F32 "
            rf"\[4, 1, 3, 3, 3\], got F64 \[4, 1, 3, 3, 3\]",
        with_weights("extra", {**state, "extra.weight": torch.zeros(3)}): r"unexpected keys \(1\): extra\.weight",
        with_bytes("lie", lambda d: (2 ** 62).to_bytes(8, "little") + d[8:]):
            r"weights\.safetensors is not a valid safetensors file.*header length 4611686018427387904 exceeds",
        with_bytes("overlap", overlap): r"not a valid safetensors file.*overlapping or a gap",
        _tampered(folder, tmp_path / "repeat",
                  text=config_text.replace('"base_channels": 4,', '"base_channels": 4, "base_channels": 8,')):
            r"architecture\.json is not valid JSON \(ValueError: repeated key 'base_channels'",
        _tampered(folder, tmp_path / "nan", text=config_text.replace('"base_channels": 4', '"base_channels": NaN')):
            r"architecture\.json is not valid JSON \(ValueError: NaN is not a JSON number",
    }
    for target, pattern in cases.items():
        with pytest.raises(ValueError, match=pattern):
            load_model(target)
    # the untampered copy still loads, bit for bit
    shutil.copytree(folder, tmp_path / "clean")
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path / "clean"))(_cube()), model(_cube()), rtol=0, atol=0)


def test_old_pickle_format_is_refused_and_its_payload_is_live(tmp_path):
    """The payload runs through the old format's loader (so the tests above would catch a pickle), and
    `pipeline.load_model` refuses such a model without unpickling it."""
    import mlflow.pytorch

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("old", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pytorch.log_model(UNet3D(base_channels=4), name="model", serialization_format="pickle",
                                        pip_requirements=["torch"])
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save(Payload(marker), _model_dir(uri, info.model_uri) / "data/model.pth")
    with pytest.raises(ValueError, match=r"pytorch flavor \(pickle serialization.*refused.*genesis weights import"):
        load_model(info.model_uri, tracking_uri=uri)
    assert not marker.exists()
    with pytest.raises(AttributeError):  # the unpickled "model" is the file object the payload opened
        mlflow.pytorch.load_model(info.model_uri)
    assert marker.exists()


def test_runs_carry_commit_user_entry_point_and_an_explicit_artifact_location(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/sub/mlflow.db"
    (tmp_path / "sub").mkdir()
    monkeypatch.setenv("GENESIS_ENTRY_POINT", "genesis pretrain")
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(Tracker(uri).create_run("prov", "r", tags={"preset": "tiny"}))
    tags = run.data.tags
    commit, dirty = git_state(REPO)
    assert tags["genesis.git_commit"] == commit and len(commit) == 40
    assert tags["mlflow.source.git.commit"] == commit and tags["genesis.git_dirty"] == str(dirty).lower()
    assert tags["genesis.user"] == tags["mlflow.user"] == getpass.getuser()
    assert tags["genesis.entry_point"] == tags["mlflow.source.name"] == "genesis pretrain"
    assert tags["preset"] == "tiny"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.artifact_location == (tmp_path / "sub" / "mlartifacts").as_uri()
    # an MLflow server keeps artifacts in its own (proxied) store: the client names no path
    assert artifact_location("http://127.0.0.1:5000") is None and artifact_location("https://mlflow.example") is None


def test_entry_point_and_git_state_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("GENESIS_ENTRY_POINT", raising=False)
    assert entry_point(["/x/.venv/bin/genesis", "weights", "import", "w.pt", "--name", "n"]) == "genesis weights import"
    assert entry_point(["/x/.venv/bin/genesis", "transfer", "--patches", "p"]) == "genesis transfer"
    assert entry_point(["/x/pipeline/cli.py", "patches", "task", "ncc", "--store", "s"]) == "genesis patches task"
    assert entry_point(["/usr/bin/script.py", "a"]) == "script.py"
    assert entry_point(["/v/lib/python3.11/site-packages/pytest/__main__.py", "-q"]) == "pytest"  # python -m pytest
    assert entry_point() == entry_point(sys.argv)
    monkeypatch.setenv("GENESIS_ENTRY_POINT", "genesis transfer")  # set by the CLI, inherited by Ray workers
    assert entry_point() == "genesis transfer"
    assert git_state(tmp_path) == ("unknown", None)  # not a checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("1", encoding="utf-8")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, encoding="utf-8").stdout.strip()
    assert git_state(tmp_path) == (head, False)
    (tmp_path / "a.txt").write_text("2", encoding="utf-8")
    assert git_state(tmp_path) == (head, True)
    (tmp_path / "sub").mkdir()  # a folder inside a checkout is not that checkout's code (an installed copy)
    assert git_state(tmp_path / "sub") == ("unknown", None)


def test_task_file_and_preprocessing_travel_as_plain_data_and_tampered_ones_are_refused(tmp_path):
    """A model's card (task.yaml, preprocessing.json beside the weights) is read with bounded reads,
    `yaml.safe_load` and strict JSON: a YAML tag that would build a Python object, a preprocessing that is not a
    JSON object, and an oversized file are each one error naming the file; nothing is constructed or run."""
    from pipeline.model_io.model_format import ModelFormatError, read_model_card

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)
    run_id = tracker.create_run("safe", "card")
    logger = tracker.logger(run_id, system_metrics=False)
    try:
        info = log_finetuned_model(UNet3D(base_channels=4, norm="instance").eval(), kind="segmentation",
                                   task_file="name: spheres\nkind: segmentation\n",
                                   preprocessing={"orientation": "LPS", "threshold": 0.5, "roi": [16, 16, 16]})
    finally:
        logger.end()
    folder = _model_dir(uri, info.model_uri)
    data = folder / "data/genesis"
    assert (data / "task.yaml").read_text(encoding="utf-8") == "name: spheres\nkind: segmentation\n"
    assert yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8"))["metadata"]["genesis_task"] == "spheres"
    model = load_model(str(folder))
    assert model.genesis_task_file.startswith("name: spheres")
    assert model.genesis_preprocessing == {"orientation": "LPS", "threshold": 0.5, "roi": [16, 16, 16]}

    marker = tmp_path / "ran"
    cases = {"task.yaml": f"!!python/object/apply:os.system ['touch {marker}']\n",
             "preprocessing.json": "[1, 2, 3]"}
    for name, text in cases.items():
        bad = Path(shutil.copytree(folder, tmp_path / f"bad_{name}"))
        (bad / "data/genesis" / name).write_text(text, encoding="utf-8")
        with pytest.raises(ModelFormatError, match=re.escape(name)):
            read_model_card(bad / "data/genesis")
        with pytest.raises(ValueError, match=re.escape(name)):
            load_model(str(bad))
    big = Path(shutil.copytree(folder, tmp_path / "big"))
    (big / "data/genesis/preprocessing.json").write_text('{"a": "' + "x" * 300_000 + '"}', encoding="utf-8")
    with pytest.raises(ModelFormatError, match=r"preprocessing\.json.*over the \d+-byte limit"):
        read_model_card(big / "data/genesis")
    assert not marker.exists()
    with pytest.raises(ModelFormatError, match="task_file must be the task file's text"):
        log_finetuned_model(UNet3D(base_channels=4).eval(), task_file={"name": "x"})


def test_a_task_file_with_yaml_aliases_is_refused_in_the_card(tmp_path):
    """A few hundred bytes of aliases stand for 10**7 strings: refused on read and on write, before anything
    could expand them."""
    from pipeline.model_io.model_format import ModelFormatError, read_model_card, write_model_card

    laughs = "name: spheres\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 7))
    (tmp_path / "task.yaml").write_text(laughs, encoding="utf-8")
    with pytest.raises(ModelFormatError, match=r"task\.yaml: not valid YAML \(ComposerError: anchor &a0 is not "
                                               r"allowed in a task file\)"):
        read_model_card(tmp_path, "m")
    with pytest.raises(ModelFormatError, match=r"anchor &a0 is not allowed"):
        write_model_card(tmp_path / "w", task_file=laughs)
    (tmp_path / "task.yaml").write_text("name: spheres\ntitle: plain\n", encoding="utf-8")
    assert read_model_card(tmp_path, "m") == ("name: spheres\ntitle: plain\n", None)
