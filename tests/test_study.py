"""The mechanism study: its grids, trial configs, resume check and summary, and the smoke grid end to end (Ray
Tune trials, each a child MLflow run of one parent)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import load_file

from hvd.commands.study import main as study_main
from hvd.config import HEADS, Config, ConfigError, ModelConfig, check_section, flatten, load_config
from hvd.model import build_model
from hvd.registry.models import load_model
from hvd.registry.runs import RunConfigMismatch
from hvd.train.grids import GRIDS, VARIANTS, Grid, sweep
from hvd.train.plots import retention_figure, study_figure
from hvd.train.study import (
    MECHANISM,
    Cell,
    grid_of,
    missing_trials,
    report,
    summarise,
    summary_table,
    trial_config,
)
from hvd.train.warm_start import warm_start_fingerprint

ROOT = Path(__file__).resolve().parents[1]


def test_trials_run_cell_by_cell_each_seed_with_every_head():
    grid = Grid(((0.15, 0.15), (1.0, 0.3)), ("hvd", "meanp"), (0, 1))
    order = [(t["event_fraction"], t["entity_scale"], t["seed"], t["head"]) for t in grid.trials]
    assert order == [(0.15, 0.15, 0, "hvd"), (0.15, 0.15, 0, "meanp"), (0.15, 0.15, 1, "hvd"), (0.15, 0.15, 1, "meanp"),
                     (1.0, 0.3, 0, "hvd"), (1.0, 0.3, 0, "meanp"), (1.0, 0.3, 1, "hvd"), (1.0, 0.3, 1, "meanp")]
    assert sweep((0.15, 1.0), (0.15, 0.3)) == ((0.15, 0.15), (0.15, 0.3), (1.0, 0.15), (1.0, 0.3))
    assert GRIDS["default"].cells == sweep((0.15, 0.3, 1.0), (0.15, 0.3)) and len(GRIDS["default"].trials) == 36
    sizes = {name: len(GRIDS[name].trials) for name in ("family", "ablation", "scopes", "hcmi", "keep")}
    assert sizes == {"family": 54, "ablation": 27, "scopes": 18, "hcmi": 12, "keep": 12}


def test_every_grid_head_is_a_head_or_a_variant_the_config_accepts():
    knobs = {"event_fraction": 0.15, "entity_scale": 0.15, "seed": 0}
    for name, grid in GRIDS.items():
        for head in grid.head:
            assert head in HEADS or head in VARIANTS, (name, head)
            check_section("model", trial_config(Config(), name, knobs | {"head": head}).model)


def test_hvd_variants_are_table_4s_retention_grid_and_the_pfcm_scopes():
    retention = {name: v for name, v in VARIANTS.items() if "hvd.frame_keep" in v}
    assert len(retention) == 9 and GRIDS["ablation"].head == tuple(retention)
    assert VARIANTS["hvd-f0.25-p0.75"] == {"head": "hvd", "hvd.frame_keep": 0.25, "hvd.pfcm_ratio": 0.75}
    assert {(v["hvd.frame_keep"], v["hvd.pfcm_ratio"]) for v in retention.values()} == {
        (f, p) for f in (0.25, 0.5, 0.75) for p in (0.25, 0.5, 0.75)}
    assert {VARIANTS[f"hvd-{scope}"]["hvd.pfcm_scope"] for scope in ("frame", "video", "pair")} == {"frame", "video", "pair"}


def test_a_trial_sets_its_variants_keys_and_its_seed_for_training_and_warm_start():
    knobs = {"event_fraction": 0.15, "entity_scale": 0.15, "seed": 2}
    cfg = trial_config(Config(), "ablation", knobs | {"head": "hvd-f0.25-p0.75"})
    assert (cfg.model.head, cfg.model.hvd.frame_keep, cfg.model.hvd.pfcm_ratio) == ("hvd", 0.25, 0.75)
    assert cfg.model.hvd.pfcm_scope == Config().model.hvd.pfcm_scope  # only the variant's keys change
    assert (cfg.run.seed, cfg.pretrain.seed, cfg.run.name) == (2, 2, "ablation-ef0.15-es0.15-hvd-f0.25-p0.75-s2")
    assert trial_config(Config(), "scopes", knobs | {"head": "hvd-pair"}).model.hvd.pfcm_scope == "pair"
    meanp = trial_config(Config(), "family", knobs | {"head": "meanp"})
    assert meanp.model.head == "meanp" and meanp.model.hvd == Config().model.hvd


def test_one_warm_start_per_seed_shared_by_every_cell_and_head():
    base = load_config()
    fingerprint = lambda ef, es, head, seed: warm_start_fingerprint(  # noqa: E731
        trial_config(base, "family", {"event_fraction": ef, "entity_scale": es, "head": head, "seed": seed}))
    assert fingerprint(0.15, 0.15, "hvd", 1) == fingerprint(1.0, 0.3, "hcmi", 1)
    assert fingerprint(0.15, 0.15, "hvd", 0) != fingerprint(0.15, 0.15, "hvd", 1)
    assert warm_start_fingerprint(base) == warm_start_fingerprint(load_config(None, ["run.seed=3"]))  # outside a study
    assert warm_start_fingerprint(base) != warm_start_fingerprint(load_config(None, ["pretrain.seed=3"]))


def test_head_variants_set_their_switches_and_plain_heads_only_the_head():
    knobs = {"event_fraction": 0.3, "entity_scale": 0.3, "seed": 1}
    plain = trial_config(Config(), "hcmi", knobs | {"head": "hcmi-plain"})
    assert (plain.model.head, plain.model.hcmi.label_denoising, plain.model.hcmi.sample_enhancement) == ("hcmi", False, False)
    assert plain.run.name == "hcmi-ef0.3-es0.3-hcmi-plain-s1"
    only = trial_config(Config(), "hcmi", knobs | {"head": "hcmi-no-enhancement"})
    assert (only.model.hcmi.label_denoising, only.model.hcmi.sample_enhancement) == (True, False)
    full = trial_config(Config(), "hcmi", knobs | {"head": "hcmi"})
    assert (full.model.head, full.model.hcmi.label_denoising, full.model.hcmi.sample_enhancement) == ("hcmi", True, True)


def _child(cfg: Config, knobs: dict, metrics: dict | None = None) -> SimpleNamespace:
    """A finished child run as MLflow returns it: the trial's knobs as tags, its config as params."""
    return SimpleNamespace(info=SimpleNamespace(run_id="child"),
                           data=SimpleNamespace(tags={k: str(v) for k, v in knobs.items()},
                                                params={k: str(v) for k, v in flatten(cfg).items()},
                                                metrics=metrics or {}))


