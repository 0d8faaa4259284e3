"""The one module that talks to MLflow. Training calls it on rank 0 only; nothing happens at import.

Default tracking URI: a SQLite file `mlflow.db` in the working directory (absolute, so Ray
workers started elsewhere write to the same file); `--tracking-uri` for an MLflow server.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

__all__ = ["resolve_uri", "RunLogger", "create_run", "register_model", "model_signature", "ui_hint", "mark_failed",
           "PRETRAINED_MODEL", "classifier_signature", "load_model_state", "register_finetuned", "run_metrics",
           "finetuned_model_name", "run_status", "artifact_location"]

PRETRAINED_MODEL = "genesis-pretrained"


def resolve_uri(uri: str | None) -> str:
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
        return uri
    return "sqlite:///" + str(Path("mlflow.db").resolve())


def _client(uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def create_run(uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> str:
    """A new run (left open for the training to log into); returns its id."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment,
                                                                    artifact_location=artifact_location(uri))
    run = client.create_run(exp_id, run_name=run_name, tags=tags or {})
    return run.info.run_id


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite database (`<db folder>/mlartifacts/`), so
    models and figures land with the runs wherever the process runs (without one MLflow writes `./mlruns` of the
    current folder: inside a Ray job, Ray's temporary working folder). A server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def model_signature(channels: int = 1):
    """Any batch size and any cube size: (-1, C, -1, -1, -1) float32 in and out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    spec = TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1, -1))
    return ModelSignature(inputs=Schema([spec]), outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1, -1))]))


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class RunLogger:
    """Logging into one MLflow run (resumable by id after a restart)."""

    def __init__(self, uri: str, run_id: str, system_metrics: bool = True):
        import mlflow

        self.uri, self.run_id = uri, run_id
        _client(uri)
        if system_metrics:
            os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "5")
        self._run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
        self.mlflow = mlflow

    def log_params(self, params: dict) -> None:
        flat = _flat(params)
        existing = self.mlflow.get_run(self.run_id).data.params
        new = {k: v[:6000] for k, v in flat.items() if k not in existing}
        if new:
            self.mlflow.log_params(new)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v == v}, step=step)

    def log_figure(self, fig, name: str) -> None:
        self.mlflow.log_figure(fig, name)

    def log_patch_store(self, path: str, key: str, index, context: str = "pretraining") -> None:
        """The patch store as the run's input dataset, named and digested by its content key."""
        import mlflow.data

        ds = mlflow.data.from_pandas(index, source=str(path), name=f"patch-store-{key}", digest=key[:8])
        for attempt in range(3):
            try:
                self.mlflow.log_input(ds, context=context)
                return
            except Exception as err:  # noqa: BLE001
                # two runs of one experiment logging the same store at the same moment: one insert of the
                # dataset row loses the unique-constraint race; the row exists now, so the retry only links it
                if ("UNIQUE constraint" not in str(err) and "IntegrityError" not in str(err)) or attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def log_dict(self, d: dict, name: str) -> None:
        """A JSON artifact (`name` ends in .json)."""
        self.mlflow.log_dict(d, name)

    def log_table_csv(self, df, name: str) -> None:
        """A pandas DataFrame as a CSV artifact `name` (e.g. predictions.csv at the run's artifact root)."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            df.to_csv(path, index=False)
            parent = str(Path(name).parent)
            self.mlflow.log_artifact(str(path), artifact_path=None if parent == "." else parent)

    def log_finetuned_model(self, model, in_channels: int = 1, kind: str = "segmentation", name: str = "model"):
        """A fine-tuned model: the U-Net (probabilities (-1, 1, D, H, W)) or the classifier (logits (-1, 1))."""
        import mlflow.pytorch

        sig = model_signature(in_channels) if kind == "segmentation" else classifier_signature(in_channels)
        return mlflow.pytorch.log_model(model, name=name, signature=sig, serialization_format="pickle",
                                        pip_requirements=["torch", "genesis-pipeline"])

    def log_model(self, model, name: str = "model"):
        import mlflow.pytorch

        return mlflow.pytorch.log_model(model, name=name, signature=model_signature(), serialization_format="pickle",
                                        pip_requirements=["torch", "genesis-pipeline"])

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def register_model(uri: str, model_uri: str, name: str, metric: float | None = None,
                   lower_is_better: bool = True, tags: dict | None = None, aliases: tuple[str, ...] = ()):
    """Register `model_uri` as a new version of `name`; alias it `best` when its `metric` beats the
    version that holds `best` (or none does), and with each of `aliases`.

    MLflow reserves the alias name `latest`: the newest version is `models:/NAME/latest`, which
    MLflow resolves itself, so no alias is needed (or allowed) for it.
    """
    import mlflow

    client = _client(uri)
    version = mlflow.register_model(model_uri, name)
    for k, v in (tags or {}).items():
        client.set_model_version_tag(name, version.version, k, str(v))
    if metric is not None:
        client.set_model_version_tag(name, version.version, "val_loss", str(metric))
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    if metric is not None:
        try:
            best = client.get_model_version_by_alias(name, "best")
            best_metric = float(best.tags.get("val_loss", "inf"))
        except Exception:
            best_metric = float("inf") if lower_is_better else float("-inf")
        if (metric < best_metric) if lower_is_better else (metric > best_metric):
            client.set_registered_model_alias(name, "best", version.version)
    return version


def ui_hint(uri: str, run_id: str) -> str:
    """The run's URL in the MLflow UI and the command that serves that UI."""
    client = _client(uri)
    run = client.get_run(run_id)
    if uri.startswith("http"):
        base, cmd = uri.rstrip("/"), None
    else:
        base, cmd = "http://127.0.0.1:5000", f"mlflow ui --backend-store-uri {uri} --port 5000"
    url = f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    return url if cmd is None else f"{url}\n  open the UI with: {cmd}"


def mark_failed(uri: str, run_id: str, reason: str | None = None, status: str = "FAILED") -> None:
    """End a run that is still RUNNING as FAILED (or KILLED); `reason` goes into its `error` tag, which the
    transfer table shows beside the failed fine-tuning."""
    client = _client(uri)
    if reason:
        client.set_tag(run_id, "error", reason[:5000])
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status=status)


