import importlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hvd.cli import run_pipeline
from hvd.config import (
    CHOICES,
    HEADS,
    KEYS,
    PATH_KEYS,
    RANGES,
    RESUME_FREE_KEYS,
    ConfigError,
    config_from_yaml,
    flatten,
    load_config,
    to_yaml,
)
from hvd.data import synthetic
from hvd.model import presets
from hvd.registry.runs import config_differences

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


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.hvd.frame_keep=1.5"],
        ["model.hvp.pfcm_ratio=0"],
        ["model.hvd.pfcm_scope=clip"],
        ["train.warmup_fraction=1.0"],
        ["train.batch_size=33"],  # over 2 workers
        ["data.num_frames=0"],
        ["data.max_words=2"],
        ["data.jpeg_quality=101"],
        ["synthetic.entity_scale=0.9"],
        ["synthetic.frame_size=17"],
        ["eval.topk=0"],
        ["eval.mode=two_stage", "eval.dsl=true"],
    ],
)
def test_out_of_range_values_fail_at_load_naming_the_key(overrides):
    key = overrides[-1].split("=")[0]
    with pytest.raises(ConfigError, match=rf"bad value for '{key}'"):
        load_config(None, overrides)


def test_every_rule_lets_the_defaults_and_shipped_configs_through():
    assert set(RANGES) <= set(flatten(load_config())), "a rule names a key the config does not have"
    load_config(None, ["eval.mode=two_stage", "eval.dsl=true", "eval.compare=true"])


def test_the_implementations_offer_exactly_the_declared_choices():
    assert set(synthetic.PRESETS) == set(CHOICES["synthetic.preset"])
    assert set(presets.PRESETS) == set(CHOICES["model.preset"])
    assert RANGES["synthetic.num_distractors"][0](len(synthetic.COLOURS) - 1)
    assert not RANGES["synthetic.num_distractors"][0](len(synthetic.COLOURS))


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


def test_train_rejects_a_bad_value_before_ray_or_mlflow_start(tmp_path):
    db = tmp_path / "mlflow.db"
    result = _run("pipelines/train.py", "model.hvd.frame_keep=2", f"tracking.uri=sqlite:///{db}")
    assert result.returncode == 2
    assert "bad value for 'model.hvd.frame_keep': 2.0 (must be in (0, 1])" in result.stderr
    assert not db.exists() and "ray" not in result.stderr.lower()


def test_worker_plan_travels_as_plain_values():
    from hvd.train.loop import WorkerPlan

    plan = WorkerPlan(load_config(None, ["train.epochs=3"]), "run", "sqlite:///x.db", "/s", "val", 7, "/m")
    values = json.loads(json.dumps(plan.to_loop_config()))  # what Ray Train records of it
    assert WorkerPlan.from_loop_config(values) == plan and plan.total_steps == 21


def test_demo_yaml_is_the_embedded_default_made_explicit():
    assert load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml") == load_config()


def test_a_key_added_after_a_run_started_differs_only_when_set_away_from_its_default():
    cfg = load_config(None, [])
    logged = {key: str(value) for key, value in flatten(cfg).items() if key != "data.min_duration_fraction"}
    assert config_differences(logged, cfg) == []  # the run predates the key; its code behaved as the default
    changed = load_config(None, ["data.min_duration_fraction=0.5"])
    assert config_differences(logged, changed) == ["data.min_duration_fraction: (absent) -> 0.5"]
    assert config_differences(logged | {"model.head": "meanp"}, cfg) == ["model.head: meanp -> hvd"]


def test_a_config_saved_by_an_earlier_version_loads_without_its_retired_keys():
    saved = to_yaml(load_config(None, ["data.num_frames=8"])).replace("data:\n", "data:\n  decode_batch_size: 4\n", 1)
    assert config_from_yaml(saved).data.num_frames == 8  # a checkpoint or registered model from before still loads
    with pytest.raises(ConfigError, match="unknown config key 'data.decode_batch_size'"):
        load_config(None, ["data.decode_batch_size=4"])  # but nobody sets it anew