class _Store:
    """What the study asks of MLflow about a parent run and its finished children, and what it logs there."""

    def __init__(self, study: str, children: list[SimpleNamespace], seeds: tuple[int, ...] | None = None,
                 heads: tuple[str, ...] | None = None):
        self.study, self.children = study, children
        self.seeds = GRIDS[study].seed if seeds is None else seeds  # what the parent run logged as grid.seed
        self.heads = GRIDS[study].head if heads is None else heads  # ... and as grid.head
        self.metrics: dict[str, float] = {}
        self.texts: dict[str, str] = {}
        self.images: dict[str, tuple[int, int]] = {}

    def get_run(self, run_id: str) -> SimpleNamespace:
        return SimpleNamespace(info=SimpleNamespace(run_name=f"study-{self.study}", experiment_id="1"),
                               data=SimpleNamespace(params={"grid.seed": str(self.seeds), "grid.head": str(self.heads)}))

    def search_runs(self, experiments: list[str], filter_string: str, max_results: int) -> list[SimpleNamespace]:
        return self.children

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.texts[path] = text

    def log_artifact(self, run_id: str, path: str) -> None:
        with Image.open(path) as image:
            self.images[Path(path).name] = image.size

    def log_batch(self, run_id: str, metrics: list) -> None:
        self.metrics |= {m.key: m.value for m in metrics}

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        pass


def test_resume_accepts_a_later_seeds_trial_and_runs_the_rest_in_order():
    base = load_config(None, ["model.pretrained=null"])  # no warm start to resolve: the check runs in no time
    knobs = {"event_fraction": 0.3, "entity_scale": 0.3, "head": "hvd-video", "seed": 1}
    trained = trial_config(base, "scopes", knobs)
    left = missing_trials(_Store("scopes", [_child(trained, knobs)]), base, "scopes", "parent")
    assert len(left) == 17 and knobs not in left and left == [t for t in GRIDS["scopes"].trials if t != knobs]
    # a trial that trained from seed 0's warm start is not one of this study's seed-1 trials
    other = _child(trial_config(base, "scopes", knobs | {"seed": 0}), knobs)
    with pytest.raises(RunConfigMismatch, match="pretrain.seed: 0 -> 1"):
        missing_trials(_Store("scopes", [other]), base, "scopes", "parent")


