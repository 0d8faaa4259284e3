"""deploy/kuberay/: every RayCluster/RayJob spec against KubeRay's CRD schema, the rest checked for consistency.

The CRD schemas are KubeRay's own (storage_schemas/kuberay/, the v1 openAPIV3Schema unchanged). They are
applied as `kubectl apply` applies them (strict field validation, kubectl's default): an unknown field is
an error, so every object schema that lists its properties is closed unless it preserves unknown fields.
"""

from __future__ import annotations

import configparser
import copy
import json
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "deploy" / "kuberay"
SCHEMAS = REPO / "storage_schemas" / "kuberay"
LOCK = REPO / "deploy" / "requirements.lock"
PART_OF = {"app.kubernetes.io/part-of": "genesis-pipeline"}


def _strict(schema):
    """Close every object schema that lists properties (unknown fields are errors, as with kubectl)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft7Validator]:
    out = {}
    for name in ("rayclusters", "rayjobs"):
        doc = json.loads((SCHEMAS / f"{name}.v1.json").read_text(encoding="utf-8"))
        spec = _strict(doc["openAPIV3Schema"]["properties"]["spec"])
        jsonschema.Draft7Validator.check_schema(spec)
        out[doc["kind"]] = jsonschema.Draft7Validator(spec)
    return out


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    out = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert doc and {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            doc["_file"] = path.name
            out.append(doc)
    return out


def _of(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def _one(docs, kind, name):
    (d,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return d


def _errors(validator, spec) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(spec)]


def test_every_ray_manifest_spec_matches_the_kuberay_crd(docs, validators):
    ray_docs = [d for d in docs if d["apiVersion"] == "ray.io/v1"]
    assert {d["kind"] for d in ray_docs} == {"RayCluster", "RayJob"}
    for d in ray_docs:
        assert _errors(validators[d["kind"]], d["spec"]) == [], d["_file"]


def test_the_validation_catches_typos_and_wrong_types(docs, validators):
    cluster = copy.deepcopy(_one(docs, "RayCluster", "genesis")["spec"])
    cluster["workerGroupSpec"] = cluster.pop("workerGroupSpecs")  # a typo kubectl would refuse
    assert any("workerGroupSpec" in e for e in _errors(validators["RayCluster"], cluster))
    cluster = copy.deepcopy(_one(docs, "RayCluster", "genesis")["spec"])
    cluster["workerGroupSpecs"][0]["replicas"] = "2"
    assert any("replicas" in e for e in _errors(validators["RayCluster"], cluster))
    job = copy.deepcopy(_of(docs, "RayJob")[0]["spec"])
    job["runtimeEnv"] = job.pop("runtimeEnvYAML")
    assert _errors(validators["RayJob"], job)


def _containers(pod_template):
    return pod_template["spec"]["containers"]


def _env(container) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def _assert_token_auth(container):
    env = _env(container)
    assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "genesis-ray-token", "key": "auth_token"}


def test_raycluster_cpu_head_gpu_workers_token_auth_shared_volume(docs):
    spec = _one(docs, "RayCluster", "genesis")["spec"]
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert json.loads(json.loads(head["rayStartParams"]["resources"])) == {"genesis_trial": 100}
    (gpu,) = spec["workerGroupSpecs"]
    (worker,) = _containers(gpu["template"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"] == "1"
    (head_c,) = _containers(head["template"])
    assert "nvidia.com/gpu" not in head_c["resources"].get("limits", {})
    assert spec["rayVersion"] == "2.60.0" and "ray==2.60.0" in LOCK.read_text(encoding="utf-8")
    for group in (head, gpu):
        (c,) = _containers(group["template"])
        _assert_token_auth(c)
        assert _env(c)["MLFLOW_TRACKING_URI"]["value"] == "http://genesis-mlflow:5000"
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        shared = next(m for m in c["volumeMounts"] if m["mountPath"] == "/shared")
        assert volumes[shared["name"]]["persistentVolumeClaim"]["claimName"] == "genesis-shared"
        assert group["template"]["metadata"]["labels"].items() >= PART_OF.items()


def test_rayjobs_convert_pretrain_transfer_with_runtime_env(docs):
    from ray.runtime_env import RuntimeEnv

    from pipeline.cli import build_parser

    jobs = {d["metadata"]["name"]: d["spec"] for d in _of(docs, "RayJob")}
    assert set(jobs) == {"genesis-convert", "genesis-pretrain", "genesis-transfer"}
    for name, spec in jobs.items():
        assert spec["clusterSelector"] == {"ray.io/cluster": "genesis"}
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == "/opt/genesis-pipeline"  # where deploy/Dockerfile puts the code
        assert runtime_env["pip"]["packages"] == ["-r ${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/deploy/requirements.lock"]
        # Ray's own validation of the fields, with the image's checkout (this repository) where it checks
        # that working_dir exists; the pip placeholder then names the lock in it.
        RuntimeEnv(**{**runtime_env, "working_dir": str(REPO)})
        assert (REPO / "deploy" / "requirements.lock").is_file()
        words = shlex.split(spec["entrypoint"])
        command = name.removeprefix("genesis-")
        assert words[:2] == ["python", f"jobs/{command}.py"] and (REPO / words[1]).is_file()
        build_parser().parse_args([command, *words[2:]])  # the arguments are the CLI's
        (submitter,) = _containers(spec["submitterPodTemplate"])
        _assert_token_auth(submitter)
        assert spec["submitterPodTemplate"]["metadata"]["labels"].items() >= PART_OF.items()
    assert "/shared" in " ".join(s["entrypoint"] for s in jobs.values())
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    assert "FROM rayproject/ray:2.60.0-py311" in dockerfile and "WORKDIR /opt/genesis-pipeline" in dockerfile
    assert "pip install --no-cache-dir -r /tmp/requirements.lock" in dockerfile


def _pod_templates(docs):
    for d in docs:
        spec = d["spec"] if "spec" in d else {}
        if d["kind"] == "Deployment":
            yield spec["template"]
        elif d["kind"] == "RayCluster":
            yield spec["headGroupSpec"]["template"]
            yield from (g["template"] for g in spec["workerGroupSpecs"])
        elif d["kind"] == "RayJob":
            yield spec["submitterPodTemplate"]


def test_references_between_manifests_resolve(docs):
    secrets = {d["metadata"]["name"]: d for d in _of(docs, "Secret")}
    claims = {d["metadata"]["name"] for d in _of(docs, "PersistentVolumeClaim")}
    maps = {d["metadata"]["name"]: d for d in _of(docs, "ConfigMap")}
    assert claims == {"genesis-shared", "genesis-mlflow-db"}
    assert "ReadWriteMany" in _one(docs, "PersistentVolumeClaim", "genesis-shared")["spec"]["accessModes"]
    images = set()
    for template in _pod_templates(docs):
        for c in _containers(template):
            images.add(c["image"])
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], ref
        for v in template["spec"].get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in v:
                assert v["configMap"]["name"] in maps
    assert images == {"genesis-pipeline:0.1.0"}
    # No secret value is committed: the file documents the keys, the values are generated at install.
    for s in secrets.values():
        assert all(v == "" for v in s["stringData"].values()), s["metadata"]["name"]


def test_mlflow_server_authenticated_and_reachable_only_inside(docs):
    deploy = _one(docs, "Deployment", "genesis-mlflow")
    pod = deploy["spec"]["template"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = _containers(pod)
    script = c["args"][0]
    subprocess.run(["bash", "-n", "-c", script], check=True)
    server = shlex.split(script[script.index("exec mlflow server"):])
    assert "--app-name" in server and server[server.index("--app-name") + 1] == "basic-auth"
    assert server[server.index("--host") + 1] == "0.0.0.0"  # the pod's own interfaces, behind auth + policy
    allowed = server[server.index("--allowed-hosts") + 1].split(",")
    assert "genesis-mlflow:5000" in allowed and "*" not in allowed
    assert server[server.index("--artifacts-destination") + 1].startswith("/shared/")
    assert '-lt 16 ]' in script and "exit 2" in script  # an empty Secret stops it instead of opening it
    env = _env(c)
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "genesis-mlflow-auth"
    ini_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    mount = next(m for m in c["volumeMounts"] if Path(m["mountPath"]) == ini_path.parent)
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    ini = configparser.ConfigParser()
    ini.read_string(_one(docs, "ConfigMap", volume["configMap"]["name"])["data"][ini_path.name])
    assert ini["mlflow"]["database_uri"].startswith("sqlite:////mlflow-db/")
    assert ini["mlflow"]["authorization_function"].endswith("authenticate_request_basic_auth")
    assert "admin_password" not in ini["mlflow"]

    service = _one(docs, "Service", "genesis-mlflow")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in c["ports"]}

    policy = _one(docs, "NetworkPolicy", "genesis-mlflow")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (rule,) = policy["ingress"]
    allowed_from = rule["from"][0]["podSelector"]["matchLabels"]
    assert allowed_from == PART_OF and rule["ports"] == [{"port": 5000}]
    for template in _pod_templates(docs):  # every Ray pod (drivers, train workers) may reach it
        assert template["metadata"]["labels"].items() >= allowed_from.items()


# ---------------------------------------------------------------- the object-storage variant (object-storage/)

OBJECT_STORAGE = MANIFESTS / "object-storage"
BUCKET_SECRET = "genesis-object-storage"


@pytest.fixture(scope="module")
def bucket_docs() -> list[dict]:
    out = []
    for path in sorted(OBJECT_STORAGE.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        assert "/shared" not in text and "genesis-shared" not in text, path  # no shared filesystem anywhere
        for doc in yaml.safe_load_all(text):
            assert doc and {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            doc["_file"] = path.name
            out.append(doc)
    return out


def test_object_storage_variant_matches_the_crds_and_has_no_shared_claim(bucket_docs, validators):
    ray_docs = [d for d in bucket_docs if d["apiVersion"] == "ray.io/v1"]
    assert {d["kind"] for d in ray_docs} == {"RayCluster", "RayJob"}
    for d in ray_docs:
        assert _errors(validators[d["kind"]], d["spec"]) == [], d["_file"]
    claims = _of(bucket_docs, "PersistentVolumeClaim")
    assert [c["metadata"]["name"] for c in claims] == ["genesis-mlflow-db"]  # the MLflow database's own volume
    assert all("ReadWriteMany" not in c["spec"]["accessModes"] for c in claims)
    for template in _pod_templates(bucket_docs):
        for v in template["spec"].get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] == "genesis-mlflow-db"
    # the same objects as the shared-filesystem manifests, so either folder is applied, not both
    assert {d["metadata"]["name"] for d in ray_docs} == {"genesis", "genesis-convert", "genesis-pretrain",
                                                           "genesis-transfer"}


def test_object_storage_credentials_come_from_one_secret_on_the_pods_that_touch_the_bucket(bucket_docs):
    secrets = {d["metadata"]["name"]: d for d in _of(bucket_docs, "Secret")}
    assert set(secrets) == {"genesis-ray-token", "genesis-mlflow-auth", BUCKET_SECRET}
    assert set(secrets[BUCKET_SECRET]["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
    for s in secrets.values():  # no value committed
        assert all(v == "" for v in s["stringData"].values()), s["metadata"]["name"]
    cluster = _one(bucket_docs, "RayCluster", "genesis")["spec"]
    mlflow_pod = _one(bucket_docs, "Deployment", "genesis-mlflow")["spec"]["template"]
    with_bucket = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"]),
                   mlflow_pod]
    for template in with_bucket:
        for c in _containers(template):
            assert c["envFrom"] == [{"secretRef": {"name": BUCKET_SECRET}}], c["name"]
            assert not {n for n in _env(c) if n.startswith("AWS_")}, c["name"]  # the keys only through the Secret
    for job in _of(bucket_docs, "RayJob"):  # the submitter talks to Ray only
        (submitter,) = _containers(job["spec"]["submitterPodTemplate"])
        assert "envFrom" not in submitter and not {n for n in _env(submitter) if n.startswith("AWS_")}
        _assert_token_auth(submitter)
        assert "AWS_" not in job["spec"]["runtimeEnvYAML"]
    for template in _pod_templates(bucket_docs):
        for c in _containers(template):
            assert c["image"] == "genesis-pipeline:0.1.0"
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["key"] in secrets[ref["name"]]["stringData"], ref
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        (c,) = _containers(group["template"])
        _assert_token_auth(c)
        assert _env(c)["MLFLOW_TRACKING_URI"]["value"] == "http://genesis-mlflow:5000"


def _bucket_urls(words: list[str]) -> list[str]:
    return [w for w in words if w.startswith("s3://")]


def test_object_storage_jobs_keep_stores_checkpoints_and_results_in_the_bucket(bucket_docs):
    from pipeline.cli import build_parser

    jobs = {d["metadata"]["name"]: d["spec"] for d in _of(bucket_docs, "RayJob")}
    options = {}
    for name, spec in jobs.items():
        assert spec["clusterSelector"] == {"ray.io/cluster": "genesis"}
        assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/opt/genesis-pipeline"
        command = name.removeprefix("genesis-")
        words = shlex.split(spec["entrypoint"].split("&&")[-1])
        assert words[:2] == ["python", f"jobs/{command}.py"] and (REPO / words[1]).is_file()
        args = build_parser().parse_args([command, *words[2:]])  # the arguments are the CLI's
        options[command] = args
        assert _bucket_urls(words) and all(u.startswith("s3://genesis-data/") for u in _bucket_urls(words))
    assert options["convert"].store.startswith("s3://genesis-data/stores/")
    for command in ("pretrain", "transfer"):
        assert options[command].storage_path == "s3://genesis-data/ray_results"
        patches = options[command].patches
        assert (patches[0] if isinstance(patches, list) else patches).startswith("s3://genesis-data/patch_stores")
    # convert stages its raw scans on the head's scratch volume, where its Dask workers read them
    stage, _ = jobs["genesis-convert"]["entrypoint"].split("&&")
    assert "'/scratch/luna16'" in stage and options["convert"].sources == ["/scratch/luna16"]
    head = _one(bucket_docs, "RayCluster", "genesis")["spec"]["headGroupSpec"]["template"]
    (c,) = _containers(head)
    scratch = next(m for m in c["volumeMounts"] if m["mountPath"] == "/scratch")
    volume = next(v for v in head["spec"]["volumes"] if v["name"] == scratch["name"])
    assert "emptyDir" in volume


def test_object_storage_convert_staging_runs_against_a_real_s3_api(bucket_docs, s3_server, bucket, tmp_path):
    """The staging command of the convert job, run as written (bucket and scratch folder swapped for the test's):
    pyarrow's S3 filesystem with the AWS variables alone copies every source file."""
    import os
    import sys

    spec = _one(bucket_docs, "RayJob", "genesis-convert")["spec"]
    stage = shlex.split(spec["entrypoint"].split("&&")[0])
    assert stage[:2] == ["python", "-c"]
    code = stage[2].replace("s3://genesis-data/", f"s3://{bucket}/").replace("/scratch/", f"{tmp_path}/")
    s3 = s3_server.client()
    files = {"raw/luna16/subset0/1.2.3.mhd": b"ObjectType = Image\n", "raw/luna16/subset0/1.2.3.raw": b"\x00" * 64}
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, timeout=120,
                          encoding="utf-8", errors="replace")
    assert done.returncode == 0, done.stderr
    for key, body in files.items():
        assert (tmp_path / key.removeprefix("raw/")).read_bytes() == body


