"""The one module that talks to MLflow (besides the logged-model format, `pipeline.model_io.model_format`, which
logs models into the run a `RunLogger` holds open).

A `Tracker` is built once from a tracking URI (`Tracker.open` checks it first: a SQLite file whose folder can be
written, a file store, an MLflow server answering its REST API within seconds, or another scheme MLflow has a
store for) and then called: create a run, log into it, register models, mark runs failed, read runs back.
Training calls it on rank 0 only; nothing happens at import.

Default tracking URI: a SQLite file `mlflow.db` in the working directory (absolute, so Ray workers started
elsewhere write to the same file); `--tracking-uri` for an MLflow server.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import time
from pathlib import Path


from pipeline.runtime.errors import UsageError
from pipeline.runtime.paths import output_dir, shared_path

__all__ = ["Tracker", "resolve_uri", "RunLogger", "PRETRAINED_MODEL", "project_version",
           "finetuned_model_name", "artifact_location", "provenance_tags", "git_state",
           "entry_point", "ENTRY_POINT_ENV", "COMMANDS", "BEST_ALIAS", "best_alias_of", "check_experiment",
           "mlflow_http_limits", "MLFLOW_HTTP_RETRIES", "PROBE_TIMEOUT_S", "record_failure", "DB_LOCK_WAIT_S",
           "EXPERIMENT_KIND_TAG", "MODEL_TRAINING_KIND", "UI_VIEW_QUERY", "RUN_DESCRIPTION_TAG", "ui_command"]

PROBE_TIMEOUT_S = 5.0
MLFLOW_HTTP_RETRIES = "5"
"""MLflow's backoff doubles from 2 s: 5 retries ride out about a minute of server trouble during a long run;
its default 7 is about 4 minutes of waiting before the first error is seen."""
MLFLOW_HTTP_TIMEOUT_S = "30"

PRETRAINED_MODEL = "genesis-pretrained"

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
"""The experiment tag by which MLflow names an experiment's kind, and its value for model training (the UI's
"Machine learning"). Every experiment the pipeline uses carries it (`Tracker.ensure_experiment`). MLflow 3.17's UI
does not choose its view by it - the view is the browser's GenAI / Model training switch, GenAI until switched (see
`UI_VIEW_QUERY`) - but it is the kind MLflow itself records for an experiment, and what a UI that follows the
experiment (mlflow/mlflow#24498) reads."""
_UNDECIDED_KINDS = ("", "no_inferred_type", "genai_development_inferred", "custom_model_development_inferred")
"""Kinds nobody chose (absent, or guessed by the UI): replaced by `MODEL_TRAINING_KIND`; a kind set on purpose
(`genai_development`, `finetuning`, ...) is left as it is."""
UI_VIEW_QUERY = "workflowType=machine_learning"
"""MLflow 3.17's UI opens an experiment in the view of its GenAI / Model training switch: the page URL's
`workflowType` when given, else the browser's last choice (localStorage `mlflow.workflowType_v1`), else GenAI,
whose overview shows "Traces 0, No data" for a training experiment. The links the pipeline prints carry this query,
so they open on the runs whatever the browser chose before."""
RUN_DESCRIPTION_TAG = "mlflow.note.content"
"""The tag the MLflow UI shows, rendered as Markdown, as a run's description (its Overview tab)."""


def resolve_uri(uri: str | None) -> str:
    """The tracking URI: the one given, else ./mlflow.db; a relative SQLite path is made absolute. (Not
    MLFLOW_TRACKING_URI: `mlflow.set_tracking_uri` sets it, so in one process a stage would silently inherit
    the previous stage's store.)"""
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
        return uri
    return "sqlite:///" + str(Path("mlflow.db").resolve())


COMMANDS: dict[str, dict] = {
    "convert": {}, "stores": {"show": {}, "preview": {}, "list": {}, "verify": {}},
    "patches": {"pretrain": {}, "task": {}, "preview": {}}, "pretrain": {}, "finetune": {},
    "transfer": {}, "predict": {}, "reproduce": {}, "tasks": {"list": {}, "show": {}, "init": {}}, "weights": {"import": {}},
    "sample-data": {}}
"""The genesis command line's (sub)commands, so a run names the command that made it without importing the CLI
(the CLI sits on top; `tests/test_cli_layering.py` checks that its parser has exactly these)."""

#: Set by the CLI (and inherited by the Ray workers it starts) to the command that started the work.
ENTRY_POINT_ENV = "GENESIS_ENTRY_POINT"


def provenance_tags(command: str | None = None) -> dict[str, str]:
    """Tags that say where a run came from: `genesis.git_commit` (the checkout this code runs from, or
    "unknown"), `genesis.git_dirty` ("true" when that tree has uncommitted changes), `genesis.user`,
    `genesis.entry_point` (`command` when given: the command that makes the run; else `entry_point()`), and,
    when `command` is given, `genesis.launched_by` (the process's own entry point: the same command from the
    CLI, `genesis reproduce` or `demo.py` when those ran it); and MLflow's own `mlflow.user`,
    `mlflow.source.name`, `mlflow.source.type`, `mlflow.source.git.commit` (only for a known commit), which the
    MLflow UI shows."""
    commit, dirty = git_state(Path(__file__).resolve().parents[2])
    user, launcher = _user(), entry_point()
    entry = command or launcher
    tags = {"genesis.git_commit": commit, "genesis.user": user, "genesis.entry_point": entry,
            "mlflow.user": user, "mlflow.source.name": entry, "mlflow.source.type": "LOCAL"}
    if command:
        tags["genesis.launched_by"] = launcher
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
        tags["genesis.git_dirty"] = "true" if dirty else "false"
    return tags


def git_state(folder: str | Path) -> tuple[str, bool | None]:
    """(HEAD commit of the git checkout whose top folder is `folder`, whether its tree has changes, untracked
    files included); ("unknown", None) when `folder` is not the top of a checkout (e.g. the package installed
    into a virtual environment that happens to sit inside some other checkout) or git is not installed."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, encoding="utf-8",
                              errors="replace", timeout=20, check=True).stdout

    try:
        top, commit = (git("rev-parse", "--show-toplevel", "HEAD").splitlines() + ["", ""])[:2]
        if not top or Path(top).resolve() != Path(folder).resolve() or len(commit) < 40:
            return "unknown", None
        return commit, bool(git("status", "--porcelain").strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def entry_point(argv: list[str] | None = None) -> str:
    """The command that started this work: $GENESIS_ENTRY_POINT when set (the CLI sets it, so Ray workers
    inherit it), else from `argv` (default sys.argv): `genesis` and its subcommands (`genesis weights
    import`, options and paths left out) for the CLI, the script's (or `python -m` package's) name for
    anything else."""
    import sys

    if argv is None:
        if os.environ.get(ENTRY_POINT_ENV):
            return os.environ[ENTRY_POINT_ENV]
        argv = sys.argv
    if not argv or not argv[0]:
        return "python"
    path = Path(argv[0])
    if path.name == "genesis" or path.as_posix().endswith("pipeline/cli.py"):
        words, tree = ["genesis"], COMMANDS
        for word in argv[1:]:
            if word not in tree:
                break
            words.append(word)
            tree = tree[word]
        return " ".join(words)
    return path.parent.name if path.name == "__main__.py" else path.name  # python -m pytest: "pytest"


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError, ImportError):  # no passwd entry and no $USER (some containers)
        return "unknown"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite database (`<db folder>/mlartifacts/`), so
    models and figures land with the runs wherever the process runs (without one MLflow writes `./mlruns` of the
    current folder: inside a Ray job, Ray's temporary working folder). An MLflow server (http, https) keeps
    them in its proxied artifact store (`mlflow-artifacts:/`, the server's default): None leaves it to the
    server, so clients never write to a path of their own machine."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def project_version() -> str:
    """The installed genesis-pipeline version, or "unknown" when running from a copied source tree (a Ray job's
    working_dir)."""
    import importlib.metadata as md

    try:
        return md.version("genesis-pipeline")
    except md.PackageNotFoundError:
        return "unknown"


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
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
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

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)

    @staticmethod
    def end_active(status: str = "FAILED") -> None:
        """End this process's active run, if any (a logger that raised before `end`): the next logger of the
        same process would otherwise find that run still active."""
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run(status=status)


BEST_ALIAS = "best"


def best_alias_of(store_key: str, preset: str, width: int | str) -> str:
    """The alias of the best version among those pretrained on one patch store (its content key's first 8
    characters) with one preset and U-Net width: best-1a2b3c4d-tiny-w4."""
    return f"{BEST_ALIAS}-{store_key[:8]}-{preset}-w{width}"


def _group(tags: dict) -> tuple[str, str, str] | None:
    """(patch store key, preset, width) of a version's tags; None when one is unknown."""
    group = tuple(str(tags.get(k, "") or "") for k in ("patch_store", "preset", "width"))
    return group if all(group) else None  # type: ignore[return-value]


