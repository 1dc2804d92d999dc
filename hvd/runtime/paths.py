"""Where relative paths live: under one project root, `HVD_ROOT`, that every node of a cluster can share.

`ray job submit --working-dir .` runs a job in a copy of the working directory, and every node unpacks a
copy of its own: a relative path names another folder on each node, so Ray Data tasks on a second node
write shards where the driver never looks. Relative config paths are therefore joined onto the project
root once, when the config is loaded (`hvd.config.load_config`), and the driver, Ray tasks and MLflow
params all see the same absolute path. The root is `HVD_ROOT` (the cluster definitions set it on every
node to a shared folder), else the current directory, as on one machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from hvd.errors import InputError

ROOT_ENV = "HVD_ROOT"
SQLITE = "sqlite:///"


class UnsharedPathError(InputError, ValueError):
    """Config paths the nodes of this cluster would not share; the message names the keys and the fix."""


def project_root() -> Path:
    """`HVD_ROOT`, else the current directory: what relative config paths are joined onto."""
    return Path(os.environ.get(ROOT_ENV) or os.getcwd()).resolve()


def resolve_path(value: str, root: Path | None = None) -> str:
    """URIs (`s3://...`) and absolute paths as given; a relative path joined onto `root`, the project root."""
    if "://" in value or Path(value).is_absolute():
        return value
    return str((root or project_root()) / value)


def resolve_tracking_uri(uri: str, root: Path | None = None) -> str:
    """A tracking URI with a relative SQLite file (`sqlite:///mlflow.db`) moved under the project root.

    Other URIs are left alone: `databricks` or `http://...` are not paths.
    """
    if uri.startswith(SQLITE):
        return SQLITE + resolve_path(uri[len(SQLITE) :], root)
    return uri


def _inside(value: str, root: Path) -> bool:
    """Whether a path or SQLite URI names something under `root` on this node (remote URIs never do)."""
    if value.startswith(SQLITE):
        value = value[len(SQLITE) :]
    elif "://" in value:
        return False
    return Path(value).resolve().is_relative_to(root)


def require_shared_paths(paths: Mapping[str, str | Path | None], nodes: int | None = None) -> None:
    """Stop before any work when a path the job uses would differ from node to node.

    Without `HVD_ROOT` the root is the driver's working directory, which the nodes of a cluster do not
    share (a `ray job submit` job gets a copy on each): with more than one node, any local path inside it,
    every relative config path once resolved, is missing or different elsewhere. `paths` maps config keys
    to the values the job uses (None: unused); `nodes` counts the alive nodes, by default those of the
    Ray cluster this driver is connected to.
    """
    if os.environ.get(ROOT_ENV):
        return
    if nodes is None:
        import ray  # here, not at the top: loading a config should not import Ray

        nodes = sum(1 for node in ray.nodes() if node["Alive"])
    if nodes < 2:
        return
    root = project_root()
    unshared = [key for key, value in paths.items() if value and _inside(str(value), root)]
    if unshared:
        raise UnsharedPathError(
            f"{', '.join(unshared)}: inside the driver's working directory {root}, where relative paths "
            f"resolve while {ROOT_ENV} is not set, and the {nodes} nodes of this cluster do not share it (a "
            f"`ray job submit` job gets a copy on each node). Set {ROOT_ENV} on every node to a folder all "
            "nodes share (cluster/local.sh, ray_cluster.yaml and cluster/kuberay/ do), or give these keys "
            "an absolute path on shared storage or an object-store URI (s3://, gs://)."
        )
