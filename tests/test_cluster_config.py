"""ray_cluster.yaml checked the way `ray up` checks it, and its node scripts run as Ray's launcher runs them.

Ray has no public dry run of `ray up`, so the file is prepared and validated here as the installed Ray's
launcher does it (`create_or_update_cluster` -> `_bootstrap_config` -> `prepare_config`, `validate_config`),
with Ray's own shipped defaults (ray/autoscaler/local/defaults.yaml) and JSON schema
(ray/autoscaler/ray-schema.json), then the security properties of issue 11 are asserted on the prepared config.
deploy/ray/genesis-env.sh is sourced by real bash, and `ray down`'s `ray stop` is run through the login-shell
wrapper Ray's SSH command runner puts around every node command; only the two programs the
scripts call (`ray`, `python`) are stand-ins that record their arguments, so no Ray, MLflow or Dask is
started (tests/test_dask_tls.py runs the Dask processes those arguments start). The Dask certificates are made
by the real `python -m pipeline.services.dask_tls certs`, as `ray up` makes them on the head.
"""

from __future__ import annotations

import copy
import json
from importlib.resources import files
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "ray_cluster.yaml"
ENV_SH = REPO / "deploy" / "ray" / "genesis-env.sh"
SETUP_SH = REPO / "deploy" / "ray" / "setup-node.sh"
SOURCE_ENV = ". ~/genesis-pipeline/deploy/ray/genesis-env.sh && "


def _load() -> dict:
    return yaml.safe_load(CONFIG.read_text(encoding="utf-8"))


# --- what `ray up` does to the file before launching anything (mirrors Ray 2.60's autoscaler) ------------

LOCAL_NODE_TYPE = "local.cluster.node"  # the one node type Ray gives an on-premise (provider: local) cluster


def prepare_config(config: dict) -> dict:
    """The config as `ray up` prepares a manually managed on-premise cluster's (head_ip + worker_ips):
    Ray's `prepare_config` -> `prepare_local`/`prepare_manual` (one node type, min/max workers capped at the
    number of worker IPs), `fillout_defaults` (the provider's shipped defaults.yaml under the file's keys),
    `merge_setup_commands` and `fill_node_type_min_max_workers`. Only that path is mirrored: anything else fails."""
    config = copy.deepcopy(config)
    provider = config["provider"]
    assert provider["type"] == "local" and "coordinator_address" not in provider, provider
    for field in ("head_node", "worker_nodes", "available_node_types"):
        if config.get(field):
            raise ValueError(f"The field {field} is not supported for on-premise clusters.")
    num_ips = len(provider["worker_ips"])
    max_workers = config.setdefault("max_workers", num_ips)
    node_type = {"node_config": {}, "resources": {},
                 "min_workers": min(config.pop("min_workers", num_ips), num_ips),
                 "max_workers": min(max_workers, num_ips)}
    config["max_workers"] = min(max_workers, num_ips)
    config["available_node_types"] = {LOCAL_NODE_TYPE: node_type}
    config["head_node_type"] = LOCAL_NODE_TYPE

    merged = copy.deepcopy({**yaml.safe_load(_ray_data("ray.autoscaler.local", "defaults.yaml")), **config})
    merged["auth"] = merged.get("auth", {})
    for legacy in ("head_node", "worker_nodes"):  # empty deprecated fields are dropped
        if legacy in merged and not merged[legacy]:
            del merged[legacy]
    merged["head_setup_commands"] = merged["setup_commands"] + merged["head_setup_commands"]
    merged["worker_setup_commands"] = merged["setup_commands"] + merged["worker_setup_commands"]
    return merged


def validate_config(config: dict) -> None:
    """Ray's `validate_config`: the prepared config against the installed Ray's JSON schema (raises
    jsonschema.ValidationError), then its own checks on what the schema cannot say."""
    jsonschema.validate(config, json.loads(_ray_data("ray.autoscaler", "ray-schema.json")))
    if "cluster_synced_files" not in config:  # Ray's "prepared by an older Ray" check
        raise RuntimeError("Missing 'cluster_synced_files' field in the cluster configuration.")
    if config["head_node_type"] not in config["available_node_types"]:
        raise ValueError("`head_node_type` must be one of `available_node_types`.")
    if sum(t.get("min_workers", 0) for t in config["available_node_types"].values()) > config["max_workers"]:
        raise ValueError("The specified global `max_workers` is smaller than the sum of `min_workers`.")


