"""A task is a file: the five built-in tasks are YAML task files equal to the values they had as Python, read
strictly (an unknown key or a bad value is exit 2 naming the file, the key and the value), described by a JSON
Schema that agrees with the dataclasses, drafted from an nnU-Net dataset by `genesis tasks init`, recorded in the
task store it builds and on every MLflow run that uses it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from conftest import one_line_error
import SimpleITK as sitk
import yaml

import storage_schemas
from pipeline.cli import main
from pipeline.patches.store import PatchStore
from pipeline.tasks import registry
from pipeline.tasks.builtin import BUILTIN_NAMES, builtin_task_path
from pipeline.tasks.registry import get_task, resolve_task
from pipeline.tasks.spec import TaskSpec
from pipeline.tasks.task_file import (TaskFileError, load_task_file, task_file_sha256, task_file_text,
                                      task_from_dict, task_from_text, task_to_dict, task_to_yaml)
from pipeline.tasks.task_init import init_task, read_dataset_json, task_name_of

FROZEN = Path(__file__).parent / "data" / "builtin_tasks_before.json"




def _forget(name: str) -> None:
    """A fresh process's registry: the task `name` (registered by a test) unknown again."""
    registry._TASKS.pop(name, None)
    registry._SOURCES.pop(name, None)


def _task_file(tmp_path: Path, name: str = "liver_own", base: str = "lcs", **changes) -> Path:
    """A user's task file: a built-in task's file under another name, with `changes` (dotted keys)."""
    data = yaml.safe_load(builtin_task_path(base).read_text())
    data["name"] = name
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            data[head][rest] = value
        else:
            data[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---- the built-in tasks are task files ---------------------------------------------------------------

def test_builtin_tasks_are_files_equal_to_the_values_they_had_as_python():
    frozen = json.loads(FROZEN.read_text())
    assert tuple(frozen) == BUILTIN_NAMES == tuple(registry.task_names()[:5])
    for name in BUILTIN_NAMES:
        spec = get_task(name)
        assert spec == task_from_dict(frozen[name], name)  # the values before the files, as the JSON of `tasks show`
        assert load_task_file(builtin_task_path(name)) == spec
        assert task_from_text(task_to_yaml(spec), name) == spec == task_from_dict(task_to_dict(spec), name)
        assert task_from_text(task_file_text(spec), name) == spec
        assert task_file_sha256(spec) == hashlib.sha256(task_file_text(spec).encode()).hexdigest()
        assert registry.task_source(name) == "builtin"
        assert spec.labels == {} and "labels" not in spec.data_dict()
    # the task table and its numbers did not change
    assert get_task("lcs").inplane_scale == 0.5 and get_task("bms").sampling.crop_size == (50, 100, 100)
    assert get_task("ncc").published.genesis == (98.07, 0.59)
    text = builtin_task_path("lcs").read_text()
    assert "config.py:318" in text and text.startswith("# Built-in task LCS")  # the origins are kept


def test_labels_read_strictly_names_to_values_or_region_tuples():
    data = task_to_dict(get_task("bms")) | {"name": "brain", "labels": {"edema": 1, "whole": [1, 2, 3]}}
    spec = task_from_dict(data)
    assert spec.labels == {"edema": 1, "whole": (1, 2, 3)}
    assert task_from_text(task_file_text(spec), "x") == spec
    with pytest.raises(TaskFileError, match=r"labels\.edema.*'one'"):
        task_from_dict(data | {"labels": {"edema": "one"}})
    with pytest.raises(TaskFileError, match=r"labels.*-1"):
        task_from_dict(data | {"labels": {"edema": -1}})
    with pytest.raises(TaskFileError, match="expected a mapping"):
        task_from_dict(data | {"labels": [1, 2]})


# ---- the schema ---------------------------------------------------------------------------------------

def _schema_keys(schema: dict, node: dict, cls) -> list[str]:
    """Every disagreement between a dataclass's fields and a schema object's properties, nested dataclasses too."""
    node = schema["$defs"][node["$ref"].split("/")[-1]] if "$ref" in node else node
    fields = {f.name for f in dataclasses.fields(cls)}
    props = set(node["properties"])
    out = [f"{cls.__name__}: {sorted(fields ^ props)}"] if fields != props else []
    assert node["additionalProperties"] is False, cls.__name__
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert set(node["required"]) == required, cls.__name__
    hints = typing.get_type_hints(cls)
    for name in fields & props:
        tps = [hints[name], *typing.get_args(hints[name])]
        for tp in tps:
            if dataclasses.is_dataclass(tp):
                sub = node["properties"][name]
                sub = next((s for s in sub.get("oneOf", [sub]) if "$ref" in s), sub)
                out += _schema_keys(schema, sub, tp)
    return out


def test_schema_agrees_with_the_dataclasses_and_validates_every_task_file(tmp_path):
    schema = storage_schemas.json_schema("task_spec")
    jsonschema.Draft202012Validator.check_schema(schema)
    assert _schema_keys(schema, schema, TaskSpec) == []
    validator = jsonschema.Draft202012Validator(schema)
    for name in BUILTIN_NAMES:
        assert not list(validator.iter_errors(yaml.safe_load(builtin_task_path(name).read_text()))), name
    for out, kwargs in _drafts(tmp_path):
        assert not list(validator.iter_errors(yaml.safe_load(out.read_text()))), out
    bad = yaml.safe_load(builtin_task_path("ncc").read_text()) | {"colour": "red"}
    assert any("colour" in e.message for e in validator.iter_errors(bad))
    bad = yaml.safe_load(builtin_task_path("ncc").read_text())
    bad["sampling"]["kind"] = "everywhere"
    assert list(validator.iter_errors(bad))


# ---- where a task file is accepted, and its errors -----------------------------------------------------

def test_tasks_show_takes_a_name_or_a_file(tmp_path, capsys):
    path = _task_file(tmp_path, **{"optimisation.lr": 0.01})
    try:
        assert main(["tasks", "show", str(path)]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["name"] == "liver_own" and shown["optimisation"]["lr"] == 0.01
        assert registry.task_source("liver_own") == str(path.resolve())
        assert main(["tasks", "show", "LCS", "--yaml"]) == 0
        assert task_from_text(capsys.readouterr().out, "out") == get_task("lcs")
    finally:
        _forget("liver_own")


@pytest.mark.parametrize("change, needles", [
    ({"colour": "red"}, ["unknown key 'colour'", "'red'"]),
    ({"sampling.per_scan": "many"}, ["sampling.per_scan", "'many'", "integer"]),
    ({"kind": "segmentatio"}, ["kind", "'segmentatio'", "'segmentation'"]),
    ({"cube_size": [32, 64]}, ["cube_size", "[32, 64]"]),
    ({"name": "lcs"}, ["'lcs' is a built-in task's"]),
])
def test_a_bad_task_file_is_exit_2_naming_the_file_key_and_value(tmp_path, capsys, change, needles):
    path = _task_file(tmp_path, **change)
    for argv in (["tasks", "show", str(path)],
                 ["patches", "task", str(path), "--store", str(tmp_path / "nostore"), "--out", str(tmp_path / "o")],
                 ["finetune", "--task", str(path), "--patches", str(tmp_path)]):
        assert main(argv) == 2, argv
        one_line_error(capsys.readouterr().err, str(path), *needles)
    assert not (tmp_path / "o").exists()


# ---- genesis tasks init ---------------------------------------------------------------------------------

def _nifti(path: Path, shape=(6, 8, 10), value: int = 0) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.full(shape, value, dtype=np.int16)), str(path))


