import subprocess
import sys
from pathlib import Path

import pytest

from hvd.config import ConfigError, flatten, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load_config(None, ["model.head=meanp", "data.num_frames=8", "model.pretrained=/x/clip.pt"])
    assert (cfg.model.head, cfg.data.num_frames, cfg.model.pretrained) == ("meanp", 8, "/x/clip.pt")
    assert load_config().model.head == "hvd"


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 3\n  lr: 0.001\nmodel:\n  head: meanp\n")
    cfg = load_config(path, ["train.epochs=7"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.head) == (7, 0.001, "meanp")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.hed=hvd"], "model.hed"),
        (["nosection.x=1"], "nosection"),
        (["data.num_frames=twelve"], "data.num_frames"),
        (["train.use_gpu=maybe"], "train.use_gpu"),
        (["model.head=transformer"], "model.head"),
        (["data.num_frames"], "data.num_frames"),
    ],
)
def test_bad_overrides_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_bad_yaml_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  num_frame: 8\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*data\.num_frame"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files, "configs/ ships no YAML"
    for path in files:
        load_config(path)


def test_flatten_and_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["train.epochs=2"])
    flat = flatten(cfg)
    assert flat["train.epochs"] == 2 and flat["model.head"] == "hvd"
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_help_lists_config_fields():
    result = _run("pipelines/synthetic.py", "--help")
    assert result.returncode == 0
    assert "synthetic.event_fraction" in result.stdout and "synthetic.entity_scale" in result.stdout


def test_cli_unknown_key_fails_before_work(tmp_path):
    out = tmp_path / "never"
    result = _run("pipelines/synthetic.py", "--preset", "tiny", "--out", str(out), "synthetic.event_fracton=0.2")
    assert result.returncode == 2
    assert "synthetic.event_fracton" in result.stderr
    assert not out.exists()
