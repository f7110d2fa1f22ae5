"""cluster.yaml: valid for Ray's own cluster launcher (checked offline), rejected with Ray's or our message
when edited wrongly, and shaped the way the platform needs it (multi-GPU spot workers, an on-demand CPU
head, nothing bound to every interface, no credentials, the project installed with constraints.txt).

Fast and offline: nothing here starts Ray or talks to AWS.
"""

from __future__ import annotations

import copy
import re
import socket
import sys
import tomllib
import traceback
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from histoweak.cluster import ALL_INTERFACES, check_cluster_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
BIND_FLAG = re.compile(r"--(dashboard-host|host|node-ip-address|bind|ip)(?:=|\s+)(\S+)")


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture
def offline(monkeypatch):
    """No network, no AWS credentials, no boto3: validating a config must need none of them."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access while validating a cluster config")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setitem(sys.modules, "boto3", None)  # an import of boto3 now fails
    monkeypatch.setitem(sys.modules, "botocore", None)


def write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def raised_in(exc: BaseException, filename: str, function: str) -> bool:
    """Whether ``exc`` passed through ``function`` of a file ending in ``filename`` (Ray re-raises some errors)."""
    return any(f.filename.endswith(filename) and f.name == function for f in traceback.extract_tb(exc.__traceback__))


def commands(cfg: dict, key: str) -> list[str]:
    return [str(c) for c in cfg.get(key) or []]


# --- cluster.yaml is a valid Ray cluster-launcher config ----------------------------------------------

def test_ray_validates_cluster_yaml_offline(raw, offline):
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    # our node types and commands, not Ray's defaults, are what `ray up` would use
    assert prepared["head_node_type"] == "head"
    assert set(prepared["available_node_types"]) == {"head", "cpu_worker", "gpu_worker"}
    assert prepared["head_start_ray_commands"] == raw["head_start_ray_commands"]
    assert check_cluster_config(CLUSTER_YAML)["cluster_name"] == "histoweak"


# --- wrong edits fail, with Ray's message where Ray checks, with ours where it does not ---------------

@pytest.mark.parametrize("edit, name, key", [
    (lambda c: c.update(worker_count=3), "worker_count", "(top level)"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=1), "min_worker",
     "available_node_types.gpu_worker"),
])
def test_unknown_key_fails_in_rays_schema(raw, offline, tmp_path, edit, name, key):
    cfg = copy.deepcopy(raw)
    edit(cfg)
    with pytest.raises(jsonschema.ValidationError) as ray_error:
        validate_config(prepare_config(copy.deepcopy(cfg)))
    assert raised_in(ray_error.value, "ray/autoscaler/_private/util.py", "validate_config")
    assert f"'{name}' was unexpected" in str(ray_error.value)
    path = write(tmp_path, cfg)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {key}: ") + f".*'{name}' was unexpected"):
        check_cluster_config(path)


def test_docker_without_image_fails_in_rays_docker_check(raw, offline, tmp_path):
    cfg = copy.deepcopy(raw)
    del cfg["docker"]["image"]
    with pytest.raises(AssertionError, match="image") as ray_error:
        prepare_config(copy.deepcopy(cfg))
    assert raised_in(ray_error.value, "ray/autoscaler/_private/docker.py", "validate_docker_config")
    path = write(tmp_path, cfg)
    with pytest.raises(ValueError, match=re.escape(f"{path}: docker: ") + ".*image"):
        check_cluster_config(path)


def test_docker_without_image_or_container_name_passes_ray_but_not_us(raw, offline, tmp_path):
    cfg = copy.deepcopy(raw)
    del cfg["docker"]["image"], cfg["docker"]["container_name"]
    validate_config(prepare_config(copy.deepcopy(cfg)))  # Ray lets it through: setup would run on the bare host
    path = write(tmp_path, cfg)
    with pytest.raises(ValueError, match=re.escape(f"{path}: docker.image: missing")):
        check_cluster_config(path)


def test_min_workers_above_max_workers_passes_ray_but_not_us(raw, offline, tmp_path):
    cfg = copy.deepcopy(raw)
    cfg["available_node_types"]["gpu_worker"].update(min_workers=6, max_workers=4)
    validate_config(prepare_config(copy.deepcopy(cfg)))  # Ray lets it through and would keep at most 4
    path = write(tmp_path, cfg)
    with pytest.raises(ValueError, match=re.escape(f"{path}: available_node_types.gpu_worker.min_workers: 6 is "
                                                   "more than max_workers (4)")):
        check_cluster_config(path)


def _set_dashboard_host(cfg, host):
    cfg["head_start_ray_commands"] = [c.replace("--dashboard-host=127.0.0.1", f"--dashboard-host={host}")
                                      for c in cfg["head_start_ray_commands"]]


def _set_mlflow_host(cfg, host):
    cfg["head_start_ray_commands"] = [c.replace("--host $HEAD_IP", f"--host {host}")
                                      for c in cfg["head_start_ray_commands"]]


@pytest.mark.parametrize("edit, key, flag, why", [
    (lambda c: _set_dashboard_host(c, "0.0.0.0"), "head_start_ray_commands[2]", "--dashboard-host=0.0.0.0", ""),
    (lambda c: _set_mlflow_host(c, "0.0.0.0"), "head_start_ray_commands[1]", "--host=0.0.0.0", ""),
    (lambda c: _set_mlflow_host(c, "::"), "head_start_ray_commands[1]", "--host=::", ""),
    # left out, the head's start commands are Ray's AWS defaults, which bind the dashboard to 0.0.0.0
    (lambda c: c.pop("head_start_ray_commands"), "head_start_ray_commands[1]", "--dashboard-host=0.0.0.0",
     "Ray's default: the file leaves head_start_ray_commands out"),
])
def test_binding_every_interface_fails(raw, offline, tmp_path, edit, key, flag, why):
    cfg = copy.deepcopy(raw)
    edit(cfg)
    validate_config(prepare_config(copy.deepcopy(cfg)))  # Ray has no opinion on where things listen
    path = write(tmp_path, cfg)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {key}: {flag} listens on every interface")) as e:
        check_cluster_config(path)
    assert why in str(e.value)


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["provider"].update(aws_access_key_id="AKIAABCDEFGHIJKLMNOP"), "provider.aws_access_key_id"),
    (lambda c: c["setup_commands"].append("export AWS_SECRET_ACCESS_KEY=abc123/xyz"), r"setup_commands\[1\]"),
    (lambda c: c["docker"]["run_options"].append("--env KEY=ASIAABCDEFGHIJKLMNOP"), r"docker.run_options\[5\]"),
])
def test_credentials_in_the_file_fail_without_being_repeated(raw, offline, tmp_path, edit, key):
    cfg = copy.deepcopy(raw)
    edit(cfg)
    validate_config(prepare_config(copy.deepcopy(cfg)))  # `provider` takes any key; commands are strings
    path = write(tmp_path, cfg)
    with pytest.raises(ValueError, match=re.escape(str(path)) + f": {key}: .*credential") as e:
        check_cluster_config(path)
    assert "ABCDEFGHIJKLMNOP" not in str(e.value) and "abc123" not in str(e.value)


def test_public_ingress_rule_fails(raw, offline, tmp_path):
    cfg = copy.deepcopy(raw)
    cfg["provider"]["security_group"]["IpPermissions"] = [
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    validate_config(prepare_config(copy.deepcopy(cfg)))
    path = write(tmp_path, cfg)
    with pytest.raises(ValueError, match=re.escape(f"{path}: provider.security_group.IpPermissions[0]: opens")):
        check_cluster_config(path)


def test_head_without_autoscaling_config_fails(raw, offline, tmp_path):
    cfg = copy.deepcopy(raw)
    cfg["head_start_ray_commands"] = [c.replace(" --autoscaling-config=~/ray_bootstrap_config.yaml", "")
                                      for c in cfg["head_start_ray_commands"]]
    validate_config(prepare_config(copy.deepcopy(cfg)))  # `ray up` would only print a warning
    path = write(tmp_path, cfg)
    with pytest.raises(ValueError, match=re.escape(f"{path}: head_start_ray_commands: ") + ".*never start a worker"):
        check_cluster_config(path)


# --- cluster.yaml has the shape the platform needs ------------------------------------------------------

def test_node_types_fit_the_platform(raw):
    types = raw["available_node_types"]
    head, cpu, gpu = types["head"], types["cpu_worker"], types["gpu_worker"]
    # the head drives sweeps and serves MLflow: CPUs only, on-demand
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] >= 1
    assert "InstanceMarketOptions" not in head["node_config"]
    # Ray Train's one-worker-per-GPU path needs several GPUs per node
    assert gpu["resources"]["GPU"] > 1
    assert cpu["resources"].get("GPU", 0) == 0
    for spec in (cpu, gpu):  # workers are spot (resumable work) and scale from zero
        assert spec["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert spec["min_workers"] == 0 < spec["max_workers"]
    assert raw["max_workers"] >= cpu["max_workers"] + gpu["max_workers"]
    assert raw["idle_timeout_minutes"] > 0 and raw["upscaling_speed"] > 0
    assert raw["provider"]["type"] == "aws" and raw["provider"]["region"]
    assert raw["provider"]["availability_zone"].startswith(raw["provider"]["region"])


def test_every_server_binds_a_private_address(raw):
    head = commands(raw, "head_start_ray_commands")
    workers = commands(raw, "worker_start_ray_commands")
    (ray_head,) = [c for c in head if "ray start --head" in c]
    (mlflow,) = [c for c in head if "mlflow server" in c]
    (ray_worker,) = [c for c in workers if "ray start" in c]
    private_ip = "HEAD_IP=$(hostname -I | awk '{print $1}')"  # the container shares the host's network
    for command in (ray_head, mlflow):
        assert private_ip in command
    assert "--node-ip-address=$HEAD_IP" in ray_head
    assert "--dashboard-host=127.0.0.1" in ray_head  # `ray dashboard` tunnels to the head's localhost
    assert "--host $HEAD_IP" in mlflow  # every node logs to it
    assert "--backend-store-uri sqlite:////" in mlflow and "--artifacts-destination s3://" in mlflow
    assert "--address=$RAY_HEAD_IP:6379" in ray_worker
    assert "--node-ip-address=$(hostname -I | awk '{print $1}')" in ray_worker
    # every Ray process (job drivers, Train workers) inherits the MLflow address from `ray start`
    assert ray_head.index("export MLFLOW_TRACKING_URI=http://$HEAD_IP:5000") < ray_head.index("ray start")
    assert ray_worker.index("export MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000") < ray_worker.index("ray start")
    allowed = {"$HEAD_IP", "127.0.0.1", "$(hostname"}
    every = [(m.group(1), m.group(2)) for key in ("head_start_ray_commands", "worker_start_ray_commands",
                                                   "setup_commands", "head_setup_commands")
             for c in commands(raw, key) for m in BIND_FLAG.finditer(c)]
    assert len(every) >= 4
    assert all(value in allowed and value not in ALL_INTERFACES for _, value in every), every
    # the nodes join Ray's multi-node mode whatever histoweak's jobs default to
    assert "--env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1" in raw["docker"]["run_options"]


def test_security_group_admits_only_the_cluster_and_ssh(raw):
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    group = raw["provider"]["security_group"]
    assert group["GroupName"] and not group.get("IpPermissions")
    # the rules Ray gives the group it creates: all traffic from the group's members, SSH from anywhere
    rules = _create_default_inbound_rules({"sg-cluster"}, group.get("IpPermissions", []))
    public = [r for r in rules if any(ip.get("CidrIp") == "0.0.0.0/0" for ip in r.get("IpRanges", []))]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in public] == [("tcp", 22, 22)]
    others = [r for r in rules if r not in public]
    assert others and all(r.get("UserIdGroupPairs") == [{"GroupId": "sg-cluster"}] for r in others)


def test_no_credentials_in_the_file():
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"(?i)aws_(access_key_id|secret_access_key|session_token)", text)
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)
    assert not re.search(r"(?i)(secret|password|token)\w*\s*[:=]\s*\S", text)


def test_setup_installs_this_project_with_its_constraints(raw):
    import ray

    assert raw["file_mounts"] == {"~/histoweak": "."}  # `ray up` runs in the repository root
    assert {".venv", ".cache", "mlruns.db", "mlartifacts"} <= set(raw["rsync_exclude"])
    assert "pip install --quiet -c ~/histoweak/constraints.txt -e ~/histoweak" in raw["setup_commands"]
    # the image's Ray is the one constraints.txt pins and the one this suite runs
    image = raw["docker"]["image"]
    pinned = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert image == f"rayproject/ray:{pinned}-py{sys.version_info.major}{sys.version_info.minor}-gpu"
    assert pinned == ray.__version__
    # the head's autoscaler (AWS) and MLflow's S3 artifact store need boto3, which the image may lack
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"boto3\b", d) for d in deps)