def _nnunet(root: Path, name: str, channels: dict, labels: dict, cases=("case_000", "case_001"),
            form: str = "v2", splits: bool = False) -> Path:
    folder = root / name
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    key = "channel_names" if form == "v2" else "modality"
    (folder / "dataset.json").write_text(json.dumps({key: channels, "labels": labels, "numTraining": len(cases),
                                                     "file_ending": ".nii.gz", "name": name}))
    for case in cases:
        if form == "v2":
            for index in channels:
                _nifti(folder / "imagesTr" / f"{case}_{int(index):04d}.nii.gz")
        else:
            _nifti(folder / "imagesTr" / f"{case}.nii.gz")
        _nifti(folder / "labelsTr" / f"{case}.nii.gz", value=1)
    if splits:
        (folder / "splits_final.json").write_text(json.dumps([{"train": list(cases[:1]), "val": list(cases[1:])}]))
    return folder


def _drafts(tmp_path: Path) -> list[tuple[Path, dict]]:
    """Three drafted task files (MR two-channel, CT, classification) and the dataset each came from."""
    mr = _nnunet(tmp_path, "Dataset501_Phantom", {"0": "T2", "1": "ADC"},
                 {"background": 0, "edema": 1, "tumour": 2, "whole": [1, 2]}, splits=True)
    ct = _nnunet(tmp_path, "Dataset502_Liver", {"0": "CT"}, {"background": 0, "liver": 1})
    csv = tmp_path / "cands.csv"
    csv.write_text("case_id,x,y,z,label\ncase_000,1.5,2,3,1\ncase_001,-4,5,6.25,0\ncase_001,0,0,0,0\n")
    out = []
    for folder, kwargs in ((mr, {"label": "tumour"}), (ct, {}), (ct, {"candidates": csv, "name": "nodules"})):
        path = tmp_path / f"{kwargs.get('name', folder.name)}.yaml"
        init_task(folder, path, **kwargs)
        out.append((path, {"folder": folder, **kwargs}))
    return out