def test_a_grid_run_in_pieces_runs_and_resumes_only_its_pieces_seeds():
    piece = grid_of("ablation", (2,))
    assert len(piece.trials) == 9 and {t["seed"] for t in piece.trials} == {2}
    assert piece.trials == [t for t in GRIDS["ablation"].trials if t["seed"] == 2]
    assert grid_of("ablation") == GRIDS["ablation"]
    with pytest.raises(ValueError, match=r"--seeds 2,5: grid 'ablation' has seeds \(0, 1, 2\), not \[5\]"):
        grid_of("ablation", (2, 5))
    # a resumed piece runs what its own seeds left, not the whole grid
    base = load_config(None, ["model.pretrained=null"])
    knobs = {"event_fraction": 0.15, "entity_scale": 0.15, "head": "hvd-f0.25-p0.5", "seed": 2}
    left = missing_trials(_Store("ablation", [_child(trial_config(base, "ablation", knobs), knobs)], seeds=(2,)),
                          base, "ablation", "parent")
    assert left == [t for t in piece.trials if t != knobs]


def test_a_grid_piece_can_be_some_of_its_heads_and_resumes_only_those():
    row = ("hvd-f0.75-p0.25", "hvd-f0.75-p0.5", "hvd-f0.75-p0.75")
    piece = grid_of("ablation", (1,), row)
    assert piece.trials == [t for t in GRIDS["ablation"].trials if t["seed"] == 1 and t["head"] in row]
    assert len(piece.trials) == 3
    with pytest.raises(ValueError, match=r"--heads hvd,xpool: grid 'scopes' has heads .*, not \['hvd', 'xpool'\]"):
        grid_of("scopes", None, ("hvd", "xpool"))
    base = load_config(None, ["model.pretrained=null"])
    knobs = {"event_fraction": 0.15, "entity_scale": 0.15, "head": row[0], "seed": 1}
    left = missing_trials(_Store("ablation", [_child(trial_config(base, "ablation", knobs), knobs)], (1,), row),
                          base, "ablation", "parent")
    assert left == piece.trials[1:]


def _row(ef: float, es: float, head: str, seed: int, r1: float, **mechanism: float) -> dict:
    return {"event_fraction": ef, "entity_scale": es, "head": head, "seed": seed, "test_t2v_R1": r1} | mechanism


def test_summary_without_mechanism_values_is_the_r1_table_alone():
    rows = [_row(0.15, 0.15, "hvd", 0, 50.0), _row(0.15, 0.15, "hvd", 1, 54.0), _row(0.15, 0.15, "meanp", 0, 20.0)]
    cells = summarise(rows)
    assert [c.mechanism for c in cells] == [dict.fromkeys(MECHANISM)] * 2
    assert summary_table(cells).splitlines() == [
        "| event_fraction | entity_scale | hvd t2v R@1 | meanp t2v R@1 |", "|---|---|---|---|",
        "| 0.15 | 0.15 | 52.0 +- 2.8 (n=2) | 20.0 +- 0.0 (n=1) |"]


def test_summary_with_mechanism_values_adds_a_row_per_cell_and_head():
    rows = [_row(0.15, 0.15, "hvd", 0, 50.0, frame_recall=0.8, frame_precision=0.5, event_mass=0.6, event_share=0.2,
                 entity_purity=0.9, entity_split=1.5),
            _row(0.15, 0.15, "hvd", 1, 54.0, frame_recall=0.6, frame_precision=0.3, event_mass=0.4, event_share=0.2,
                 entity_purity=None, entity_split=None),  # a seed that did not log the entity metrics
            _row(0.15, 0.15, "meanp", 0, 20.0),
            _row(1.0, 0.3, "meanp", 0, 60.0, event_mass=1.0, event_share=1.0)]
    cells = summarise(rows)
    hvd = next(c for c in cells if c.head == "hvd")
    assert hvd.mechanism["frame_recall"] == pytest.approx(0.7) and hvd.mechanism["entity_purity"] == 0.9
    lines = summary_table(cells).splitlines()
    assert lines[2] == "| 0.15 | 0.15 | 52.0 +- 2.8 (n=2) | 20.0 +- 0.0 (n=1) |"
    assert lines[5] == ("| event_fraction | entity_scale | head | t2v R@1 | frame recall | frame precision | "
                        "event mass | event share | entity purity | entity split |")
    assert lines[7:] == ["| 0.15 | 0.15 | hvd | 52.0 +- 2.8 | 0.70 | 0.40 | 0.50 | 0.20 | 0.90 | 1.50 |",
                         "| 0.15 | 0.15 | meanp | 20.0 +- 0.0 | - | - | - | - | - | - |",
                         "| 1.0 | 0.3 | meanp | 60.0 +- 0.0 | - | - | 1.00 | 1.00 | - | - |"]