def _improves(client, name: str, alias: str, metric: float, lower_is_better: bool) -> tuple[bool, object | None]:
    """(whether `metric` beats the version holding `alias`, or no version does; that version or None)."""
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - no version holds the alias
        return True, None
    default = "inf" if lower_is_better else "-inf"
    held = float(holder.tags.get("val_loss", default))
    return ((metric < held) if lower_is_better else (metric > held)), holder


def finetuned_model_name(task: str) -> str:
    """The registered name of a task's fine-tuned models: genesis-<task>, lower case."""
    return f"genesis-{task.lower()}"




def record_failure(uri: str, run_id: str, error: BaseException) -> None:
    """Rank 0's last word on a run whose training or logging raised `error`: this process's active MLflow run is
    ended, and when no retry can mend the error (`is_deterministic`: bad data, a bug, a full disk) the run is marked
    FAILED with its cause and its models dropped (`Tracker.mark_failed`). Best effort: the store may be on the
    full disk too, then the driver says so. Other errors are left to Ray's retries (the restart resumes the run)."""
    from pipeline.runtime.errors import failure_reason, is_deterministic

    try:
        RunLogger.end_active("FAILED")
    except Exception:  # noqa: BLE001 - the store cannot be written: the driver reports the run
        pass
    if is_deterministic(error):
        try:
            Tracker.at(uri).mark_failed(run_id, reason=failure_reason(error))
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------- checks, before any run exists

