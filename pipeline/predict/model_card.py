"""What a logged model says about how it is applied: its task file and preprocessing, read without its weights.

A fine-tuned model carries `task.yaml` and `preprocessing.json` beside its weights
(`pipeline.model_io.model_format.write_model_card`). A model logged before it did may still have its task file in
its MLflow run (`task/<name>.yaml`, logged by the run that trained it): that is the fallback. Without either the
model cannot be applied safely (a "liver" model on a head CT gives a label map, not a warning), so `predict`
refuses it.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.runtime.errors import one_line
from pipeline.runtime.tracking import Tracker
from pipeline.tasks.spec import TaskSpec
from pipeline.tasks.task_file import task_from_text

__all__ = ["ModelCard", "load_model_card", "card_of_model", "parse_task_text", "resolve_model_uri", "ModelRef"]

_MODELS = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")
_RUNS = re.compile(r"^runs:/(?P<run>[0-9a-zA-Z]+)(?:/.*)?$")


@dataclass(frozen=True)
class ModelRef:
    """Where a model URI points: the registered name and version (models:/), and the run that logged it."""

    uri: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None


@dataclass(frozen=True)
class ModelCard:
    """How a logged model is applied. `task`: its TaskSpec (None: the model carries none); `task_file`: the task
    file's text; `task_source`: where it was found ("model", "run artifact task/NAME.yaml" or None);
    `preprocessing`: its preprocessing.json (None for models logged without one)."""

    task: TaskSpec | None
    preprocessing: dict | None
    uri: str
    version: str | None = None
    run_id: str | None = None
    name: str | None = None
    task_file: str | None = None
    task_source: str | None = None


def parse_task_text(text: str, where: str) -> TaskSpec:
    """The TaskSpec of a task file's text; a ValueError (TaskFileError) naming `where`, the key and the value when
    it is not one. Read as every task file is (`task_from_text`: no YAML anchors or aliases, values capped)."""
    return task_from_text(text, where)


def resolve_model_uri(uri: str, tracker: Tracker | None) -> ModelRef:
    """The registered name, version and run id behind `uri` (models:/NAME/VERSION, models:/NAME@ALIAS,
    models:/NAME/latest, runs:/RUN_ID/...); a local folder has none. A ValueError when the registry does not
    know it."""
    m = _MODELS.match(uri)
    if m and tracker is not None:
        name = m["name"]
        try:
            if m["alias"]:
                mv = tracker.client.get_model_version_by_alias(name, m["alias"])
            elif m["version"] == "latest":
                versions = tracker.search_model_versions(f"name='{name}'")
                if not versions:
                    raise ValueError(f"no version of {name!r}")
                mv = max(versions, key=lambda v: int(v.version))
            else:
                mv = tracker.client.get_model_version(name, m["version"])
        except Exception as exc:  # noqa: BLE001 - MlflowException: no such model, version or alias
            raise ValueError(f"cannot load {uri!r} (registry {tracker.uri}): {one_line(exc)}") from None
        return ModelRef(uri=uri, name=name, version=str(mv.version), run_id=mv.run_id or None)
    r = _RUNS.match(uri)
    if r:
        return ModelRef(uri=uri, run_id=r["run"])
    return ModelRef(uri=uri)


def _run_task(tracker: Tracker, run_id: str | None) -> tuple[str | None, str | None]:
    """(text, artifact path) of the task file the model's run logged (`task/<name>.yaml`), or (None, None).
    Read with the model card's size limit (`MAX_CARD_BYTES`): the run's artifacts are anyone's upload."""
    from pipeline.model_io.model_format import MAX_CARD_BYTES

    if not run_id:
        return None, None
    try:
        files = sorted((f.path, f.file_size) for f in tracker.client.list_artifacts(run_id, "task")
                       if not f.is_dir and f.path.endswith((".yaml", ".yml")))
    except Exception:  # noqa: BLE001 - a run without artifacts, or gone: no fallback
        return None, None
    if not files:
        return None, None
    path, size = files[0]
    too_big = (f"run {run_id}'s artifact {path}: over the {MAX_CARD_BYTES}-byte limit of a task file, refusing "
               f"to read it")
    if size is not None and size > MAX_CARD_BYTES:
        raise ValueError(too_big)
    with tempfile.TemporaryDirectory(prefix="genesis-task-") as tmp:
        local = tracker.download_artifacts(f"runs:/{run_id}/{path}", tmp)
        with open(local, "rb") as f:
            raw = f.read(MAX_CARD_BYTES + 1)
    if len(raw) > MAX_CARD_BYTES:
        raise ValueError(too_big)
    try:
        return raw.decode("utf-8"), path
    except UnicodeDecodeError as err:
        raise ValueError(f"run {run_id}'s artifact {path}: not UTF-8 ({err.reason} at byte {err.start})") from None


