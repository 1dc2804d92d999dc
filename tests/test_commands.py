"""The installed `hvd` command: one per pipeline script, the same help, flags and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hvd.commands import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
HVD = Path(sys.executable).with_name("hvd")  # installed beside the venv's python by `pip install -e .`


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_every_pipeline_script_is_a_command_and_help_lists_each_with_its_summary(capsys):
    assert set(COMMANDS) == {path.stem for path in (ROOT / "pipelines").glob("*.py")}
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    listed = capsys.readouterr().out.split("commands:\n")[1].splitlines()
    assert [line.split()[0] for line in listed] == list(COMMANDS)
    assert "Train HVD: benchmark -> prepared shards" in listed[COMMANDS.index("train")]


def test_an_unknown_command_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as done:
        main(["trian", "data.num_frames=8"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hvd: error: unknown command 'trian'")


def test_the_installed_command_takes_a_pipelines_flags_and_overrides():
    assert HVD.is_file(), f"{HVD} is missing: install the project (make, or pip install -e .)"
    result = run(str(HVD), "train", "--print-config", "data.num_frames=8")
    assert result.returncode == 0, result.stderr
    assert "  num_frames: 8\n" in result.stdout
    bad = run(str(HVD), "train", "data.num_framez=8")
    assert bad.returncode == 2 and bad.stderr.startswith("hvd train: error: ") and "data.num_framez" in bad.stderr


def test_its_help_is_the_pipeline_scripts_help_under_its_own_name():
    installed, script = run(str(HVD), "train", "--help"), run(sys.executable, "pipelines/train.py", "--help")
    assert installed.returncode == script.returncode == 0
    assert installed.stdout.startswith("usage: hvd train ") and script.stdout.startswith("usage: train.py ")
    # the usage line wraps by the program's name; from the description on, the two are one text
    assert installed.stdout.split("\n\n", 1)[1] == script.stdout.split("\n\n", 1)[1]


# a model URI of no known form, with each job's other required arguments
BAD_MODEL = {"evaluate": ["--shards", "y"], "index": ["--shards", "y"], "search": ["a caption"], "serve": []}


@pytest.mark.parametrize("name", ["train", "pretrain", "evaluate", "index", "search", "serve", "study"])
def test_help_and_a_refused_key_import_neither_torch_nor_mlflow(name):
    """The job's heavy imports wait until the arguments are good (hvd.cli), so these answer in about a second
    (Ray's core, which the command front needs, imports in under one); so does a model URI of no known form,
    and for training, inputs the model cannot take or cannot find (hvd.train.preflight)."""
    argvs = [["--help"], ["model.hed=1"]]
    if name in BAD_MODEL:
        argvs.append(["--model", "nowhere/at/all", *BAD_MODEL[name]])
    if name == "train":  # what the model cannot take and a missing weights file: the run's own inputs
        argvs += [["data.frame_size=224"], ["model.pretrained=/nowhere/weights.pt"]]
    probe = (
        "import sys\n"
        f"from hvd.commands.{name} import main\n"
        f"for argv in {argvs!r}:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'mlflow'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if name in BAD_MODEL:
        assert "error: --model 'nowhere/at/all': not a model URI nor a directory" in done.stderr, done.stderr[-500:]
    if name == "train":
        assert "'data.frame_size': 224" in done.stderr and "/nowhere/weights.pt" in done.stderr, done.stderr[-500:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]
