"""Label a CSV column of reports and write the CheXpert labeler's output layout.

The output matches stanfordmlgroup/chexpert-labeler's ``labeled_reports.csv``: a ``Reports`` column, then the 14
observations in the labeler's order, one row per input row in input order, cells ``1.0`` / ``0.0`` / ``-1.0`` or
empty for blank. Files are read and written as UTF-8 with the ``csv`` module (quoted newlines inside reports work).

    python -m medvl.eval.chexpert_csv reports.csv report labeled.csv
"""
from __future__ import annotations

import argparse
import csv

from medvl.eval.chexpert import OBSERVATIONS, CheXpertLabeler


def label_csv(input_csv: str, column: str, output_csv: str) -> int:
    """Label ``column`` of ``input_csv`` into ``output_csv``; returns the number of rows written."""
    labeler = CheXpertLabeler()
    with open(input_csv, newline="", encoding="utf-8-sig") as source:
        reader = csv.DictReader(source)
        if column not in (reader.fieldnames or []):
            raise ValueError(f"column {column!r} not in {input_csv}; columns present: {reader.fieldnames or []}")
        reports = [row[column] or "" for row in reader]
    with open(output_csv, "w", newline="", encoding="utf-8") as target:
        writer = csv.writer(target)
        writer.writerow(("Reports",) + OBSERVATIONS)
        for report, labels in zip(reports, labeler.label_many(reports)):
            writer.writerow([report] + [_cell(labels[name]) for name in OBSERVATIONS])
    return len(reports)


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Label a CSV column of reports with the 14 CheXpert observations.")
    parser.add_argument("input_csv")
    parser.add_argument("column")
    parser.add_argument("output_csv")
    args = parser.parse_args()
    print(f"labelled {label_csv(args.input_csv, args.column, args.output_csv)} reports -> {args.output_csv}")


if __name__ == "__main__":
    main()