def test_tasks_init_drafts_mr_ct_and_classification_tasks(tmp_path, capsys):
    (mr, _), (ct, _), (clf, _) = _drafts(tmp_path)
    spec = load_task_file(mr)
    assert (spec.name, spec.dataset, spec.kind, spec.modality) == ("phantom", "Dataset501_Phantom", "segmentation",
                                                                   "MR")
    assert spec.channels == ("t2", "adc") and spec.in_channels == 2
    assert (spec.intensity.kind, spec.intensity.low, spec.intensity.high) == ("percentile", 0.5, 99.5)
    assert spec.sampling.kind == "pos_neg" and spec.sampling.label == "label" and spec.sampling.target_values == (2,)
    assert spec.sampling.whole_volume_test and spec.evaluation == "whole_volume"
    assert spec.labels == {"background": 0, "edema": 1, "tumour": 2, "whole": (1, 2)}
    bms = get_task("bms")
    assert spec.cube_size == bms.cube_size and spec.optimisation == bms.optimisation
    assert spec.metrics == bms.metrics and (spec.split.kind, spec.split.fractions) == ("patient_seeded",
                                                                                     (0.6, 0.1, 0.3))
    text = mr.read_text()
    for needle in ("check", "from the closest built-in task, BMS", "tumour=2", "splits_final.json", "--splits"):
        assert needle in text, needle

    spec = load_task_file(ct)
    lcs = get_task("lcs")
    assert (spec.name, spec.modality, spec.channels) == ("liver", "CT", ("ct",))
    assert (spec.intensity.kind, spec.intensity.low, spec.intensity.high) == ("window", -1000.0, 1000.0)
    assert spec.sampling.target_values is None and spec.cube_size == lcs.cube_size
    assert spec.optimisation == lcs.optimisation and spec.inplane_scale == 1.0
    assert "from the closest built-in task, LCS" in ct.read_text() and "splits_final" not in ct.read_text()

    spec = load_task_file(clf)
    ncc = get_task("ncc")
    assert (spec.name, spec.kind, spec.head, spec.loss, spec.metrics, spec.evaluation) == (
        "nodules", "classification", "encoder-gap-dense", "bce", ("auc",), "cubes")
    assert spec.sampling.kind == "candidates" and spec.sampling.table == "candidates"
    assert spec.optimisation == ncc.optimisation and spec.cube_size == ncc.cube_size
    assert "genesis convert" in clf.read_text() and "1 positive and 2 negative" in spec.notes

    # the command line: written once, refused when it exists, rewritten with --force
    folder = tmp_path / "Dataset502_Liver"
    out = tmp_path / "cli.yaml"
    assert main(["tasks", "init", str(folder), "--out", str(out), "--name", "liver_ct"]) == 0
    assert load_task_file(out).name == "liver_ct" and "liver_ct" in capsys.readouterr().out
    assert main(["tasks", "init", str(folder), "--out", str(out)]) == 2
    one_line_error(capsys.readouterr().err, str(out), "--force")
    assert main(["tasks", "init", str(folder), "--out", str(out), "--force"]) == 0
    assert load_task_file(out).name == "liver"


