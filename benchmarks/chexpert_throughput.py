"""Throughput of the rule-based CheXpert labeler on one core: prints reports/s (a measurement, not a test).

Reports are 1,000 MIMIC-CXR / IU X-ray style reports, built by drawing 4-9 sentences from a pool of real report
phrasing (negated lists, hedges, devices, XXXX tokens) with a fixed seed, some with section headers.

    python benchmarks/chexpert_throughput.py [--reports 1000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from medvl.eval.chexpert import CheXpertLabeler

SENTENCES = [
    "The heart is normal in size.", "The mediastinum is unremarkable.", "The lungs are clear.",
    "No pneumothorax or pleural effusion.",
    "XXXX opacity in the right lower lobe may represent atelectasis or pneumonia.",
    "Stable cardiomegaly.", "Sternotomy wires are noted.", "Degenerative changes of the spine.",
    "Calcified granuloma in the left upper lobe.", "Chronic-appearing deformity of the right clavicle.",
    "Left-sided PICC line tip in the SVC.", "Low lung volumes with bibasilar atelectasis.", "Hyperexpanded lungs.",
    "There is no focal consolidation, pleural effusion, or pneumothorax.",
    "The cardiomediastinal silhouette and pulmonary vasculature are within normal limits.",
    "Heart size is mildly enlarged.", "Mild pulmonary vascular congestion with small bilateral pleural effusions.",
    "Endotracheal tube terminates 4 cm above the carina.", "Enteric tube courses below the diaphragm.",
    "Right basilar opacity could reflect aspiration or pneumonia.", "Pneumonia cannot be excluded.",
    "Interval resolution of the left pleural effusion.", "Moderate right pneumothorax with right chest tube in place.",
    "Without evidence of focal airspace disease, pleural effusion, or pneumothorax.",
    "Heart size is upper limits of normal.", "Possible small left pleural effusion.",
    "There is a 1.5 cm nodule in the right upper lobe.", "No acute osseous abnormality.",
    "Blunting of the right costophrenic angle could be secondary to a small effusion versus scarring.",
    "Mild interstitial edema has improved.", "No acute cardiopulmonary process.", "Healed left rib fractures.",
    "Lungs are hyperinflated with flattening of the diaphragms, consistent with COPD.",
    "Patchy opacity at the left base, likely atelectasis, although infection is not excluded.",
]
HEADERS = ["", "FINDINGS: ", "INDICATION: Cough, evaluate for pneumonia.\nFINDINGS: "]


def make_reports(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    reports = []
    for _ in range(n):
        body = " ".join(rng.sample(SENTENCES, rng.randint(4, 9)))
        impression = rng.choice(["", "\nIMPRESSION: No acute cardiopulmonary abnormality.",
                                 "\nIMPRESSION: Mild pulmonary edema."])
        reports.append(rng.choice(HEADERS) + body + impression)
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    start = time.perf_counter()
    labeler = CheXpertLabeler()
    print(f"build: {1000 * (time.perf_counter() - start):.1f} ms")
    reports = make_reports(args.reports)
    words = statistics.mean(len(r.split()) for r in reports)
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        labeler.label_many(reports)
        rates.append(len(reports) / (time.perf_counter() - start))
    print(f"{len(reports)} reports ({words:.0f} words on average), {args.repeats} runs: "
          f"median {statistics.median(rates):,.0f} reports/s, best {max(rates):,.0f} reports/s (one core)")


if __name__ == "__main__":
    main()