def mlflow_http_limits() -> None:
    """Bound MLflow's HTTP retries and timeout for this process and the local Ray it starts (their
    environment is inherited), unless the user set them."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", MLFLOW_HTTP_RETRIES)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", MLFLOW_HTTP_TIMEOUT_S)


def check_experiment(name: str | None, option: str = "--experiment") -> str:
    """An MLflow experiment name: not empty, at most MLflow's 500 characters (MLflow would refuse it only when
    the run is created)."""
    if name is None or not str(name).strip():
        raise UsageError(f"{option} {name!r}: an experiment needs a name")
    if len(name) > 500:
        raise UsageError(f"{option}: a name of {len(name)} characters; MLflow allows at most 500")
    return name


def check_uri(uri: str | None, option: str = "--tracking-uri", timeout: float = PROBE_TIMEOUT_S) -> str:
    """The tracking URI a stage will use (as `resolve_uri` makes it), checked: a SQLite database or file store
    whose folder can be written (a new file is created, an existing one read whole, once, under a lock beside it:
    `_open_database`), an MLflow server that answers its REST API within `timeout` s and accepts the credentials
    given (401 is a UsageError naming MLFLOW_TRACKING_USERNAME/PASSWORD), or another scheme MLflow has a tracking
    store for. Also bounds MLflow's own HTTP retries for this process."""
    mlflow_http_limits()
    if uri is None:
        uri = "sqlite:///" + shared_path(None, option, default="mlflow.db")
    elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative to where it runs
        uri = "sqlite:///" + shared_path(uri[len("sqlite:///"):], option)
    uri = resolve_uri(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if db.is_dir():
            raise UsageError(f"{option} {uri}: {db} is a folder, not a SQLite database file")
        output_dir(str(db.parent), option)
        if db.exists() and not os.access(db, os.W_OK):
            raise UsageError(f"{option} {uri}: {db} is not writable")
        _open_database(uri, db, option)
        return uri
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        _probe_server(uri, option, timeout)
    elif scheme in ("", "file"):
        output_dir(uri[len("file://"):] if scheme == "file" else uri, option)
    else:
        _check_scheme(uri, scheme, option)
    return uri


DB_LOCK_WAIT_S = 300.0
"""How long a stage waits for another process that is creating or checking the same SQLite database."""


def _open_database(uri: str, db: Path, option: str) -> None:
    """Create a new SQLite tracking database, or check an existing one, once, under a lock beside it
    (`<db>.lock`), before any run starts. MLflow creates its tables and runs its schema migrations when a store is
    first opened, without a lock: several processes opening a new file at once run the migrations together and
    all but one fail ("duplicate column name: step"). An existing file is read whole (SQLite's `quick_check`) and
    through MLflow (experiments, registered models): garbage or a truncated file is found here, naming it,
    instead of after the training."""
    from pipeline.storage.locks import FileLock, LockBusyError

    lock = FileLock(f"{db}.lock", purpose=f"creating or checking the MLflow database {db}")
    deadline = time.monotonic() + DB_LOCK_WAIT_S
    while True:
        try:
            lock.acquire()
            break
        except LockBusyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        if db.exists() and db.stat().st_size > 0:
            _check_sqlite_file(uri, db, option)
        _read_store(uri, db, option)
    finally:
        lock.release()


def _check_sqlite_file(uri: str, db: Path, option: str) -> None:
    """Every page of an existing database readable (SQLite's own `quick_check`, read-only)."""
    import sqlite3

    def bad(problem: str) -> UsageError:
        return UsageError(f"{option} {uri}: {db} is not a readable MLflow database ({problem}); restore it from a "
                          f"backup, or give another --tracking-uri")

    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=60)
    except sqlite3.Error as err:
        raise bad(str(err)) from None
    try:
        rows = [r[0] for r in con.execute("PRAGMA quick_check(5)").fetchall()]
    except sqlite3.Error as err:
        raise bad(str(err)) from None
    finally:
        con.close()
    if rows != ["ok"]:
        raise bad("; ".join(str(r) for r in rows)[:200])