def test_tasks_init_reads_msd_and_names_tasks():
    assert task_name_of("Dataset501_Phantom") == "phantom" and task_name_of("Task01_BrainTumour") == "braintumour"
    assert task_name_of("Dataset9_LCS") == "lcs_own" and task_name_of("Dataset7_3d-Kidney") == "t_3d_kidney"


def test_tasks_init_msd_form(tmp_path):
    folder = _nnunet(tmp_path, "Task01_BrainTumour", {"0": "FLAIR", "1": "T1w"},
                     {"0": "background", "1": "edema", "2": "enhancing"}, form="msd")
    ds = read_dataset_json(folder)
    assert ds.form == "msd" and ds.channels == ("FLAIR", "T1w") and ds.labels == {"background": 0, "edema": 1,
                                                                                  "enhancing": 2}
    assert ds.case_ids() == {"case_000", "case_001"}
    spec = init_task(folder, tmp_path / "t.yaml", label="edema").spec
    assert spec.name == "braintumour" and spec.channels == ("flair", "t1w") and spec.sampling.target_values == (1,)


@pytest.mark.parametrize("problem, needles", [
    ("missing", ["dataset.json", "missing"]),
    ("not json", ["dataset.json", "not JSON"]),
    ("no channels", ["dataset.json", "channel_names"]),
    ("no labels", ["dataset.json", "no labels"]),
    ("bad label", ["dataset.json", "--label 'kidney'", "liver=1"]),
    ("candidates header", ["cands.csv", "header", "case_id,x,y,z,label"]),
    ("candidates number", ["cands.csv", "line 3", "y", "'abc'"]),
    ("candidates label", ["cands.csv", "line 2", "label", "'2'"]),
    ("candidates case", ["cands.csv", "line 2", "'case_999'", "imagesTr"]),
    ("candidates positive", ["cands.csv", "no candidate has label 1"]),
])
def test_tasks_init_bad_input_is_one_line_naming_the_file(tmp_path, capsys, problem, needles):
    folder = _nnunet(tmp_path, "Dataset502_Liver", {"0": "CT"}, {"background": 0, "liver": 1})
    meta = folder / "dataset.json"
    csv = tmp_path / "cands.csv"
    rows = {"candidates header": "case,x,y,z,label\ncase_000,1,2,3,1\n",
            "candidates number": "case_id,x,y,z,label\ncase_000,1,2,3,1\ncase_001,1,abc,3,0\n",
            "candidates label": "case_id,x,y,z,label\ncase_000,1,2,3,2\n",
            "candidates case": "case_id,x,y,z,label\ncase_999,1,2,3,1\n",
            "candidates positive": "case_id,x,y,z,label\ncase_000,1,2,3,0\n"}
    argv = ["tasks", "init", str(folder), "--out", str(tmp_path / "t.yaml")]
    if problem == "missing":
        meta.unlink()
    elif problem == "not json":
        meta.write_text("{channel_names: ")
    elif problem == "no channels":
        meta.write_text(json.dumps({"labels": {"background": 0}}))
    elif problem == "no labels":
        meta.write_text(json.dumps({"channel_names": {"0": "CT"}}))
    elif problem == "bad label":
        argv += ["--label", "kidney"]
    else:
        csv.write_text(rows[problem])
        argv += ["--candidates", str(csv)]
    assert main(argv) == 2
    one_line_error(capsys.readouterr().err, *needles)
    assert not (tmp_path / "t.yaml").exists()


# ---- a task file builds its store, which keeps it ---------------------------------------------------------

@pytest.fixture(scope="module")
def lits_store(tmp_path_factory):
    from pipeline.sample_data.lits import write_lits_sample

    root = tmp_path_factory.mktemp("lits_task_file")
    summary = write_lits_sample(root / "lits", n_scans=6, seed=0, small=True)
    assert main(["convert", str(summary.out_dir), "--store", str(root / "vs"), "--workers", "1",
                 "--no-progress"]) == 0
    return root


