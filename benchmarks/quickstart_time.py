"""Time the quickstart end to end and print its figures: wall time, CIDEr ratios, laterality.

    python benchmarks/quickstart_time.py            # runs `medvl run jobs/quickstart.yaml` in a fresh output dir
    python benchmarks/quickstart_time.py --set train.epochs=6   # a variant (any `medvl run --set` override)

Targets (issue "The spine"): wall time ≤ 10 min on the 2-CPU machine; trained CIDEr ≥ 2.0, ≥ 5× the untrained
model's and ≥ 2× the shuffled-images control. Everything is measured in this one run.
"""
from __future__ import annotations

import json
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
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    wall = time.perf_counter() - started
    scores = json.loads((output_dir / "quickstart.json").read_text())
    summary = json.loads((output_dir / "train" / "train_summary.json").read_text())
    trained, untrained, shuffled = (scores[k] for k in ("trained", "untrained", "shuffled_images"))
    print("\n== quickstart benchmark ==")
    print(f"wall time            {wall / 60:.1f} min (target ≤ 10)")
    print(f"optimizer steps      {summary['steps']} (best val loss {summary['best_val_loss']:.3f})")
    for key in ("bleu_4", "meteor", "rouge_l", "cider"):
        print(f"{key:<20} trained {trained[key]:.3f}  untrained {untrained[key]:.3f}  shuffled {shuffled[key]:.3f}")
    print(f"CIDEr trained/untrained  {trained['cider'] / max(untrained['cider'], 1e-9):.1f}× (target ≥ 5)")
    print(f"CIDEr trained/shuffled   {trained['cider'] / max(shuffled['cider'], 1e-9):.1f}× (target ≥ 2)")
    if "laterality_correct_rate" in trained:
        print(f"sided findings given the right side  {trained['laterality_correct_rate']:.1%} "
              f"of {int(trained['laterality_pairs'])} finding pairs")
    shutil.rmtree(output_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