def _read_store(uri: str, db: Path, option: str) -> None:
    """Open the store as the stage will (MLflow creates the tables of a new file here) and read its experiments
    and registered models. An out-of-date schema is a usage error naming MLflow's own upgrade command (MLflow
    never upgrades a database by itself; its advice is to back it up first)."""
    from mlflow import MlflowClient

    from pipeline.runtime.errors import disk_full

    import logging

    quiet = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration")]
    levels = [q.level for q in quiet]
    try:  # a new database's "Creating initial MLflow database tables..." lines are not the user's business
        for q in quiet:
            q.setLevel(logging.WARNING)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy's and MLflow's errors: the file is named instead
        if disk_full(err, str(db)):  # the database cannot grow: "disk full: <db> (filesystem ...)", exit 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(db)) from None
        text = " ".join(str(err).split())
        if "out-of-date database schema" in text:
            raise UsageError(f"{option} {uri}: {db} was written by an older MLflow; back it up, then run "
                             f"`mlflow db upgrade {uri}`") from None
        raise UsageError(f"{option} {uri}: {db} is not a readable MLflow database ({text[:160]}); restore it "
                         f"from a backup, or give another --tracking-uri") from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


BUILT_IN_SCHEMES = ("", "file", "sqlite", "http", "https", "databricks", "databricks-uc", "uc")
"""The tracking-store schemes MLflow knows itself, besides its SQL databases (`DATABASE_ENGINES`)."""


def _check_scheme(uri: str, scheme: str, option: str) -> None:
    """A scheme MLflow has no store for (ftp://, a typo) fails when the first run is created, after the work has
    started: said here instead, without opening anything. Known: MLflow's own schemes, its SQL databases
    (`postgresql+psycopg2://` counts as `postgresql`) and the schemes of installed tracking-store plugins (the
    `mlflow.tracking_store` entry points, MLflow's documented plugin interface)."""
    import importlib.metadata

    from mlflow.store.db.db_types import DATABASE_ENGINES

    known = {*BUILT_IN_SCHEMES, *DATABASE_ENGINES,
             *(ep.name for ep in importlib.metadata.entry_points(group="mlflow.tracking_store"))}
    if scheme.split("+", 1)[0] not in known:
        raise UsageError(f"{option} {uri}: MLflow has no tracking store for the scheme {scheme!r}; use one of "
                         f"{', '.join(sorted(k for k in known if k))}, or a folder")


