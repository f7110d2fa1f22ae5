"""Checking a Ray cluster-launcher config (``cluster.yaml``): Ray's own validation, then what Ray lets through.

Ray 2.60's ``prepare_config`` and ``validate_config`` are what ``ray up`` runs before it asks AWS for
anything; offline (defaults come from files in the wheel) they reject, measured: unknown keys at the top
level or in a node type (its JSON schema), a ``head_node_type`` that is not a node type, an unknown
provider, and a ``docker`` block with a container name but no image (an ``assert``, gone under
``python -O``). They accept (measured):

- a node type whose ``min_workers`` exceeds its ``max_workers``, or a negative worker count (the
  autoscaler quietly goes by the smaller of the two);
- a ``docker`` block with neither image nor container name;
- any key in ``provider``, credentials included;
- the defaults a config leaves out, e.g. ``head_start_ray_commands`` from Ray's AWS defaults, whose
  ``ray start --head`` binds the dashboard and job server to 0.0.0.0;
- a head start command without ``--autoscaling-config`` (the head then never starts a worker; ``ray up``
  only prints a warning).

``check_cluster_config`` runs Ray's checks and then these, and reports the first problem as a
``ValueError`` that names the file and the key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ALL_INTERFACES", "check_cluster_config"]

#: Bind addresses that listen on every interface of a node.
ALL_INTERFACES = frozenset({"0.0.0.0", "::", "[::]", "*"})

# The flags through which `ray start`, `mlflow server` and similar servers are told where to listen.
_BIND_FLAG = re.compile(r"--(dashboard-host|host|node-ip-address|bind|ip)(?:=|\s+)(['\"]?)([^\s'\";]+)\2")
_CREDENTIAL_NAMES = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")  # the shape of an AWS access key id
_COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands")


def check_cluster_config(path: str | Path) -> dict[str, Any]:
    """Validate a cluster-launcher config as ``ray up`` would, then check what Ray lets through.

    Nothing is sent to AWS: Ray's defaults are read from the installed wheel.

    Parameters
    ----------
    path : str or Path
        The YAML file, e.g. ``cluster.yaml``.

    Returns
    -------
    dict
        The config as Ray prepared it (its defaults filled in, setup commands merged).

    Raises
    ------
    ValueError
        ``"<path>: <key>: <problem>"`` for the first problem found; Ray's own messages are kept.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot be read as YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a cluster config (a mapping with cluster_name, provider, ...)")
    if not isinstance(raw.get("provider"), dict) or "type" not in raw["provider"]:
        raise ValueError(f"{path}: provider: missing, or without a type (e.g. `type: aws`)")  # Ray: a KeyError

    prepared = _ray_checks(path, raw)
    problems = [*_docker_image_problems(raw), *_worker_limit_problems(prepared), *_credential_problems(raw),
                *_bind_problems(raw), *_public_ingress_problems(prepared), *_autoscaler_problems(prepared)]
    if problems:
        key, problem = problems[0]
        raise ValueError(f"{path}: {key}: {problem}")
    return prepared