def test_object_storage_mlflow_proxies_artifacts_to_the_bucket(bucket_docs):
    pod = _one(bucket_docs, "Deployment", "genesis-mlflow")["spec"]["template"]
    (c,) = _containers(pod)
    script = c["args"][0]
    subprocess.run(["bash", "-n", "-c", script], check=True)
    server = shlex.split(script[script.index("exec mlflow server"):])
    assert server[server.index("--app-name") + 1] == "basic-auth"
    assert server[server.index("--artifacts-destination") + 1] == "s3://genesis-data/mlflow"
    assert "--no-serve-artifacts" not in server and "--artifacts-only" not in server
    assert '-lt 16 ]' in script and "exit 2" in script
    endpoint = _env(c)["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]
    assert endpoint == {"name": BUCKET_SECRET, "key": "AWS_ENDPOINT_URL", "optional": True}
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/mlflow-db", "/etc/genesis-mlflow"}
    service = _one(bucket_docs, "Service", "genesis-mlflow")
    assert service["spec"]["type"] == "ClusterIP"
    policy = _one(bucket_docs, "NetworkPolicy", "genesis-mlflow")["spec"]
    assert policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == PART_OF
    for template in _pod_templates(bucket_docs):
        assert template["metadata"]["labels"].items() >= PART_OF.items()
