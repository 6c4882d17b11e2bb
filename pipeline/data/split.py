"""Stratified, grouped train/val/test split.

Rows are grouped (rows sharing a source id, or identical content, form one group), each group
gets one stratum (its defect class, or "normal"), and the groups of each stratum are shuffled
with a generator seeded by (seed, stratum) and cut by the split fractions. So:
  * no source is in two splits;
  * every class is represented in every split whose fraction is > 0;
  * adding images to one class never moves another class's images.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict

import numpy as np

from pipeline.errors import DataError

SPLITS = ("train", "val", "test")


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb))      # deterministic representative
            self.parent[hi] = lo


def split_counts(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Groups per split for a stratum of n groups: at least one in every split with fraction > 0."""
    counts = {}
    for name in ("val", "test"):
        f = fractions[name]
        counts[name] = 0 if f <= 0 else max(1, int(math.floor(n * f + 0.5)))
    counts["train"] = n - counts["val"] - counts["test"]
    while counts["train"] < 1:
        name = "val" if counts["val"] >= counts["test"] else "test"
        counts[name] -= 1
        counts["train"] += 1
    return counts


def needed_groups(fractions: dict[str, float]) -> int:
    return sum(1 for s in SPLITS if fractions[s] > 0)


def assign_splits(groups: dict[str, str], images_per_stratum: dict[str, int], fractions: dict[str, float],
                  seed: int, what: dict[str, str] | None = None,
                  lenient: frozenset[str] = frozenset()) -> dict[str, str]:
    """{group: stratum} -> {group: split}. Raises DataError when a stratum is too small.

    Strata in `lenient` never raise: a too-small one fills train, then val, then test.

    `what` optionally describes a stratum for messages (e.g. "class 'scratch' (folder scratch/)").
    """
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for g, s in groups.items():
        by_stratum[s].append(g)
    need = needed_groups(fractions)
    out: dict[str, str] = {}
    for stratum in sorted(by_stratum):
        members = sorted(by_stratum[stratum])
        n = len(members)
        if n < need and stratum in lenient:
            counts = {name: 0 for name in SPLITS}
            for name in [s for s in SPLITS if fractions[s] > 0][:n]:
                counts[name] = 1
        elif n < need:
            desc = (what or {}).get(stratum, f"class '{stratum}'")
            nonzero = [s for s in SPLITS if fractions[s] > 0]
            raise DataError(
                f"{desc} has {images_per_stratum.get(stratum, n)} usable image(s) from {n} distinct source(s), "
                f"but prepare.split (train {fractions['train']:g} / val {fractions['val']:g} / test "
                f"{fractions['test']:g}) needs at least {need}: one source in each of {', '.join(nonzero)}. "
                f"Add more images of this class, or set prepare.split.val / prepare.split.test to 0.")
        else:
            counts = split_counts(n, fractions)
        rng = np.random.default_rng([seed, zlib.crc32(stratum.encode())])
        order = [members[i] for i in rng.permutation(n)]
        start = 0
        for name in SPLITS:
            for g in order[start:start + counts[name]]:
                out[g] = name
            start += counts[name]
    return out
