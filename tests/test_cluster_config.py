"""The deployment files: valid for Ray's cluster launcher and KubeRay, able to run what configs/cluster.yaml
asks for, on shared storage, and secure by default."""

import json
import math
import os
import re
import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from hvd.cli import parse_args
from hvd.config import Config, config_from_yaml, load_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "ray_cluster.yaml"
KUBERAY = ROOT / "cluster" / "kuberay"
SHARED_FS = "/mnt/hvd"
OBJECT_STORAGE = ("s3://", "gs://", "abfss://")


@dataclass(frozen=True)
class NodeType:
    resources: dict[str, float]  # what one node offers to Ray's scheduler, CPU and GPU included
    max_nodes: int


def launcher_layout() -> dict[str, NodeType]:
    config = yaml.safe_load(LAUNCHER.read_text())
    return {
        name: NodeType(
            {key: float(value) for key, value in spec["resources"].items()},
            1 if name == config["head_node_type"] else spec["max_workers"],
        )
        for name, spec in config["available_node_types"].items()
    }


def kuberay_documents(kind: str) -> list[dict]:
    return [doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc["kind"] == kind]


def _quantity(value: str | int) -> float:
    value = str(value)
    return int(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _group_resources(group: dict) -> dict[str, float]:
    """What `ray start` gets in a KubeRay pod: CPUs and GPUs from the container's limits unless
    rayStartParams say otherwise, custom resources from rayStartParams' JSON (a quoted JSON string)."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    params = group.get("rayStartParams", {})
    resources = {"CPU": _quantity(params.get("num-cpus", limits["cpu"]))}
    if "nvidia.com/gpu" in limits:
        resources["GPU"] = _quantity(limits["nvidia.com/gpu"])
    if "resources" in params:
        resources |= json.loads(json.loads(params["resources"]))
    return resources


def kuberay_layout() -> dict[str, NodeType]:
    (cluster,) = kuberay_documents("RayCluster")
    spec = cluster["spec"]
    layout = {"head": NodeType(_group_resources(spec["headGroupSpec"]), 1)}
    for group in spec["workerGroupSpecs"]:
        layout[group["groupName"]] = NodeType(_group_resources(group), group["maxReplicas"])
    return layout


LAYOUTS = {"ray_cluster.yaml": launcher_layout, "kuberay": kuberay_layout}


@pytest.fixture
def cluster_cfg(monkeypatch) -> Config:
    monkeypatch.setenv("HVD_BUCKET", "s3://test-bucket/hvd")  # cluster/cluster.env sets it on every node
    return load_config(ROOT / "configs" / "cluster.yaml")


def _fits(offer: dict[str, float], ask: dict[str, float]) -> int:
    """How many tasks asking `ask` one node offering `offer` runs at once."""
    return min((math.floor(offer.get(key, 0.0) / amount) for key, amount in ask.items() if amount > 0), default=0)


def test_ray_cluster_yaml_is_what_the_launcher_accepts():
    config = yaml.safe_load(LAUNCHER.read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # the launcher's own checks on top: node types, bounds

    config["available_node_types"]["gpu"]["min_worker"] = 1  # a typo `ray up` would refuse
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(config, schema)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_node_types_run_what_configs_cluster_yaml_asks_for(layout, cluster_cfg):
    nodes = LAYOUTS[layout]()
    data, train = cluster_cfg.data, cluster_cfg.train

    decode_ask = {"CPU": data.decode_cpus, **data.decode_resources}
    decoders = {name: node for name, node in nodes.items() if _fits(node.resources, decode_ask)}
    assert decoders, f"{layout}: no node type takes a decode task {decode_ask}"
    assert sum(node.max_nodes * _fits(node.resources, decode_ask) for node in decoders.values()) >= data.decode_concurrency

    worker_ask = {"CPU": train.cpus_per_worker, **({"GPU": 1.0} if train.use_gpu else {}), **train.worker_resources}
    trainers = {name: node for name, node in nodes.items() if _fits(node.resources, worker_ask)}
    assert trainers, f"{layout}: no node type takes a training worker {worker_ask}"
    per_node = 1 if train.placement_strategy == "STRICT_SPREAD" else None
    capacity = sum(node.max_nodes * (per_node or _fits(node.resources, worker_ask)) for node in trainers.values())
    assert capacity >= train.num_workers

    assert not decoders.keys() & trainers.keys(), "custom resources keep decoding off the GPU nodes"
    assert nodes["head"].resources["CPU"] == 0, "the head runs no tasks"


def test_cluster_state_lives_where_every_node_sees_it(cluster_cfg):
    assert cluster_cfg.train.storage_path == "s3://test-bucket/hvd/checkpoints"
    assert cluster_cfg.train.storage_path.startswith(OBJECT_STORAGE)
    for path in (cluster_cfg.synthetic.out, cluster_cfg.data.shards, cluster_cfg.pretrain.out):
        assert path.startswith(SHARED_FS + "/"), path

    launcher = yaml.safe_load(LAUNCHER.read_text())
    assert f"-v {SHARED_FS}:{SHARED_FS}" in launcher["docker"]["run_options"]
    assert any(SHARED_FS in command for command in launcher["initialization_commands"])
    (cluster,) = kuberay_documents("RayCluster")
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        mounts = group["template"]["spec"]["containers"][0]["volumeMounts"]
        assert SHARED_FS in {mount["mountPath"] for mount in mounts}


def test_every_node_type_resolves_relative_paths_on_shared_storage():
    """HVD_ROOT on every node: a job's relative paths then name one shared folder, not each node's own copy."""
    launcher = yaml.safe_load(LAUNCHER.read_text())
    starts = [c for c in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(f"HVD_ROOT={SHARED_FS} " in command for command in starts)
    for name, spec in launcher["available_node_types"].items():  # no node type starts Ray its own way
        assert not {"head_start_ray_commands", "worker_start_ray_commands"} & spec.keys(), name

    for cluster in [*kuberay_documents("RayCluster"), *(job["spec"]["rayClusterSpec"] for job in kuberay_documents("RayJob"))]:
        spec = cluster.get("spec", cluster)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            (container,) = group["template"]["spec"]["containers"]
            env = {var["name"]: var.get("value") for var in container["env"]}
            assert env.get("HVD_ROOT") == SHARED_FS, group.get("groupName", "head")

    local = (ROOT / "cluster" / "local.sh").read_text()
    assert '"HVD_ROOT=$(cat "$STATE/hvd_root")"' in local  # start_node: the head and the second node
    assert "export HVD_ROOT=" in local


def test_kuberay_manifests_are_one_layout_running_this_project(monkeypatch):
    monkeypatch.setenv("HVD_BUCKET", "s3://test-bucket/hvd")
    (cluster,) = kuberay_documents("RayCluster")
    (job,) = kuberay_documents("RayJob")
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert cluster["spec"]["rayVersion"] == ray.__version__

    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:2] == ["python", "pipelines/train.py"]
    args = [str(ROOT / arg) if arg.endswith(".yaml") else arg for arg in command[2:]]  # relative to the project
    cfg, _ = parse_args("train", ("run", "data", "train"), args)
    assert cfg.train.use_gpu and cfg.data.decode_resources

    ray_image = rf"rayproject/ray:{re.escape(ray.__version__)}-py311-(cpu|gpu)"  # the Ray this project pins
    launcher_images = re.findall(r"image: (\S+)", LAUNCHER.read_text())
    dockerfile_base = re.search(r"^FROM (\S+)", (ROOT / "cluster" / "Dockerfile").read_text(), re.M).group(1)
    for image in [*launcher_images, dockerfile_base]:
        assert re.fullmatch(ray_image, image), image


def test_nothing_listens_beyond_the_cluster_and_token_auth_stays_on():
    files = [LAUNCHER, *sorted(KUBERAY.glob("*.yaml")), ROOT / "cluster" / "local.sh", ROOT / "cluster" / "Dockerfile"]
    for path in files:
        text = path.read_text()
        assert "0.0.0.0" not in text and "RAY_AUTH_MODE=disabled" not in text, path

    launcher = yaml.safe_load(LAUNCHER.read_text())
    starts = [c for c in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in command for command in starts)
    assert all("RAY_enable_metrics_collection=0" in command for command in starts)  # no Prometheus ports
    assert any("--dashboard-host=127.0.0.1" in command for command in launcher["head_start_ray_commands"])
    (mlflow,) = [c for c in launcher["head_start_ray_commands"] if "mlflow server" in c]
    assert "--host $HEAD_IP" in mlflow and "HEAD_IP=$(hostname -I" in mlflow  # the private address

    for cluster in [*kuberay_documents("RayCluster"), *(job["spec"]["rayClusterSpec"] for job in kuberay_documents("RayJob"))]:
        spec = cluster.get("spec", cluster)
        assert spec["authOptions"]["mode"] == "token"
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            (container,) = group["template"]["spec"]["containers"]
            assert {"name": "RAY_enable_metrics_collection", "value": "0"} in container["env"]
    assert all(service["spec"]["type"] == "ClusterIP" for service in kuberay_documents("Service"))
    guarded = {policy["spec"]["podSelector"]["matchLabels"].popitem() for policy in kuberay_documents("NetworkPolicy")}
    assert guarded == {("app", "hvd-mlflow"), ("ray.io/is-ray-node", "yes")}

    local = (ROOT / "cluster" / "local.sh").read_text()
    assert "--dashboard-host=127.0.0.1" in local and "server --app-name basic-auth --host 127.0.0.1" in local
    assert "RAY_AUTH_MODE=token" in local and "ray stop" not in local.replace("never `ray stop`", "")


def mlflow_servers() -> dict[str, str]:
    """Every shipped MLflow server's start command, by where it is."""
    launcher = yaml.safe_load(LAUNCHER.read_text())
    (vm,) = [c for c in launcher["head_start_ray_commands"] if "mlflow server" in c]
    (deployment,) = kuberay_documents("Deployment")
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow"]
    local = (ROOT / "cluster" / "local.sh").read_text()
    start = local[local.index("start_mlflow() {"):]
    local = start[: start.index("\n}\n")]
    return {"ray_cluster.yaml": vm, "kuberay": container["args"][0], "local.sh": local}


def test_every_mlflow_server_runs_basic_auth_with_credentials_from_secrets():
    for where, command in mlflow_servers().items():
        assert "server --app-name basic-auth" in command, where
        assert "MLFLOW_AUTH_CONFIG_PATH=" in command, where
        assert "default_permission = NO_PERMISSIONS" in command, where
        assert re.search(r"auth_cache_ttl_seconds = 60", command), where  # see the next test
        # the admin account is the one the clients log in with, read from the environment, never written out
        assert re.search(r'MLFLOW_AUTH_ADMIN_USERNAME="?\$MLFLOW_TRACKING_USERNAME"?', command), where
        assert re.search(r'MLFLOW_AUTH_ADMIN_PASSWORD="?\$MLFLOW_TRACKING_PASSWORD"?', command), where
        assert "MLFLOW_FLASK_SERVER_SECRET_KEY=" in command, where
    for path in [LAUNCHER, *sorted(KUBERAY.glob("*.yaml")), ROOT / "cluster" / "local.sh"]:
        text = path.read_text()
        assert not re.search(r"admin_password\s*=", text) and "password1234" not in text, path  # ini keys
        assert not re.search(r"MLFLOW_(AUTH_ADMIN|TRACKING)_PASSWORD=[^$\"(]", text), path  # no literal value

    lines = (ROOT / "cluster" / "cluster.env.example").read_text().splitlines()
    example = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_DATABASE_URI"} <= set(example)
    assert len(example["MLFLOW_TRACKING_PASSWORD"]) < 12  # a placeholder MLflow refuses: it must be filled in

    # the clients: every launcher node sources cluster.env (set -a), every KubeRay container reads the Secret
    launcher = yaml.safe_load(LAUNCHER.read_text())
    commands = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    starts = [command for command in commands if "ray start" in command]
    assert all("set -a && . ~/hvd-secrets/cluster.env && set +a" in command for command in starts)
    specs = [cluster["spec"] for cluster in kuberay_documents("RayCluster")]
    specs += [job["spec"]["rayClusterSpec"] for job in kuberay_documents("RayJob")]
    for spec in specs:
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            (container,) = group["template"]["spec"]["containers"]
            env = {var["name"]: var.get("valueFrom") for var in container["env"]}
            for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert env[key] == {"secretKeyRef": {"name": "hvd-cluster", "key": key}}, group
    (deployment,) = kuberay_documents("Deployment")
    (server,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow"]
    assert {"secretRef": {"name": "hvd-cluster"}} in server["envFrom"]
    assert "/health" in " ".join(server["readinessProbe"]["exec"]["command"])  # /health needs no login


def test_every_mlflow_server_starts_without_the_job_runner(monkeypatch):
    """hvd submits no MLflow jobs (GenAI judges, prompt optimisation), so no server starts their runner and its
    huey consumers; the switch is the one MLflow 3.17's `mlflow server` reads, and the value reads as off."""
    from mlflow.environment_variables import MLFLOW_SERVER_ENABLE_JOB_EXECUTION as switch

    for where, command in mlflow_servers().items():
        (value,) = re.findall(rf'{switch.name}="?([^"\s]+)"?', command)
        value = value.removeprefix("${" + switch.name + ":-").removesuffix("}")  # local.sh: the caller may opt in
        monkeypatch.setenv(switch.name, value)
        assert switch.get() is False, where
        assert command.index(switch.name) < re.search(r'mlflow"? server', command).start(), where  # its environment


@pytest.mark.parametrize("where", ["ray_cluster.yaml", "kuberay"])
def test_the_auth_config_the_cloud_servers_write_is_what_mlflow_reads(where, tmp_path, monkeypatch):
    """The printf that writes basic_auth.ini, run as the server's shell runs it, with a database URI holding
    a percent-encoded password (configparser would read a bare % as interpolation)."""
    from mlflow.server.auth.config import read_auth_config

    (write,) = re.findall(r"\(umask 077 && printf .*?> (\S+)\)", mlflow_servers()[where], re.S)
    command = re.search(r"\(umask 077 && printf .*?\)", mlflow_servers()[where], re.S).group(0)
    config = tmp_path / "basic_auth.ini"
    uri = "postgresql://mlflow:p%40ss%25word@db.internal:5432/mlflow_auth"
    subprocess.run(["bash", "-c", command.replace(write, str(config))], check=True,
                   env={"MLFLOW_AUTH_DATABASE_URI": uri, "PATH": "/usr/bin:/bin"})
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(config))
    read = read_auth_config()
    assert (read.database_uri, read.default_permission) == (uri, "NO_PERMISSIONS")
    # a verified password is remembered a minute: without it every request pays a scrypt check
    assert read.auth_cache_ttl_seconds == 60


def test_the_readme_real_cluster_command_keeps_the_recipe():
    """The README's real-data command, as written, run up to `--print-config`: the recipe's sampling, text
    length and learning rates survive, the cluster's layout fills in the rest, paths land under HVD_ROOT."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("ray job submit") and "vit_b32_msrvtt" in line)
    argv = shlex.split(line.split(" -- ", 1)[1])
    assert argv[:2] == ["python", "pipelines/train.py"]
    env = {**os.environ, "HVD_ROOT": "/mnt/hvd", "HVD_BUCKET": "s3://test-bucket/hvd"}
    result = subprocess.run([sys.executable, *argv[1:], "--print-config"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    cfg = config_from_yaml(result.stdout)
    assert (cfg.data.sample_mode, cfg.data.max_words, cfg.data.frame_size) == ("fps", 24, 224)
    assert (cfg.train.lr, cfg.train.backbone_lr, cfg.train.batch_size) == (1e-4, 1e-7, 32)
    assert (cfg.model.preset, cfg.run.name) == ("ViT-B-32", "hvd-vitb32-msrvtt")
    assert (cfg.data.expand_captions, cfg.tracking.model_name) == (True, "hvd-msrvtt")
    assert (cfg.data.manifest, cfg.model.pretrained) == ("/mnt/hvd/data/msrvtt/manifest.jsonl",
                                                        "/mnt/hvd/weights/ViT-B-32.pt")
    assert cfg.data.decode_resources == {"cpu_node": 0.001} and cfg.train.worker_resources == {"train_node": 0.001}
    assert cfg.train.storage_path == "s3://test-bucket/hvd/checkpoints"
    assert "ray" not in result.stderr.lower()