def _ray_data(package: str, name: str) -> str:
    """A data file shipped inside the installed ray package."""
    return (files(package) / name).read_text(encoding="utf-8")


def _with_interactive(cmd: str) -> list[str]:
    """The argv Ray's SSH command runner runs a node command as (Ray 2.60's command_runner `_with_interactive`):
    an interactive login bash that sources ~/.bashrc first, so genesis-env.sh's hook there defines `ray stop`."""
    force_interactive = f"source ~/.bashrc; export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore && ({cmd})"
    return ["bash", "--login", "-c", "-i", shlex.quote(force_interactive)]


@pytest.fixture(scope="module")
def prepared() -> dict:
    config = prepare_config(copy.deepcopy(_load()))
    validate_config(config)
    return config


def _commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in config.get(k) or []]


def _argv(command: str, program: str) -> list[str]:
    """The arguments of `program ...` in a command line (after the `. genesis-env.sh &&` prefix)."""
    words = shlex.split(command)
    i = words.index(program)
    return words[i:]


def test_ray_launcher_accepts_the_file_and_would_have_rejected_the_old_one(prepared):
    assert prepared["provider"]["type"] == "local"
    assert prepared["cluster_synced_files"]  # validate_config's own "prepared by this Ray" check passed
    # The old file's `--resources='{"genesis_trial": 100}'` in a plain YAML scalar parsed as a mapping:
    # Ray's schema rejects it, which this test now catches before `ray up` does.
    broken = copy.deepcopy(_load())
    broken["head_start_ray_commands"][-1] = yaml.safe_load(
        "- ray start --head --resources='{\"genesis_trial\": 100}'")[0]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_nothing_binds_to_all_interfaces_and_dask_is_tls_only(prepared):
    commands = _commands(prepared)
    for c in commands:
        assert "0.0.0.0" not in c, c
        assert "nohup" not in c and "&" not in c.replace("&&", ""), f"unsupervised background process: {c}"
        # Dask starts only through pipeline.services.dask_tls (TLS, private address, pid file), never a bare CLI
        assert "dask scheduler" not in c and "dask worker" not in c and "dask-scheduler" not in c, c
        assert "tcp://" not in c, c
    env = ENV_SH.read_text(encoding="utf-8")
    assert "0.0.0.0" not in env and "tcp://" not in env
    text = CONFIG.read_text(encoding="utf-8")
    assert "DASK:" not in text and "tcp://HEAD" not in text
    header = text.split("cluster_name:")[0]
    assert "--dask-scheduler tls://HEAD_IP:8786" in header  # the line users copy


def test_head_and_worker_start_with_token_auth_and_declared_resources(prepared):
    head = prepared["head_start_ray_commands"]
    start = [c for c in head if "ray start" in c]
    assert len(start) == 1 and all(c.startswith(SOURCE_ENV) for c in head)
    argv = _argv(start[0], "ray")
    assert "--head" in argv and "--autoscaling-config=~/ray_bootstrap_config.yaml" in argv
    assert "--dashboard-host=127.0.0.1" in argv
    assert "--node-ip-address=$GENESIS_HEAD_IP" in argv and "--num-gpus=0" in argv
    resources = json.loads(next(a for a in argv if a.startswith("--resources=")).split("=", 1)[1])
    assert resources == {"genesis_trial": 100}
    # MLflow is started (and its credentials written) before Ray, so the first worker sync finds them; the Dask
    # scheduler too, so it is up before the autoscaler starts the first worker's Dask workers.
    assert head.index(SOURCE_ENV + "genesis_start_services") < head.index(start[0])
    assert head.index(SOURCE_ENV + "genesis_start_dask_scheduler") < head.index(start[0])
    assert head[0] == SOURCE_ENV + "ray stop"  # stops the previous MLflow and Dask scheduler first

    worker = prepared["worker_start_ray_commands"]
    assert all(c.startswith(SOURCE_ENV) for c in worker)
    wargv = _argv(next(c for c in worker if "ray start" in c), "ray")
    assert "--address=$RAY_HEAD_IP:6379" in wargv and "--num-gpus=$(genesis_gpu_count)" in wargv
    assert worker[0] == SOURCE_ENV + "ray stop" and worker[-1] == SOURCE_ENV + "genesis_start_dask_worker"

    env = ENV_SH.read_text(encoding="utf-8")
    assert "export RAY_AUTH_MODE=token" in env
    assert 'export RAY_AUTH_TOKEN_PATH="$GENESIS_STATE/ray-token"' in env