# The model section as configs saved before per-head sections held it: every head's knobs side by side.
FLAT_MODEL_SECTION = """model:
  preset: tiny
  head: hvp
  pretrained: null
  quick_gelu: true
  frame_keep: 0.25
  pfcm_steps: 2
  pfcm_scope: frame
  pfcm_ratio: 0.5
  dpc_k: 5
  score_budget_mb: 512
  layers: [0, 2]
  temporal_layers: 4
  pearson_weight: 0.001
  clip_ratio: 0.25
  phrase_ratio: 0.25
  label_denoising: false
  sample_enhancement: true
"""


def test_a_config_saved_with_the_flat_model_section_loads_into_the_head_sections():
    saved = to_yaml(load_config()).split("model:\n")[0] + FLAT_MODEL_SECTION
    model = config_from_yaml(saved).model
    assert (model.head, model.hvd.frame_keep, model.hvd.pfcm_scope, model.hvp.layers) == ("hvp", 0.25, "frame", [0, 2])
    # a knob of several heads held the one value every head used then
    assert model.hvd.dpc_k == model.hvp.dpc_k == model.hcmi.dpc_k == 5 and model.hvp.pfcm_steps == 2
    assert not model.hcmi.label_denoising
    # a run that logged the flat names resumes under today's names, and a change still shows
    logged = {key: str(value) for key, value in flatten(load_config()).items() if key != "model.hvd.frame_keep"}
    logged["model.frame_keep"] = "0.25"
    assert config_differences(logged, load_config(None, ["model.hvd.frame_keep=0.25"])) == []
    assert config_differences(logged, load_config()) == ["model.hvd.frame_keep: 0.25 -> 0.5"]
    # typed anew, an old name is refused with its new place
    with pytest.raises(ConfigError, match=r"unknown config key 'model.dpc_k' \(now model.hvd.dpc_k and "
                                          r"model.hvp.dpc_k and model.hcmi.dpc_k\)"):
        load_config(None, ["model.dpc_k=5"])


def test_every_head_is_registered_once_with_its_section():
    sections = {name for name, item in KEYS.items() if name.count(".") == 2 and name.startswith("model.")}
    # every nested model section is a head's, but the first stage's, which every head has
    assert {name.split(".")[1] for name in sections} - {"first_stage"} <= set(HEADS), "a model section named after no head"
    assert CHOICES["model.head"] == tuple(HEADS)
    help_text = _run("pipelines/train.py", "--help").stdout
    assert "model.hcmi:" in help_text and "model.hcmi.clip_ratio: float = 0.25" in help_text


FLOAT_KEYS = [key for key, value in flatten(load_config()).items() if isinstance(value, float)]


@pytest.mark.parametrize("bad", ["inf", "-inf", "nan"])
def test_no_float_key_takes_a_non_finite_value(bad):
    assert {"train.lr", "train.grad_clip", "data.decode_timeout_s", "pretrain.lr"} <= set(FLOAT_KEYS)
    for key in FLOAT_KEYS:
        with pytest.raises(ConfigError, match=rf"bad value for '{key}'"):
            load_config(None, [f"{key}={bad}"])
    with pytest.raises(ConfigError, match="finite"):
        load_config(None, [f"train.worker_resources={{gpu_node: {bad}}}"])


@pytest.mark.parametrize(
    "override",
    ["data.num_frames=100000", "data.frame_size=100000", "train.num_workers=1000000", "data.decode_concurrency=100000",
     "train.batch_size=10000000", "synthetic.num_train=10000000000", "data.max_words=5000", "eval.topk=10000000"],
)
def test_sizes_have_upper_bounds(override):
    with pytest.raises(ConfigError, match=rf"bad value for '{override.split('=')[0]}'.*to"):
        load_config(None, [override])


