"""What finetuning batches are made of, on real prepared data: the share of the packed examples
each task gets (drawn at the calibrated probabilities, and at the raw weights for comparison),
the share of the task loss each task carries when the loss is averaged per example or per target
token (each example, or target token, weighs the same in every batch: 1 / the calibration's
expected count per micro-batch, data.FinetuneMixture), and the share of positions that carry loss.

    python bench/bench_mix.py --finetune-dir data/finetune_512 --block-size 512 --batch-size 4
Writes out/bench/mix.json.
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import tasks  # noqa: E402
from common import run_main, write_json  # noqa: E402
from data import FinetuneMixture, batch_rng  # noqa: E402

NAMES = ("cnn_dailymail", "squad", "sst2")


def example_shares(mix, probs, examples):
    counts, k = np.zeros(len(NAMES)), 0
    while counts.sum() < examples:
        counts += np.bincount([p[2] for p in mix.layout(batch_rng(1, k), probs)[0]], minlength=len(NAMES))
        k += 1
    return counts / counts.sum()


def loss_shares(mix, batches):
    """Share of the loss weight on each task's targets; a document's task is read from its first token."""
    first = {int(s.example(0)[0][0]): k for k, s in enumerate(mix.splits)}
    shares, carrying = np.zeros(len(NAMES)), 0.0
    for step in range(batches):
        x, _, rows, weights, positions = mix.batch(step, 0)
        weight = np.zeros(x.numel())
        np.add.at(weight, rows.numpy(), weights.numpy())
        doc = np.cumsum((positions == 0).numpy().reshape(-1)) - 1
        per_doc = np.bincount(doc, weights=weight)
        starts = x.numpy().reshape(-1)[positions.numpy().reshape(-1) == 0]
        for token, w in zip(starts, per_doc):
            if token in first:
                shares[first[token]] += w
        carrying += float((weights > 0).sum()) / x.numel()
    return shares / shares.sum(), carrying / batches


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--finetune-dir", default="data/finetune_512")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--weights", default="6543,20000,20000",
                   help="cnn_dailymail,squad,sst2 (default: the train sizes capped at mix_cap, select held out)")
    p.add_argument("--examples", type=int, default=100000, help="packed examples per share (sd ~0.15 points)")
    p.add_argument("--batches", type=int, default=3000, help="batches for the loss shares")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "bench", "mix.json"))
    args = p.parse_args()
    splits = {n: tasks.FinetuneSplit(os.path.join(args.finetune_dir, n, "train")) for n in NAMES}
    weights = dict(zip(NAMES, map(float, args.weights.split(","))))
    result = {"args": vars(args)}
    for average in ("example", "token"):
        mix = FinetuneMixture(splits, weights, args.block_size, args.batch_size, seed=0, average=average)
        result[f"loss_share_{average}"], result["loss_positions"] = loss_shares(mix, args.batches)
    result["weights"] = mix.weights
    result["examples_calibrated"] = example_shares(mix, mix.probs, args.examples)
    result["examples_raw_weights"] = example_shares(mix, mix.weights, args.examples)
    print(f"{'':<34}" + "".join(f"{n:>15}" for n in NAMES))
    for key in ("weights", "examples_calibrated", "examples_raw_weights", "loss_share_example", "loss_share_token"):
        print(f"{key:<34}" + "".join(f"{v:>15.1%}" for v in result[key]))
    print(f"positions carrying loss: {result['loss_positions']:.1%}; per micro-batch on average "
          f"{mix.expected['examples']:.1f} examples, {mix.expected['targets']:.0f} target tokens")
    result["expected_per_micro_batch"] = mix.expected
    write_json(args.out, {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in result.items()})


if __name__ == "__main__":
    run_main(main)