def test_token_and_dask_certificates_generated_on_head_and_distributed(prepared):
    setup = prepared["head_setup_commands"]
    assert SOURCE_ENV + 'python -m pipeline.services ray-token --root "$GENESIS_STATE"' in setup
    assert SOURCE_ENV + "genesis_make_dask_certs" in setup
    assert "~/genesis-state/ray-token" in prepared["cluster_synced_files"]
    assert "~/.mlflow/credentials" in prepared["cluster_synced_files"]
    for name in ("ca.pem", "dask.pem", "dask-key.pem"):  # next to the token, where GENESIS_DASK_TLS_DIR points
        assert f"~/genesis-state/{name}" in prepared["cluster_synced_files"], name
    assert "~/genesis-state/ca-key.pem" not in prepared["cluster_synced_files"]  # no CA key exists to sync
    header = CONFIG.read_text(encoding="utf-8").split("cluster_name:")[0]
    assert "ray rsync-down ray_cluster.yaml '~/genesis-state/ray-token'" in header


def test_file_mounts_ship_the_code_and_one_command_builds_the_env(prepared):
    mounts = prepared["file_mounts"]
    assert all(remote.startswith("~/genesis-pipeline/") for remote in mounts)
    shipped = {Path(local).as_posix().lstrip("./") for local in mounts.values()}
    for needed in ("pipeline", "jobs", "storage_schemas", "deploy", "pyproject.toml", "README.md"):
        assert needed in shipped, needed
    for remote, local in mounts.items():
        assert (REPO / local).exists(), local
        assert remote == "~/genesis-pipeline/" + Path(local).as_posix().lstrip("./")
    assert prepared["setup_commands"] == ["bash ~/genesis-pipeline/deploy/ray/setup-node.sh"]
    setup = SETUP_SH.read_text(encoding="utf-8")
    assert 'pip install -q -r "$lock"' in setup and "deploy/requirements.lock" in setup
    lock = (REPO / "deploy" / "requirements.lock").read_text(encoding="utf-8")
    for pin in ("ray==2.60.0", "mlflow==3.17.2", "torch==2.13.0", "simpleitk=="):
        assert pin in lock.lower(), pin
    for script in (ENV_SH, SETUP_SH):
        subprocess.run(["bash", "-n", str(script)], check=True)


# --- the node scripts, run by bash as Ray's launcher runs them -------------------------------------------

RECORDER = """#!/bin/sh
echo "$(basename "$0") $*" >> "$HOME/calls.log"
if [ "$1 $2 $3" = "-m pipeline.services start-mlflow" ]; then
    printf 'pw-%s' 0123456789abcdef > "$HOME/genesis-state/mlflow-admin-password"
fi
"""


@pytest.fixture
def node_home(tmp_path, prepared) -> Path:
    """A node's $HOME: the checkout where file_mounts put it, what `ray up` copies to the head, stand-ins
    for the venv's `ray` and `python`."""
    home = tmp_path / "home"
    (home / "genesis-venv" / "bin").mkdir(parents=True)
    (home / "genesis-state").mkdir()
    (home / "genesis-pipeline").symlink_to(REPO)
    (home / "ray_bootstrap_config.yaml").write_text(json.dumps(prepared), encoding="utf-8")
    for name in ("ray", "python"):
        p = home / "genesis-venv" / "bin" / name
        p.write_text(RECORDER, encoding="utf-8")
        p.chmod(0o755)
    return home