PROBE_PATH = "/api/2.0/mlflow/experiments/get-by-name"


def _probe_server(uri: str, option: str, timeout: float) -> None:
    """Ask the server for the Default experiment (a GET) through MLflow's own client (its credentials and TLS settings, from
    MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, ..._INSECURE_TLS, ..._SERVER_CERT_PATH), with no retry and a
    `timeout` s limit. An answer, or 403 (logged in, but not allowed to read that experiment: a stage may still
    use its own), passes. 401 (no credentials, or refused ones) is a UsageError naming the variables to set: the
    stage would otherwise fail at its first MLflow call. Nothing answering, or an answer that is not MLflow's REST
    API (a wrong port or path, another web server), is a UsageError naming the URI."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException, RestException

    limits = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout)))}
    saved = {k: os.environ.get(k) for k in limits}
    os.environ.update(limits)
    try:
        MlflowClient(tracking_uri=uri).get_experiment_by_name("Default")
        return
    except RestException as err:  # a JSON error: MLflow's own (it names an error_code), else another service's
        if isinstance(err.json, dict) and err.json.get("error_code"):
            return
        raise UsageError(f"{option} {uri}: answers HTTP but is not an MLflow tracking server (GET {PROBE_PATH}: "
                         f"{str(err.json)[:80]}); give the address `mlflow server` listens on") from None
    except MlflowException as err:
        text = str(err)
        code = re.search(r"error code (\d+)", text)
        if code and code.group(1) == "401":
            raise UsageError(_unauthenticated(uri, option)) from None
        if code and code.group(1) == "403":
            return
        if code:
            raise UsageError(f"{option} {uri}: answers HTTP but is not an MLflow tracking server (GET "
                             f"{PROBE_PATH}: {code.group(1)}); give the address `mlflow server` listens on") from None
        if "failed with" in text and "exception" in text:
            reason = "timed out" if "timeout" in text.lower() or "timed out" in text.lower() else \
                _connection_reason(text)
            raise UsageError(f"{option} {uri}: the MLflow tracking server does not answer ({reason}; waited at "
                             f"most {timeout:g} s); start it, or give another URI") from None
        raise UsageError(f"{option} {uri}: answers HTTP but is not an MLflow tracking server ({text[:120]}); "
                         f"give the address `mlflow server` listens on") from None
    except ValueError as err:  # a body that is not JSON at all
        raise UsageError(f"{option} {uri}: answers HTTP but is not an MLflow tracking server ({err}); give the "
                         f"address `mlflow server` listens on") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _unauthenticated(uri: str, option: str) -> str:
    given = [k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
             if os.environ.get(k)]
    if given:
        return (f"{option} {uri}: the MLflow server refuses the credentials in {' and '.join(given)} (HTTP 401); "
                f"set the right MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    return (f"{option} {uri}: the MLflow server asks for a login (HTTP 401); set MLFLOW_TRACKING_USERNAME and "
            f"MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")


def _connection_reason(text: str) -> str:
    for needle in ("Connection refused", "Name or service not known", "No route to host", "Connection reset"):
        if needle.lower() in text.lower():
            return needle.lower()
    return "no connection"


def ui_command(uri: str, port: int = 5000) -> str:
    """The shell command that serves the MLflow UI on tracking store `uri`, runnable as printed from any folder:
    the `mlflow` executable beside the running Python (a checkout's .venv/bin/mlflow, which is not on PATH unless
    the environment is activated), else `<python> -m mlflow`; every path quoted for a POSIX shell."""
    import shlex
    import sys

    exe = Path(sys.executable).parent / "mlflow"
    prog = [str(exe)] if exe.is_file() and os.access(exe, os.X_OK) else [sys.executable, "-m", "mlflow"]
    return shlex.join([*prog, "ui", "--backend-store-uri", uri, "--port", str(port)])


# --------------------------------------------------------------------------- the tracker

class Tracker:
    """One tracking store, built once from its URI; every stage logs, registers and reads runs through it.

    MLflow's fluent API (`mlflow.start_run`, `log_model`), which `RunLogger` needs for system metrics and logged
    models, reads a process-wide tracking URI: it is set once here, when the Tracker is built."""

    def __init__(self, uri: str):
        import mlflow

        self.uri = uri
        self._use()
        self.client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)

    def _use(self) -> None:
        """Point MLflow's process-wide URIs at this store, before a fluent call (`mlflow.register_model`,
        `get_model_info`) that reads them: another Tracker built since may have pointed them elsewhere."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)

    @classmethod
    def open(cls, uri: str | None, option: str = "--tracking-uri", timeout: float = PROBE_TIMEOUT_S) -> "Tracker":
        """The tracker of a stage that is about to start: `uri` checked (`check_uri`: a SQLite file is created or
        read once, under the lock `<db>.lock`) before anything runs."""
        return cls(check_uri(uri, option, timeout))

    @classmethod
    def at(cls, uri: "Tracker | str | None") -> "Tracker":
        """The tracker of a URI already checked (a Ray worker, a reader): `resolve_uri`, no probe. A Tracker is
        returned as it is, so a function may take either and build nothing twice."""
        return uri if isinstance(uri, Tracker) else cls(resolve_uri(uri))

    # runs
    def create_run(self, experiment: str, run_name: str, tags: dict[str, str] | None = None, *,
                   command: str | None = None) -> str:
        """A new run (left open for the training to log into); returns its id. The run carries where it came
        from (`provenance_tags`: git commit, user, entry point); `tags` are added to (and override) those.

        `command`: the genesis command that makes this run (`genesis transfer`, `genesis finetune`), named by the
        stage itself. Without it the entry point is read from the process ($GENESIS_ENTRY_POINT or argv), which
        in a Ray worker, or in a process that ran other stages before (the demo, `genesis reproduce`), names
        whatever set it last."""
        exp_id = self.ensure_experiment(experiment)
        run = self.client.create_run(exp_id, run_name=run_name, tags={**provenance_tags(command), **(tags or {})})
        return run.info.run_id

    def ensure_experiment(self, name: str) -> str:
        """The id of experiment `name`, created when missing (its artifacts beside the database:
        `artifact_location`; two processes creating it at once: the second uses the first's), and marked as model
        training (`EXPERIMENT_KIND_TAG`) - also an experiment made before this version, or by someone else, the
        first time the pipeline uses it."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                exp_id = self.client.create_experiment(name, artifact_location=artifact_location(self.uri),
                                                       tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
                return exp_id
            except MlflowException:
                exp = self.client.get_experiment_by_name(name)  # created meanwhile by another process: use it
                if exp is None:
                    raise
        if exp.tags.get(EXPERIMENT_KIND_TAG, "") in _UNDECIDED_KINDS:
            try:
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
            except MlflowException:  # a server that lets this user run but not edit the experiment: only the
                pass                 # UI's label is lost, the run is not
        return exp.experiment_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        """Params of a run that is not this process's active one."""
        for k, v in params.items():
            self.client.log_param(run_id, k, str(v))

    def logger(self, run_id: str, system_metrics: bool = True) -> "RunLogger":
        """Logging into run `run_id` as this process's active run (resumable by id after a restart)."""
        return RunLogger(self.uri, run_id, system_metrics=system_metrics)

    def mark_failed(self, run_id: str, reason: str | None = None, status: str = "FAILED") -> None:
        """End a run that is still RUNNING as FAILED (or KILLED); `reason` goes into its `error` tag, which the
        transfer table shows beside the failed fine-tuning. A run that did not finish leaves no model behind:
        its logged models still PENDING are marked FAILED, and the versions registered from it are deleted (a
        version registered just before the run failed, e.g. on a full disk, would otherwise be `latest`)."""
        if reason:
            self.client.set_tag(run_id, "error", reason[:5000])
        run = self.client.get_run(run_id)
        if run.info.status == "RUNNING":
            self.client.set_terminated(run_id, status=status)
        if run.info.status != "FINISHED":
            self.drop_models(run_id, run.info.experiment_id)

    def drop_models(self, run_id: str, experiment_id: str | None = None) -> list[str]:
        """Mark the run's PENDING logged models FAILED and delete the model versions registered from it; returns
        the deleted versions as `name/version`."""
        from mlflow.entities import LoggedModelStatus

        experiment_id = experiment_id or self.client.get_run(run_id).info.experiment_id
        for model in self.client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"):
            if model.status == LoggedModelStatus.PENDING:
                self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        dropped = []
        for version in self.client.search_model_versions(f"run_id = '{run_id}'"):
            self.client.delete_model_version(version.name, version.version)
            dropped.append(f"{version.name}/{version.version}")
        return dropped

    def run(self, run_id: str):
        """MLflow's Run: `.info` (status, experiment id, times) and `.data` (params, metrics, tags)."""
        return self.client.get_run(run_id)

    def run_status(self, run_id: str) -> str:
        """RUNNING, FINISHED, FAILED or KILLED."""
        return self.client.get_run(run_id).info.status

    def run_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of each metric of a run."""
        return dict(self.client.get_run(run_id).data.metrics)

    def experiment_id(self, name: str) -> str | None:
        exp = self.client.get_experiment_by_name(name)
        return exp.experiment_id if exp else None

    def search_runs(self, experiment_ids: list[str], filter_string: str = "", **kwargs):
        """All runs matching `filter_string`, every page."""
        runs, token = [], None
        while True:
            page = self.client.search_runs(experiment_ids, filter_string=filter_string, page_token=token, **kwargs)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def ui_base(self) -> str:
        """Where the MLflow UI of this store is: the server of an http(s) URI, else the `mlflow ui` that
        `ui_command` starts."""
        return self.uri.rstrip("/") if self.uri.startswith("http") else "http://127.0.0.1:5000"

    def experiment_url(self, experiment_id: str) -> str:
        """The experiment's runs table in the MLflow UI (in its model-training view: `UI_VIEW_QUERY`)."""
        return f"{self.ui_base()}/#/experiments/{experiment_id}/runs?{UI_VIEW_QUERY}"

    def run_url(self, run_id: str) -> str:
        """The run's page in the MLflow UI (in its model-training view: `UI_VIEW_QUERY`)."""
        run = self.client.get_run(run_id)
        return f"{self.ui_base()}/#/experiments/{run.info.experiment_id}/runs/{run_id}?{UI_VIEW_QUERY}"

    def ui_hint(self, run_id: str) -> str:
        """The run's URL in the MLflow UI, its experiment's runs table, and (a local store) the command that serves
        that UI, runnable as printed (`ui_command`)."""
        run = self.client.get_run(run_id)
        lines = [self.run_url(run_id), f"  its experiment's runs: {self.experiment_url(run.info.experiment_id)}"]
        if not self.uri.startswith("http"):
            lines.append(f"  open the UI with: {ui_command(self.uri)}")
        return "\n".join(lines)

    def set_description(self, run_id: str, markdown: str) -> None:
        """The run's description (`RUN_DESCRIPTION_TAG`), which the UI renders as Markdown on the run's page."""
        self.client.set_tag(run_id, RUN_DESCRIPTION_TAG, markdown)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Metrics of a run that is not this process's active one, in one request (NaN values are left out)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """The file `path` as an artifact of a run (at the run's artifact root unless `artifact_path`)."""
        self.client.log_artifact(run_id, str(path), artifact_path=artifact_path)

    # artifacts and models
    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """`text` as the artifact `artifact_file` (e.g. `task/<name>.yaml`) of a run that is not this process's
        active one."""
        self.client.log_text(run_id, text, artifact_file)

    def read_text(self, run_id: str, artifact_file: str) -> str | None:
        """The text of a run's artifact `artifact_file`; None when the run has no such artifact."""
        import tempfile

        import mlflow.artifacts

        folder = str(Path(artifact_file).parent) if Path(artifact_file).parent != Path(".") else None
        try:
            listed = {f.path for f in self.client.list_artifacts(run_id, folder)}
        except Exception:  # noqa: BLE001 - a run whose artifact store cannot be listed has none to read
            return None
        if artifact_file not in listed:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_file, dst_path=tmp,
                                                        tracking_uri=self.uri)
            return Path(local).read_text(encoding="utf-8")

    def download_artifacts(self, artifact_uri: str, dst_path: str) -> str:
        """A local copy of `artifact_uri` (runs:/, models:/, a server's artifacts) under `dst_path`."""
        import mlflow.artifacts

        self._use()  # models:/ resolves against the process-wide registry URI
        return mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=dst_path,
                                                   tracking_uri=self.uri)

    def logged_width(self, model_uri: str) -> int | None:
        """The U-Net width (`base_channels`) that the safe format wrote into a logged model's metadata
        (`genesis_width`, read from its MLmodel: nothing unpickled); None when the model does not say."""
        from mlflow.models import get_model_info

        self._use()
        try:
            return int(get_model_info(model_uri).metadata["genesis_width"])
        except Exception:  # noqa: BLE001 - another format, or a model logged without it: the width stays unknown
            return None

    def search_model_versions(self, filter_string: str):
        return self.client.search_model_versions(filter_string)

    def register_model(self, model_uri: str, name: str, metric: float | None = None, lower_is_better: bool = True,
                       tags: dict | None = None, aliases: tuple[str, ...] = ()):
        """Register `model_uri` as a new version of `name` with `tags` (and `width`: the U-Net's base channels,
        read from the model when not given), and alias it with each of `aliases`.

        `best` compares validation losses, and a loss only means something against other versions trained on the
        same data with the same recipe and width: another patch store or preset scores its own validation cubes.
        So a version with a `metric` takes:
        - `best-<store key 8>-<preset>-w<width>` (`best_alias_of`) when it beats that alias's holder, or none
          holds it: the best version of its own (patch store, preset, width) group;
        - `best` when no version holds it yet, or when the holder is of the same group and the new loss beats it.
          `best` never moves to another store, preset or width: a version of another group is picked by its group
          alias or its number (`models:/NAME@best-1a2b3c4d-tiny-w4`, `models:/NAME/7`).
        A version whose store or preset is unknown takes `best` only when none holds it.

        MLflow reserves the alias name `latest`: the newest version is `models:/NAME/latest`, which MLflow
        resolves itself, so no alias is needed (or allowed) for it.
        """
        import mlflow

        client = self.client
        self._use()
        version = mlflow.register_model(model_uri, name)
        tags = dict(tags or {})
        if "width" not in tags:
            width = self.logged_width(model_uri)
            if width is not None:
                tags["width"] = width
        group = _group({k: str(v) for k, v in tags.items()})
        if metric is not None and group is not None:
            tags["best_alias"] = best_alias_of(*group)
        if metric is not None:
            tags["val_loss"] = metric
        for k, v in tags.items():
            client.set_model_version_tag(name, version.version, k, str(v))
        for alias in aliases:
            client.set_registered_model_alias(name, alias, version.version)
        if metric is not None:
            if group is not None and _improves(client, name, tags["best_alias"], metric, lower_is_better)[0]:
                client.set_registered_model_alias(name, tags["best_alias"], version.version)
            better, holder = _improves(client, name, BEST_ALIAS, metric, lower_is_better)
            same_group = holder is not None and group is not None and _group(holder.tags) == group
            if holder is None or (better and same_group):
                client.set_registered_model_alias(name, BEST_ALIAS, version.version)
        return version

    def register_finetuned(self, model_uri: str, name: str, tags: dict | None = None):
        """Register a fine-tuned model as a new version of `name`, with `tags` (the run's test metrics, init,
        preset, ...) on the version. No alias is set (`latest` is reserved by MLflow: use `models:/NAME/latest`);
        choosing a `best` version by test metrics is left to the user."""
        import mlflow

        self._use()
        version = mlflow.register_model(model_uri, name)
        for k, v in (tags or {}).items():
            self.client.set_model_version_tag(name, version.version, k, str(v))
        return version
