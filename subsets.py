"""Representative subsets of evaluation data: `--limit N` scores a seeded random sample of N rows,
never the first N (the first 500 SQuAD dev questions are all one article, the first ~1,065 CNN/DM
test rows all CNN).

The sample is stratified: N is shared out over the strata (SQuAD: articles; CNN/DM: CNN vs Daily
Mail) in proportion to their sizes, by largest remainder (ties broken by the seeded generator),
then each stratum's rows are drawn without replacement by the same generator. The chosen rows
keep the split's order. The same seed and rows give the same sample on every machine (numpy's
PCG64 is platform independent). Rows without strata (key None) form one stratum: a plain seeded
random sample.

One function for every caller: evaluate.py (tasks.Task.subset), the owt windows of scoring.py and
the benchmarks that subsample.
"""
import hashlib
from collections import defaultdict

import numpy as np

SEED = 0  # evaluate.py --sample-seed's default: the sample every report uses


def stratified_indices(keys, n, seed=SEED):
    """Sorted indices of a seeded sample of min(n, len(keys)) items, proportionally stratified by
    keys (one hashable per item; equal keys share a stratum)."""
    if n >= len(keys):
        return list(range(len(keys)))
    strata = defaultdict(list)
    for i, key in enumerate(keys):
        strata[key].append(i)
    members = list(strata.values())  # in order of first appearance: independent of hashing
    rng = np.random.default_rng(seed)
    exact = np.array([n * len(m) / len(keys) for m in members])
    quota = np.floor(exact).astype(int)
    tiebreak = rng.permutation(len(members))
    by_remainder = sorted(range(len(members)), key=lambda s: (-(exact[s] - quota[s]), tiebreak[s]))
    for s in by_remainder[:n - int(quota.sum())]:
        quota[s] += 1
    chosen = [i for m, q in zip(members, quota) if q for i in rng.choice(m, size=q, replace=False)]
    return sorted(int(i) for i in chosen)


def ids_digest(ids):
    """blake2b (128-bit, hex) of the sorted ids, one per line: names a sample in a metrics file."""
    return hashlib.blake2b("\n".join(sorted(map(str, ids))).encode(), digest_size=16).hexdigest()


def describe(keys, chosen, ids, seed, stratified_by):
    """The record of a sample for a metrics JSON: how it was drawn and which ids it holds."""
    whole = len(chosen) == len(keys)
    strata = {k for k in keys if k is not None}
    out = {"rows": len(chosen), "of": len(keys), "method": "whole split" if whole else
           "seeded random sample, proportionally stratified" if strata else "seeded random sample",
           "seed": None if whole else seed, "stratified_by": stratified_by if strata and not whole else None,
           "ids_blake2b": ids_digest(ids)}
    if strata and not whole:
        out.update(strata=len(strata), strata_sampled=len({keys[i] for i in chosen} - {None}))
    return out