def _bash(home: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    base = {"HOME": str(home), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "GENESIS_SHARED": str(home / "shared"), "LC_ALL": "C"}
    return subprocess.run(["bash", "-c", script], env={**base, **env}, capture_output=True,
                          encoding="utf-8", stdin=subprocess.DEVNULL)


def _calls(home: Path) -> list[str]:
    log = home / "calls.log"
    return log.read_text(encoding="utf-8").splitlines() if log.exists() else []


def test_env_reads_the_head_address_from_the_launchers_copy_of_the_yaml(node_home, prepared):
    r = _bash(node_home, '. ~/genesis-pipeline/deploy/ray/genesis-env.sh; '
                         'printf "%s\\n" "$GENESIS_HEAD_IP" "$RAY_AUTH_MODE" "$RAY_AUTH_TOKEN_PATH" '
                         '"$MLFLOW_TRACKING_URI" "${PATH%%:*}" "$(type -t ray)" "$GENESIS_DASK_TLS_DIR" '
                         '"$GENESIS_DASK_SCHEDULER"')
    assert r.returncode == 0, r.stderr
    head_ip = prepared["provider"]["head_ip"]
    assert r.stdout.splitlines() == [head_ip, "token", f"{node_home}/genesis-state/ray-token",
                                     f"http://{head_ip}:5000", f"{node_home}/genesis-venv/bin", "function",
                                     f"{node_home}/genesis-state", f"tls://{head_ip}:8786"]
    r = _bash(node_home, '. ~/genesis-pipeline/deploy/ray/genesis-env.sh; echo "$GENESIS_HEAD_IP"',
              RAY_HEAD_IP="10.9.8.7")  # on a worker the autoscaler sets it
    assert r.stdout.strip() == "10.9.8.7"


def test_start_services_binds_mlflow_to_the_private_address_with_auth_inputs(node_home, prepared):
    r = _bash(node_home, ". ~/genesis-pipeline/deploy/ray/genesis-env.sh && genesis_start_services")
    assert r.returncode == 0, r.stderr
    (call,) = _calls(node_home)
    argv = shlex.split(call)
    assert argv[:4] == ["python", "-m", "pipeline.services", "start-mlflow"]
    opts = dict(zip(argv[4::2], argv[5::2]))
    head_ip = prepared["provider"]["head_ip"]
    assert opts["--host"] == head_ip and opts["--port"] == "5000"
    assert opts["--root"] == f"{node_home}/genesis-state"
    assert opts["--backend-store-uri"] == f"sqlite:///{node_home}/genesis-state/mlflow.db"
    assert opts["--artifacts-destination"] == f"{node_home}/shared/mlflow/artifacts"
    assert opts["--allowed-hosts"].split(",") == [f"{head_ip}:5000", "localhost:5000", "127.0.0.1:5000"]
    creds = node_home / ".mlflow" / "credentials"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert creds.read_text(encoding="utf-8") == (
        "[mlflow]\nmlflow_tracking_username = admin\nmlflow_tracking_password = pw-0123456789abcdef\n")

    (node_home / "ray_bootstrap_config.yaml").unlink()  # no head address: refuse, start nothing
    (node_home / "calls.log").unlink()
    r = _bash(node_home, ". ~/genesis-pipeline/deploy/ray/genesis-env.sh && genesis_start_services")
    assert r.returncode == 2 and "head's address is unknown" in r.stderr and _calls(node_home) == []


def test_dask_scheduler_and_workers_start_with_tls_on_private_addresses(node_home, prepared):
    head_ip = prepared["provider"]["head_ip"]
    state = f"{node_home}/genesis-state"
    r = _bash(node_home, ". ~/genesis-pipeline/deploy/ray/genesis-env.sh && genesis_start_dask_scheduler")
    assert r.returncode == 0, r.stderr
    assert [shlex.split(c) for c in _calls(node_home)] == [
        ["python", "-m", "pipeline.services.dask_tls", "start-scheduler", "--root", state, "--host", head_ip,
         "--port", "8786"]]

    (node_home / "calls.log").unlink()  # a worker node: the autoscaler sets RAY_HEAD_IP
    r = _bash(node_home, ". ~/genesis-pipeline/deploy/ray/genesis-env.sh && genesis_start_dask_worker",
              RAY_HEAD_IP="10.9.8.7")
    assert r.returncode == 0, r.stderr
    assert [shlex.split(c) for c in _calls(node_home)] == [
        ["python", "-m", "pipeline.services.dask_tls", "start-worker", "--root", state, "--scheduler",
         "tls://10.9.8.7:8786", "--nworkers", "4"]]

    (node_home / "ray_bootstrap_config.yaml").unlink()  # no head address: refuse, start nothing
    (node_home / "calls.log").unlink()
    for fn in ("genesis_make_dask_certs", "genesis_start_dask_scheduler", "genesis_start_dask_worker"):
        r = _bash(node_home, f". ~/genesis-pipeline/deploy/ray/genesis-env.sh && {fn}")
        assert r.returncode == 2 and "head's address is unknown" in r.stderr and _calls(node_home) == [], fn


def test_head_makes_the_dask_certificates_the_workers_are_sent(node_home, prepared):
    """`genesis_make_dask_certs` with the real interpreter: the three files where cluster_synced_files takes
    them from, the key 0600, the head's address in the certificate; a second `ray up` keeps them."""
    from cryptography import x509

    real = node_home / "genesis-venv" / "bin" / "python"
    real.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n', encoding="utf-8")
    make = ". ~/genesis-pipeline/deploy/ray/genesis-env.sh && genesis_make_dask_certs"
    r = _bash(node_home, make)
    assert r.returncode == 0, r.stderr
    assert "generated (absent)" in r.stdout
    synced = [Path(p.replace("~", str(node_home), 1)) for p in prepared["cluster_synced_files"] if p.endswith(".pem")]
    assert sorted(p.name for p in synced) == ["ca.pem", "dask-key.pem", "dask.pem"]
    assert all(p.is_file() for p in synced)
    state = node_home / "genesis-state"
    assert stat.S_IMODE((state / "dask-key.pem").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((state / "dask.pem").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((state / "ca.pem").read_bytes()))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert prepared["provider"]["head_ip"] in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    before = {p.name: p.read_bytes() for p in synced}
    r = _bash(node_home, make)
    assert r.returncode == 0 and "kept" in r.stdout, r.stderr
    assert {p.name: p.read_bytes() for p in synced} == before


def test_ray_down_stops_mlflow_and_dask_then_ray(node_home):
    # setup-node.sh's hook, twice: one line in ~/.bashrc.
    r = _bash(node_home, ". ~/genesis-pipeline/deploy/ray/genesis-env.sh && genesis_install_bashrc_hook && "
                         "genesis_install_bashrc_hook")
    assert r.returncode == 0, r.stderr
    assert (node_home / ".bashrc").read_text(encoding="utf-8").count("genesis-env.sh") == 2  # one line
    assert len((node_home / ".bashrc").read_text(encoding="utf-8").splitlines()) == 1

    # `ray down` = `ray stop` on the head through the launcher's login shell (commands.teardown_cluster).
    argv = _with_interactive("ray stop")
    argv = argv[:-1] + shlex.split(argv[-1])  # the remote shell's unquoting of the ssh argument
    env = {"HOME": str(node_home), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "LC_ALL": "C"}

    state = node_home / "genesis-state"
    (state / "mlflow.pid").write_text("12345", encoding="utf-8")  # the head
    (state / "dask-scheduler.pid").write_text("12346", encoding="utf-8")
    r = subprocess.run(argv, env=env, capture_output=True, encoding="utf-8", stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert _calls(node_home) == [f"python -m pipeline.services stop-mlflow --root {state}",
                                 f"python -m pipeline.services.dask_tls stop --root {state}", "ray stop"]

    (state / "mlflow.pid").unlink()  # a worker node: its Dask workers
    (state / "dask-scheduler.pid").unlink()
    (state / "dask-worker.pid").write_text("12347", encoding="utf-8")
    (node_home / "calls.log").unlink()
    r = subprocess.run(argv, env=env, capture_output=True, encoding="utf-8", stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and _calls(node_home) == [f"python -m pipeline.services.dask_tls stop --root {state}",
                                                       "ray stop"]

    (state / "dask-worker.pid").unlink()  # nothing of ours to stop
    (node_home / "calls.log").unlink()
    r = subprocess.run(argv, env=env, capture_output=True, encoding="utf-8", stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and _calls(node_home) == ["ray stop"]
