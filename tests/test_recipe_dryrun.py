"""The recipe dry run's smoke: the demo recipe's shapes (tiny CLIP), one step, read back as JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_loads_openai_layout_weights_and_projects_an_epoch():
    result = subprocess.run(
        [sys.executable, "benchmarks/recipe_dryrun.py", "--config", "configs/demo.yaml", "--steps", "1",
         "--train-videos", "1000", "data.expand_captions=true"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert (report["preset"], report["worker_batch"], report["frames"]) == ("tiny", 16, [12, 64, 64])
    assert report["epoch_samples"] == 20_000 and report["gflops_per_sample"] > 0
    assert report["projected_epoch_gpu_minutes"] >= 0 and len(report["step_s"]) == 1
    refused = subprocess.run([sys.executable, "benchmarks/recipe_dryrun.py", "data.frame_size=96"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "data.frame_size" in refused.stderr  # what the model cannot take
