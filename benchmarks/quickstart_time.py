"""Time the quickstart end to end and print its figures: wall time, CIDEr ratios, laterality.

    python benchmarks/quickstart_time.py            # runs `medvl run jobs/quickstart.yaml` in a fresh output dir
    python benchmarks/quickstart_time.py --set train.epochs=6   # a variant (any `medvl run --set` override)

Targets (issue 18): wall time ≤ 5 min on the 2-CPU machine (Ray start to ``quickstart.json``); trained CIDEr
≥ 3.0, ≥ 5× the untrained model's and ≥ 2× the shuffled-images control; sided findings on the right side
(``laterality_correct_rate``) ≥ 0.8. Everything is measured in this one run; the load average is printed beside it
(a busy machine stretches the wall time, not the scores).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    output_dir = Path(tempfile.mkdtemp(prefix="medvl-quickstart-"))
    command = [sys.executable, "-m", "medvl.cli", "run", str(ROOT / "jobs" / "quickstart.yaml"), *argv,
               "--set", f"output_dir={output_dir}"]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    scores = json.loads((output_dir / "quickstart.json").read_text())
    summary = json.loads((output_dir / "train" / "train_summary.json").read_text())
    trained, untrained, shuffled = (scores[k] for k in ("trained", "untrained", "shuffled_images"))
    print("\n== quickstart benchmark ==")
    print(f"wall time            {wall / 60:.1f} min (target ≤ 5); load average {load_before:.1f} before, "
          f"{load_after[0]:.1f} / {load_after[1]:.1f} (1 / 5 min) after")
    train_time, steps = summary.get("train_time_s", 0.0), summary["steps"]
    startup = summary.get("startup_s", {})
    print(f"optimizer steps      {steps} (best val loss {summary['best_val_loss']:.3f}), "
          f"{steps / train_time if train_time else float('nan'):.2f} steps/s while training, "
          f"train stage {summary['wall_time_s']:.0f} s of which start-up to the first step {startup.get('total', 0):.0f} s")
    for key in ("bleu_4", "meteor", "rouge_l", "cider", "laterality_correct_rate"):
        if key in trained:
            print(f"{key:<24} trained {trained[key]:.3f}  untrained {untrained.get(key, 0):.3f}  "
                  f"shuffled {shuffled.get(key, 0):.3f}")
    print(f"CIDEr trained/untrained  {trained['cider'] / max(untrained['cider'], 1e-9):.1f}× (target ≥ 5)")
    print(f"CIDEr trained/shuffled   {trained['cider'] / max(shuffled['cider'], 1e-9):.1f}× (target ≥ 2)")
    if "laterality_correct_rate" in trained:
        print(f"sided findings given the right side  {trained['laterality_correct_rate']:.1%} "
              f"of {int(trained['laterality_pairs'])} finding pairs (target ≥ 80 %; "
              f"{shuffled.get('laterality_correct_rate', 0):.1%} with images shuffled)")
    shutil.rmtree(output_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