def run_status(uri: str, run_id: str) -> str:
    """RUNNING, FINISHED, FAILED or KILLED."""
    return _client(uri).get_run(run_id).info.status


def classifier_signature(channels: int = 1):
    """Any batch and cube size in, one logit per cube out: (-1, C, -1, -1, -1) -> (-1, 1)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    spec = TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1, -1))
    return ModelSignature(inputs=Schema([spec]), outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1))]))


def load_model_state(uri: str, model_uri: str) -> dict:
    """The state dict (CPU tensors) of a logged PyTorch model, e.g. `models:/genesis-pretrained/3` or
    `models:/genesis-official@official`; a ValueError naming the URI when it cannot be loaded."""
    import mlflow.pytorch

    _client(uri)
    try:
        model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except Exception as err:
        raise ValueError(f"cannot load {model_uri!r} from the MLflow registry at {uri}: "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def finetuned_model_name(task: str) -> str:
    """The registered name of a task's fine-tuned models: genesis-<task>, lower case."""
    return f"genesis-{task.lower()}"


def register_finetuned(uri: str, model_uri: str, name: str, tags: dict | None = None):
    """Register a fine-tuned model as a new version of `name`, with `tags` (the run's test metrics,
    init, preset, ...) on the version. No alias is set (`latest` is reserved by MLflow: use
    `models:/NAME/latest`); choosing a `best` version by test metrics is left to the user."""
    import mlflow

    client = _client(uri)
    version = mlflow.register_model(model_uri, name)
    for k, v in (tags or {}).items():
        client.set_model_version_tag(name, version.version, k, str(v))
    return version


def run_metrics(uri: str, run_id: str) -> dict[str, float]:
    """The latest value of each metric of a run."""
    return dict(_client(uri).get_run(run_id).data.metrics)