def _ray_checks(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """Ray's ``prepare_config`` + ``validate_config``, their errors re-raised naming the file and key."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(raw)
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        key = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ValueError(f"{path}: {key}: {e.message} (Ray's schema, ray/autoscaler/ray-schema.json)") from e
    except AssertionError as e:  # Ray's docker check is an assert
        raise ValueError(f"{path}: docker: {e} (Ray's check)") from e
    except (ValueError, NotImplementedError, RuntimeError) as e:
        raise ValueError(f"{path}: {e} (Ray's check)") from e
    return prepared


def _docker_image_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    docker = raw.get("docker") or {}
    if not docker:
        return []  # no Docker at all is a choice; a block without an image is a mistake
    image = docker.get("image")
    if not (docker.get("head_image") or image):
        return [("docker.image", "missing (and no docker.head_image): the head's container has no image")]
    for name, spec in (raw.get("available_node_types") or {}).items():
        if name == raw.get("head_node_type"):
            continue
        if not ((spec.get("docker") or {}).get("worker_image") or docker.get("worker_image") or image):
            return [("docker.image", f"missing (and no worker_image for node type {name!r}): its container "
                                     "has no image")]
    return []


def _worker_limit_problems(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for name, spec in cfg["available_node_types"].items():
        lo, hi = spec.get("min_workers", 0), spec.get("max_workers", 0)
        key = f"available_node_types.{name}"
        if hi < 0 or lo < 0:
            out.append((f"{key}.{'max' if hi < 0 else 'min'}_workers", "must be >= 0"))
        elif lo > hi:
            out.append((f"{key}.min_workers", f"{lo} is more than max_workers ({hi}); Ray would quietly keep "
                                              f"at most {hi} such nodes"))
    return out


def _credential_problems(raw: Any, key: str = "") -> list[tuple[str, str]]:
    """Credential names or access-key-shaped strings anywhere in the file (the value is not repeated)."""
    if isinstance(raw, dict):
        out = []
        for k, v in raw.items():
            sub = f"{key}.{k}" if key else str(k)
            if str(k).lower() in _CREDENTIAL_NAMES:
                out.append((sub, "credentials do not belong in a cluster config: use the environment or "
                                 "~/.aws where `ray up` runs, and instance profiles on the nodes"))
            out += _credential_problems(v, sub)
        return out
    if isinstance(raw, list):
        return [p for i, v in enumerate(raw) for p in _credential_problems(v, f"{key}[{i}]")]
    if isinstance(raw, str) and (_ACCESS_KEY_ID.search(raw) or any(n in raw.lower() for n in _CREDENTIAL_NAMES)):
        return [(key, "holds a credential (a key name or an access key id): use the environment or ~/.aws "
                      "where `ray up` runs, and instance profiles on the nodes")]
    return []


def _commands(raw: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """``(key, command, from_defaults)`` for every shell command ``ray up`` would run: the file's own, node-type
    overrides included, and Ray's defaults for the command lists the file leaves out."""
    from ray.autoscaler._private.providers import _get_default_config

    defaults = _get_default_config(raw["provider"])
    out = []
    for k in _COMMAND_KEYS:
        own = k in raw
        out += [(f"{k}[{i}]", c, not own) for i, c in enumerate((raw[k] if own else defaults.get(k)) or [])]
    for name, spec in (raw.get("available_node_types") or {}).items():
        for k in ("initialization_commands", "worker_setup_commands"):
            out += [(f"available_node_types.{name}.{k}[{i}]", c, False) for i, c in enumerate(spec.get(k) or [])]
    return out


def _bind_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for key, command, from_defaults in _commands(raw):
        for m in _BIND_FLAG.finditer(str(command)):
            if m.group(3) in ALL_INTERFACES:
                origin = f" (Ray's default: the file leaves {key.split('[')[0]} out)" if from_defaults else ""
                out.append((key, f"--{m.group(1)}={m.group(3)} listens on every interface; bind the node's private "
                                 f"address, or 127.0.0.1 for what only the node itself uses{origin}"))
    return out


def _public_ingress_problems(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    rules = ((cfg["provider"].get("security_group") or {}).get("IpPermissions")) or []
    for i, rule in enumerate(rules):
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + \
                 [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        is_ssh = rule.get("IpProtocol") == "tcp" and rule.get("FromPort") == 22 and rule.get("ToPort") == 22
        if any(r in ("0.0.0.0/0", "::/0") for r in ranges) and not is_ssh:
            out.append((f"provider.security_group.IpPermissions[{i}]",
                        "opens the cluster to the internet; reach its services through SSH instead"))
    return out


def _autoscaler_problems(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    heads = [c for c in cfg.get("head_start_ray_commands") or [] if re.search(r"\bray start\b.*--head\b", str(c))]
    if not heads:
        return [("head_start_ray_commands", "no `ray start --head`: Ray would not start on the head")]
    if not any("--autoscaling-config" in c for c in heads):
        return [("head_start_ray_commands", "`ray start --head` without --autoscaling-config="
                                            "~/ray_bootstrap_config.yaml: the head would never start a worker")]
    return []