def test_report_puts_the_mechanism_means_on_the_parent_run():
    knobs = {"event_fraction": 0.15, "entity_scale": 0.15}
    children = [_child(Config(), knobs | {"head": head, "seed": seed}, {"test/t2v/R1": r1} | metrics)
                for head, seed, r1, metrics in (
                    ("hvd", 0, 50.0, {"test/mechanism/frame_recall": 0.8, "test/mechanism/entity_split": 2.0}),
                    ("hvd", 1, 54.0, {"test/mechanism/frame_recall": 0.6}), ("meanp", 0, 20.0, {}))]
    store = _Store("family", children)
    report(store, "parent")
    assert store.metrics["hvd/ef0.15_es0.15/frame_recall_mean"] == pytest.approx(0.7)
    assert store.metrics["hvd/ef0.15_es0.15/entity_split_mean"] == 2.0
    assert store.metrics["hvd/ef0.15_es0.15/t2v_R1_mean"] == 52.0
    assert sorted(k for k in store.metrics if k.startswith("meanp/")) == [  # nothing logged, nothing shown
        "meanp/ef0.15_es0.15/t2v_R1_mean", "meanp/ef0.15_es0.15/t2v_R1_std"]
    assert "| 0.15 | 0.15 | hvd | 52.0 +- 2.8 | 0.70 | - | - | - | - | 2.00 |" in store.texts["summary.md"]
    assert set(store.images) == {"study.png", "mechanism.png"}


def test_the_retention_ablation_is_drawn_as_the_papers_grid():
    knobs = {"event_fraction": 0.15, "entity_scale": 0.15}
    children = [_child(Config(), knobs | {"head": head, "seed": seed}, {"test/t2v/R1": 40.0 + seed})
                for head in ("hvd-f0.25-p0.5", "hvd-f0.5-p0.5", "hvd-f0.75-p0.25") for seed in (0, 1)]
    store = _Store("ablation", children)
    cells = report(store, "parent")
    assert set(store.images) == {"study.png"}  # no mechanism logged: no mechanism picture
    figure = retention_figure(cells, {"hvd-f0.25-p0.5": (0.25, 0.5), "hvd-f0.5-p0.5": (0.5, 0.5),
                                      "hvd-f0.75-p0.25": (0.75, 0.25)}, "t")
    grid = figure.axes[0].images[0].get_array()
    assert grid.shape == (3, 2) and grid[0, 1] == grid[1, 1] == grid[2, 0] == 40.5  # rows: frames; columns: patches
    assert np.ma.is_masked(grid[0, 0]) and [t.get_text() for t in figure.axes[0].texts].count("40.5\n+- 0.7") == 3