def test_patches_task_from_a_file_records_the_task_file_and_refuses_a_cube_larger_than_every_volume(
        lits_store, tmp_path, capsys):
    vs, out = lits_store / "vs", tmp_path / "ps"
    path = _task_file(tmp_path, cube_size=[8, 16, 16], **{"sampling.per_scan": 2, "optimisation.lr": 0.01})
    try:
        assert main(["patches", "task", str(path), "--store", str(vs), "--out", str(out), "--workers", "1",
                     "--no-progress"]) == 0
        store = PatchStore(next(out.glob("task-liver_own-*")))
        spec = load_task_file(path)
        assert store.attrs["task"] == "liver_own"
        assert store.attrs["task_file"] == task_file_text(spec)
        assert store.attrs["task_file_sha256"] == task_file_sha256(spec)
        assert store.task_spec() == spec and store.attrs["config"]["task"] == spec.data_dict()

        # a training field changes nothing in the store: the same one is found
        lr = _task_file(tmp_path, name="liver_own", cube_size=[8, 16, 16],
                        **{"sampling.per_scan": 2, "optimisation.lr": 0.002})
        assert main(["patches", "task", str(lr), "--store", str(vs), "--out", str(out), "--workers", "1",
                     "--no-progress"]) == 0
        assert len(list(out.glob("task-liver_own-*"))) == 1

        # fine-tuning finds the task by its name in a fresh process: from the store's recorded task file
        from pipeline.finetune.run import prepare

        _forget("liver_own")
        prep = prepare(str(store.path), "liver_own", epochs=1)
        assert prep.spec == spec and prep.task_source == f"patch store {store.path}"
        assert prep.task_record().text == task_file_text(spec)
        prep = prepare(str(store.path), str(lr), epochs=1)  # the path: its own training fields
        assert prep.spec.optimisation.lr == 0.002 and prep.task_source == str(lr.resolve())
        _forget("liver_own")
        with pytest.raises(ValueError, match="not 'other'"):
            prepare(str(store.path), "other")
    finally:
        _forget("liver_own")

    # a cube larger than every volume (48 x 96 x 96, 48 x 48 x 48 on LCS's halved grid): exit 2 before any work
    big = _task_file(tmp_path, name="liver_big", cube_size=[64, 64, 64])
    try:
        assert main(["patches", "task", str(big), "--store", str(vs), "--out", str(out), "--workers", "1",
                     "--no-progress"]) == 2
    finally:
        _forget("liver_big")
    one_line_error(capsys.readouterr().err, "cube_size 64x64x64", "larger than every volume", "48x48x48",
              "inplane_scale 0.5")
    assert not list(out.glob("*liver_big*"))


# ---- MLflow: the runs keep their task file, and a user's task reads back in a fresh process ----------------

def test_transfer_table_reads_a_users_task_from_its_runs(tmp_path):
    from pipeline.runtime.tracking import Tracker
    from pipeline.transfer import table as T

    path = _task_file(tmp_path, name="liver_own")
    spec = resolve_task(str(path))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracker.create_run("grid", "parent")
    tracker.log_text(parent, task_file_text(spec), "task/liver_own.yaml")
    for seed, dice in ((0, 0.5), (1, 0.7)):
        tags = {"mlflow.parentRunId": parent, "genesis.cell": f"k{seed}", "task": "liver_own", "init": "scratch",
                "seed": str(seed), "label_fraction": "1.0"}
        child = tracker.create_run("grid", f"c{seed}", tags=tags)
        tracker.client.log_metric(child, "test_keras_mean_iou", dice)
        tracker.client.set_terminated(child, "FINISHED")
    assert tracker.read_text(parent, "task/liver_own.yaml") == task_file_text(spec)
    assert tracker.read_text(parent, "task/other.yaml") is None
    _forget("liver_own")
    try:
        cells = T.cells_from_mlflow(tracker, parent)
        assert get_task("liver_own") == spec and registry.task_source("liver_own") == f"MLflow run {parent}"
        table = T.results_table(cells)
        assert table.loc[0, "mean"] == pytest.approx(60.0) and table.loc[0, "n"] == 2
        markdown = T.to_markdown(table, T.failures(cells))
        assert "LIVER_OWN" in markdown and "60.00" in markdown
    finally:
        _forget("liver_own")