def test_train_refuses_lr_inf_before_ray_or_mlflow_start(tmp_path):
    db = tmp_path / "mlflow.db"
    result = _run("pipelines/train.py", "train.lr=inf", f"tracking.uri=sqlite:///{db}")
    assert result.returncode == 2 and "bad value for 'train.lr': inf (must be a finite number)" in result.stderr
    assert not db.exists()


def test_a_stored_config_never_resolves_interpolations(monkeypatch):
    monkeypatch.setenv("HVD_TEST_SECRET", "s3cr3t")
    stored = to_yaml(load_config()).replace("name: hvd-tiny-demo", "name: ${oc.env:HVD_TEST_SECRET}")
    with pytest.raises(ConfigError, match=r"interpolations at run\.name") as refused:
        config_from_yaml(stored)
    assert "s3cr3t" not in str(refused.value)
    nested = to_yaml(load_config()).replace("experiment: hvd", "experiment: x-${run.name}")
    with pytest.raises(ConfigError, match=r"tracking\.experiment"):
        config_from_yaml(nested)
    # A user's own config file still resolves them (configs/cluster.yaml reads HVD_BUCKET so).
    monkeypatch.setenv("HVD_BUCKET", "s3://mine")
    assert load_config(ROOT / "configs" / "cluster.yaml").train.storage_path == "s3://mine/checkpoints"