@pytest.mark.slow
def test_smoke_grid_runs_every_trial_under_one_parent_run(tmp_path):
    # No tracking.uri: the default store under the working directory must hold the parent and every child,
    # although Tune runs each trial in a directory of its own.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [
        sys.executable, str(ROOT / "pipelines/study.py"), "--grid", "smoke", f"synthetic.out={tmp_path}/synth",
        f"pretrain.out={tmp_path}/pretrained", f"train.storage_path={tmp_path}/ray",
    ]
    # The study is stopped as a user stops one (SIGTERM to its driver) once its second trial, meanp, has started
    # its run: the hvd trial is finished, the meanp one is not.
    log = tmp_path / "study.log"
    with log.open("w") as out:
        study = subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        meanp = _wait_for_child_run(uri, "meanp", study, log)
        descendants = psutil.Process(study.pid).children(recursive=True)
        study.send_signal(signal.SIGTERM)
        study.wait(timeout=120)
    finally:
        if study.poll() is None:
            os.killpg(study.pid, signal.SIGKILL)
            study.wait()
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, [" ".join(p.cmdline())[:200] for p in alive]
    stopped = log.read_text()
    assert study.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in stopped, stopped[-3000:]
    assert "SIGTERM received" not in stopped  # no C++ stack dump from Ray's failure signal handler

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("study-smoke").experiment_id
    (parent,) = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" not in r.data.tags]
    # a study stopped early is summarised from its finished children by `--report`
    assert [(c.head, len(c.t2v_r1)) for c in report(client, parent.info.run_id)] == [("hvd", 1)]
    assert parent.info.status == "KILLED" and client.get_run(meanp).info.status != "FINISHED"

    # `--resume` runs the meanp trial alone, under the same parent, and the trial resumes its own MLflow run;
    # a config the trials did not train with is refused first.
    resume = [*command, "--resume", parent.info.run_id]
    refused = subprocess.run([*resume, "train.lr=0.5"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "train.lr: " in refused.stderr and "-> 0.5" in refused.stderr
    result = subprocess.run(resume, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming parent run {parent.info.run_id}: 1 of 2 trials to run" in result.stdout
    assert f"MLflow run {meanp} (resumed" in result.stdout + result.stderr
    assert "| 0.25 | 0.15 | hvd | " in result.stdout and "| 0.25 | 0.15 | meanp | " in result.stdout  # the summary

    runs = client.search_runs([experiment])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}  # the same parent and children
    parent = client.get_run(parent.info.run_id)
    assert parent.data.tags["trials_reported"] == "2"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"summary.md", "study.png"}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["head"] for r in children) == ["hvd", "meanp"]
    for child in children:
        assert child.data.tags["event_fraction"] == "0.25" and child.data.tags["entity_scale"] == "0.15"
        assert child.data.params["synthetic.entity_scale"] == "0.15"
        mean = parent.data.metrics[f"{child.data.tags['head']}/ef0.25_es0.15/t2v_R1_mean"]
        assert mean == pytest.approx(child.data.metrics["test/t2v/R1"])  # one seed: the mean is the run
        recall = parent.data.metrics[f"{child.data.tags['head']}/ef0.25_es0.15/frame_recall_mean"]
        assert recall == pytest.approx(child.data.metrics["test/mechanism/frame_recall"])  # the benchmark's ground truth

    # One warm start for the grid's one seed: trained on stills by the first trial (a run and a registered model
    # of its own), reused by the resumed one, and what both started from.
    (weights,) = Path(tmp_path, "pretrained").glob("clip-tiny-synthetic-*.safetensors")
    (warm,) = client.search_model_versions("name='clip-tiny-synthetic'")
    assert client.get_run(warm.run_id).data.params["data.num_frames"] == "1"
    for child in children:
        assert child.data.tags["warm_start"] == f"models:/clip-tiny-synthetic/{warm.version}"
        assert child.data.params["model.pretrained"] == str(weights)
    started = build_model(ModelConfig(pretrained=str(weights)))  # open_clip's loader reads the file
    assert torch.equal(started.backbone.clip.visual.conv1.weight, load_file(weights)["visual.conv1.weight"])
    _, registered = load_model("models:/study-smoke@latest", uri)
    assert registered.model.pretrained == str(weights)  # the weights file it started from, not "synthetic"


def _wait_for_child_run(uri: str, head: str, study: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    """The id of the smoke study's child run for `head`, once its trial has started it. The store is read only
    after a trial has said it opened a run: the study's driver has created the store's tables by then."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert study.poll() is None, log.read_text()[-3000:]
        if "MLflow run " in log.read_text():
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name("study-smoke").experiment_id
            runs = client.search_runs([experiment], f"tags.head = '{head}'")
            if runs:
                return runs[0].info.run_id
        time.sleep(1)
    raise AssertionError(f"no {head} trial started in {timeout:.0f} s: {log.read_text()[-3000:]}")


def test_the_study_figure_of_a_stopped_study_draws_the_heads_each_panel_has():
    """A study stopped part-way through a cell has some heads at one entity_scale only."""
    cells = [Cell(0.15, 0.15, head, [20.0, 22.0]) for head in ("hvd", "meanp", "xpool")]
    cells += [Cell(0.3, 0.3, head, [40.0]) for head in ("hvd", "meanp")]
    figure = study_figure(cells, "stopped")
    assert [len(axis.get_legend().get_texts()) for axis in figure.axes] == [3, 2]


def test_seeds_flag_takes_a_seed_list_and_is_refused_with_resume(capsys, tmp_path):
    with pytest.raises(SystemExit) as bad:
        study_main(["--grid", "ablation", "--seeds", "1,x"])
    assert bad.value.code == 2 and "'1,x' is not a comma-separated list of seeds" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--seeds/--heads and --resume"):  # one line and exit 2 from the command
        study_main(["--grid", "ablation", "--seeds", "2", "--resume", "abc", f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    assert not (tmp_path / "m.db").exists()  # refused before any store was opened