def card_of_model(model, uri: str, tracking_uri: str | None = None) -> ModelCard:
    """The card of a model `pipeline.model_io.load.load_model` returned (its `genesis_task_file` and
    `genesis_preprocessing`), with the run's task file as the fallback."""
    tracker = Tracker.at(tracking_uri) if uri.startswith(("models:/", "runs:/")) else None
    ref = resolve_model_uri(uri, tracker)
    return _card(ref, getattr(model, "genesis_task_file", None), getattr(model, "genesis_preprocessing", None),
                 tracker)


def _card(ref: ModelRef, task_text: str | None, preprocessing: dict | None, tracker: Tracker | None) -> ModelCard:
    source = "model" if task_text is not None else None
    if task_text is None and tracker is not None:
        task_text, path = _run_task(tracker, ref.run_id)
        source = f"run artifact {path}" if path else None
    where = f"{ref.uri}: " + ("task.yaml" if source == "model" else str(source))
    task = parse_task_text(task_text, where) if task_text is not None else None
    return ModelCard(task=task, preprocessing=preprocessing, uri=ref.uri, version=ref.version, run_id=ref.run_id,
                     name=ref.name, task_file=task_text, task_source=source)


def load_model_card(uri: str, tracking_uri: str | None = None) -> ModelCard:
    """The card of the logged model `uri` (models:/, runs:/ or a local MLflow model folder), its weights
    unread: the model folder's task.yaml and preprocessing.json (`read_model_card_folder`: bounded reads,
    `yaml.safe_load`, strict JSON), the model's run's task file when the model has none. A ValueError naming the
    URI when the model cannot be found or its card is damaged."""
    from pipeline.model_io.model_format import ModelFormatError, read_model_card_folder

    local = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    if (local / "MLmodel").is_file():
        try:
            text, pre = read_model_card_folder(local, repr(uri))
        except ModelFormatError as err:
            raise ValueError(str(err)) from None
        return _card(ModelRef(uri=uri), text, pre, None)
    if not uri.startswith(("models:/", "runs:/")):
        raise ValueError(f"load_model_card: {uri!r} is not models:/NAME/VERSION, models:/NAME@ALIAS, "
                         f"runs:/RUN_ID/model or an MLflow model folder")
    tracker = Tracker.at(tracking_uri)
    ref = resolve_model_uri(uri, tracker)
    with tempfile.TemporaryDirectory(prefix="genesis-card-") as tmp:
        try:
            folder = tracker.download_artifacts(uri, tmp)
        except Exception as exc:  # noqa: BLE001 - MlflowException: no such model / run
            raise ValueError(f"load_model_card: cannot load {uri!r} (registry {tracker.uri}): {one_line(exc)}"
                             ) from None
        try:
            text, pre = read_model_card_folder(folder, repr(uri))
        except ModelFormatError as err:
            raise ValueError(str(err)) from None
    return _card(ref, text, pre, tracker)