def test_config_files_compose_later_over_earlier(tmp_path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("train:\n  epochs: 3\n  lr: 0.002\nmodel:\n  head: meanp\n")
    second.write_text("train:\n  epochs: 4\n")
    cfg = load_config([first, second], ["model.head=xpool"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.head) == (4, 0.002, "xpool")
    result = _run("pipelines/train.py", "--config", str(first), "--config", str(second), "--print-config")
    assert result.returncode == 0 and config_from_yaml(result.stdout).train.epochs == 4


def test_train_refuses_a_broken_manifest_or_missing_weights_before_ray_or_mlflow_start(tmp_path):
    db, manifest = tmp_path / "mlflow.db", tmp_path / "manifest.jsonl"
    manifest.write_text('{"video_id": "a", "path": "a.mp4", "captions": ["x"], "split": "train"}\nnot json\n')
    for bad in (f"data.manifest={manifest}", f"model.pretrained={tmp_path}/absent.pt"):
        result = _run("pipelines/train.py", bad, f"tracking.uri=sqlite:///{db}", f"pretrain.out={tmp_path}/pre")
        assert result.returncode == 2, result.stderr  # bad input
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
        assert ("manifest.jsonl:2" in result.stderr) if "manifest" in bad else ("absent.pt" in result.stderr)
        assert not db.exists() and not (tmp_path / "pre").exists() and "ray" not in result.stderr.lower()


@pytest.mark.parametrize(
    ("pipeline", "args", "says"),
    [
        ("pipelines/prepare.py", ["--manifest", "MISSING", "--out", "OUT"], "manifest not found"),
        ("pipelines/evaluate.py", ["--model", "nowhere/at/all", "--manifest", "GOOD"], "nowhere/at/all"),
        ("pipelines/index.py", ["--model", "nowhere/at/all", "--manifest", "GOOD"], "nowhere/at/all"),
        ("pipelines/search.py", ["--model", "nowhere/at/all", "a red square"], "nowhere/at/all"),
        ("pipelines/serve.py", ["--model", "nowhere/at/all"], "nowhere/at/all"),
        ("pipelines/evaluate.py", ["--model", "models:/hvd/1", "--manifest", "MISSING"], "manifest not found: "),
        ("pipelines/index.py", ["--model", "models:/hvd/1", "--shards", "MISSING"], "shards not found: "),
        ("pipelines/manifest.py", ["msrvtt", "--annotations", "MISSING", "--videos", "MISSING", "--out", "OUT/m.jsonl"],
         "not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(pipeline, args, says, tmp_path):
    good = tmp_path / "good.jsonl"  # a manifest that reads: the model URI is what is wrong
    good.write_text('{"video_id": "a", "path": "a.mp4", "captions": ["x"], "split": "test"}\n')
    args = [arg.replace("MISSING", str(tmp_path / "missing")).replace("OUT", str(tmp_path / "out"))
            .replace("GOOD", str(good)) for arg in args]
    result = _run(pipeline, *args, *([] if "manifest.py" in pipeline else [f"tracking.uri=sqlite:///{tmp_path}/m.db"]))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and says in result.stderr and "Traceback" not in result.stderr


# The flags each pipeline requires, so that only the config key is wrong; manifest takes no config keys.
REQUIRED_FLAGS = {"evaluate": ["--model", "x", "--shards", "y"], "index": ["--model", "x", "--shards", "y"],
                  "search": ["--model", "x", "a red square"], "serve": ["--model", "x"]}
KEYED_PIPELINES = sorted(p.stem for p in (ROOT / "pipelines").glob("*.py") if p.stem != "manifest")


@pytest.mark.parametrize("pipeline", KEYED_PIPELINES)
def test_every_pipeline_refuses_a_bad_key_with_one_line_and_exit_2(pipeline, tmp_path, capsys):
    """In this process, through the command each script runs (the scripts' own exit is tested above)."""
    command = importlib.import_module(f"hvd.commands.{pipeline}")
    with pytest.raises(SystemExit) as stopped:
        command.main([*REQUIRED_FLAGS.get(pipeline, []), "model.hed=hvd", f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.strip().count("\n") == 0 and "unknown config key 'model.hed'" in err
    assert not (tmp_path / "m.db").exists()


@pytest.mark.parametrize("pipeline", ["evaluate", "index"])
@pytest.mark.parametrize("source", ["--manifest", "--shards"])
def test_evaluation_jobs_refuse_a_broken_manifest_or_unprepared_shards_before_the_model_or_ray(
    pipeline, source, tmp_path, monkeypatch, capsys
):
    manifest, shards = tmp_path / "manifest.jsonl", tmp_path / "shards"
    manifest.write_text('{"video_id": "a", "path": "a.mp4", "captions": ["x"], "split": "test"}\nnot json\n')
    shards.mkdir()
    bad = str(manifest if source == "--manifest" else shards)
    monkeypatch.setattr(sys, "argv", [pipeline, "--model", "models:/absent@champion", source, bad,
                                      f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(SystemExit) as stopped:
            run_pipeline(importlib.import_module(f"hvd.commands.{pipeline}").main)
    finally:  # run_pipeline turns stop signals into exceptions: pytest's own handling comes back
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0
    assert ("manifest.jsonl:2" if source == "--manifest" else "no _summary.json") in err  # not the absent model
    assert not (tmp_path / "m.db").exists()


def test_every_key_declares_its_help_and_the_tables_are_read_off_the_declarations():
    assert all(facts.metadata["help"] for facts in KEYS.values())
    assert CHOICES["model.head"] == ("hvd", "meanp", "xpool", "eercf", "hvp", "hcmi")
    assert "data.manifest" in PATH_KEYS and "train.lr" in RANGES and RESUME_FREE_KEYS == {
        "run.resume", "data.overwrite", "data.decoder", "data.next_epoch_lead", "train.grad_checkpointing",
        "train.micro_batch_size"}
    result = _run("pipelines/train.py", "--help")
    assert "share of steps of linear warmup before cosine decay (in [0, 1))" in result.stdout
    assert "one of hvd, meanp, xpool, eercf, hvp, hcmi" in result.stdout


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["data.frame_size=224"], "'data.frame_size': 224 (model.preset=tiny takes 64 px frames)"),
        (["model.head=hcmi", "data.num_frames=40"], "'data.num_frames': 40 (model.head=hcmi has a position for at most 32"),
    ],
)
def test_what_the_model_cannot_take_fails_before_ray_or_mlflow_start(overrides, says, tmp_path):
    db = tmp_path / "mlflow.db"
    result = _run("pipelines/train.py", *overrides, f"tracking.uri=sqlite:///{db}", f"pretrain.out={tmp_path}/pre")
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert not db.exists() and not (tmp_path / "pre").exists()
