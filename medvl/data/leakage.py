"""Which splits each group (patient, study, image) landed in, and what to do when one lands in two.

A group in two splits is leakage: the model is tested on a patient (or an image) it was trained on. Splits
that prepare assigns never leak (a group's split is a hash of the group); only a dataset's own split can. Two
policies (``data.leakage_check``):

* ``refuse`` (default): the first group seen in a second split aborts prepare, naming the group and the option.
* ``report``: keep the dataset's own split as published and record the overlap: per pair of splits, how many
  groups they share and how many rows of each split belong to those groups. Some benchmarks split questions,
  not images: VQA-RAD's official test questions are all about training images, and reproducing published
  numbers needs that split as it is.

``report`` keeps a row count per (group, split), a few dozen bytes per group; ``refuse`` only a split per group.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations

from medvl.data.records import SPLITS

POLICIES = ("refuse", "report")


class LeakageError(RuntimeError):
    """The same patient/study group would land in two splits."""


class GroupSplits:
    def __init__(self, policy: str = "refuse"):
        if policy not in POLICIES:
            raise ValueError(f"leakage_check: expected one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.first_split: dict[str, str] = {}
        self.rows: Counter[tuple[str, str]] = Counter()  # (group, split) → rows; report only

    def add(self, group: str, split: str) -> None:
        previous = self.first_split.setdefault(group, split)
        if self.policy == "report":
            self.rows[(group, split)] += 1
        elif previous != split:
            raise LeakageError(
                f"group {group!r} (patient/study) is in both {previous!r} and {split!r}: refusing to write a "
                "leaking split (set data.leakage_check: report to keep the dataset's own split and record the "
                "overlap in the manifest)"
            )

    def splits_of(self) -> dict[str, set[str]]:
        splits: dict[str, set[str]] = defaultdict(set)
        if self.policy == "report":
            for group, split in self.rows:
                splits[group].add(split)
        else:
            for group, split in self.first_split.items():
                splits[group].add(split)
        return splits

    def groups_per_split(self) -> dict[str, int]:
        counts: Counter = Counter(split for splits in self.splits_of().values() for split in splits)
        return {split: counts.get(split, 0) for split in SPLITS}

    def overlap(self) -> dict:
        """{"check", "groups" (in more than one split), "pairs": {"train/test": {"groups", "rows": {split: n}}}}."""
        pairs: dict[str, dict] = {}
        shared = 0
        for group, splits in self.splits_of().items():
            if len(splits) < 2:
                continue
            shared += 1
            for a, b in combinations(sorted(splits, key=SPLITS.index), 2):
                pair = pairs.setdefault(f"{a}/{b}", {"groups": 0, "rows": {a: 0, b: 0}})
                pair["groups"] += 1
                pair["rows"][a] += self.rows[(group, a)]
                pair["rows"][b] += self.rows[(group, b)]
        return {"check": self.policy, "groups": shared, "pairs": pairs}


def describe_overlap(overlap: dict) -> str:
    """One line for the log, e.g. "203 groups in two splits: train/test 203 groups (train 1,790 rows, test 451)"."""
    if not overlap.get("groups"):
        return "no group is in two splits"
    pairs = "; ".join(
        f"{name} {pair['groups']} groups (" + ", ".join(f"{s} {n:,} rows" for s, n in pair["rows"].items()) + ")"
        for name, pair in overlap["pairs"].items()
    )
    return f"{overlap['groups']} groups are in more than one split: {pairs}"