def test_a_finetuning_from_a_task_file_logs_it(ray_local, lits_store, tmp_path):
    """One fine-tuning through Ray Train (tiny, one epoch) with a task file: the run keeps `task/<name>.yaml`, the
    param and tag `task_file_sha256` and `task_source`, and the model is registered under the task's name."""
    from pipeline.finetune.run import finetune
    from pipeline.runtime.tracking import Tracker

    path = _task_file(tmp_path, name="liver_ft", cube_size=[16, 32, 32], **{"sampling.per_scan": 2})
    try:
        assert main(["patches", "task", str(path), "--store", str(lits_store / "vs"), "--out", str(tmp_path / "ps"),
                     "--workers", "1", "--no-progress"]) == 0
        store = next((tmp_path / "ps").glob("task-liver_ft-*"))
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        res = finetune(str(store), str(path), "scratch", preset="tiny", epochs=1, tracking_uri=uri,
                       storage_path=str(tmp_path / "ray"), name="liver-ft")
        assert res.error is None, res.error
        spec = load_task_file(path)
        tracker = Tracker(uri)
        run = tracker.run(res.mlflow_run_id)
        assert tracker.read_text(res.mlflow_run_id, "task/liver_ft.yaml") == task_file_text(spec)
        for record in (run.data.params, run.data.tags):
            assert record["task_file_sha256"] == task_file_sha256(spec)
            assert record["task_source"] == str(path.resolve())
        assert res.registered_as == "genesis-liver_ft" and run.data.tags["task"] == "liver_ft"
    finally:
        _forget("liver_ft")


# ---- hostile task files: no YAML anchors or aliases, values in messages capped ------------------------


def _laughs(depth: int) -> str:
    """A few hundred bytes of YAML that aliases expand to 10**(depth+1) strings ("billion laughs")."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, depth + 1)]
    return "\n".join(lines) + "\n"


def test_a_task_file_with_anchors_or_aliases_is_refused_naming_the_file_and_line(tmp_path):
    import time

    path = tmp_path / "laughs.yaml"
    path.write_text(task_file_text(get_task("ncc")) + _laughs(6))
    start = time.perf_counter()
    with pytest.raises(TaskFileError) as err:
        load_task_file(path)
    assert time.perf_counter() - start < 1.0
    message = str(err.value)
    assert message.startswith(f"{path}: not valid YAML at line ") and "anchor &a0 is not allowed" in message
    assert len(message) < 300
    # an alias of a scalar: refused too, though it expands nothing
    text = task_file_text(get_task("ncc")).replace("title:", "x_title: &t t\ntitle:", 1) + "notes_copy: *t\n"
    with pytest.raises(TaskFileError, match=r"anchor &t is not allowed"):
        task_from_text(text, "aliased.yaml")


def test_a_huge_value_is_shown_capped_in_the_error():
    data = task_to_dict(get_task("ncc"))
    data["title"] = [[f"word{i}" for i in range(1000)] for _ in range(1000)]  # a million strings, no alias
    with pytest.raises(TaskFileError) as err:
        task_from_dict(data, where="big.yaml")
    message = str(err.value)
    assert message.startswith("big.yaml: title: expected a string, got [['word0', 'word1'")
    assert len(message) < 250 and "..." in message
    data = task_to_dict(get_task("ncc"))
    data["x" * 5000] = "y" * 5000
    with pytest.raises(TaskFileError, match=r"unknown key 'xxxx") as err:
        task_from_dict(data, where="key.yaml")
    assert len(str(err.value)) < 600


def test_a_resolved_task_file_does_not_join_the_builtin_table(tmp_path):
    """A task file resolved earlier in the same process (a test, a script running several commands) is known by
    name afterwards, but `tasks list`, the README's table and reproduce's default still mean the five built-ins."""
    from pipeline.tasks.registry import all_tasks, builtin_names, get_task, resolve_task, tasks_table
    from pipeline.tasks.task_file import task_to_yaml

    path = tmp_path / "extra.yaml"
    path.write_text(task_to_yaml(get_task("lcs").with_overrides(name="extra_liver")), encoding="utf-8")
    resolve_task(str(path))
    assert get_task("extra_liver").name == "extra_liver"
    assert [t.name for t in all_tasks(builtin_only=True)] == list(builtin_names())
    assert "EXTRA_LIVER" not in tasks_table(markdown=True, builtin_only=True)
    assert "EXTRA_LIVER" in tasks_table()
