"""Score checkpoints side by side the way evaluation sees them: each validation example alone,
from position 0, with the prompt prepared for finetuning.

For each checkpoint it prints
  <task> loss   mean loss per target token (target + EOT) over --limit validation examples of
                each task in --finetune-dir: evaluate.py's seeded sample, stratified by SQuAD
                article and CNN/DM source (drawn from the raw rows, from --data-root or the hub)
  sst2 acc      accuracy over every SST-2 validation example, by the likelihood of the two label
                words (as evaluate.py scores it)
  owt loss      mean next-token loss over non-overlapping block_size windows of --owt-bin

    python bench/bench_objective.py out/pre/ckpt.pt out/ft_old/model.pt out/ft_new/model.pt \\
        --finetune-dir data/finetune_512 --owt-bin data/owt/val.bin --limit 200 --data-root ../shared/data
Writes out/bench/objective.json.
"""
import argparse
import os
import sys

import numpy as np
import torch
from torch.nn import functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import tasks  # noqa: E402
from checkpoint import load_model  # noqa: E402
from common import UserError, get_tokenizer, run_main, write_json  # noqa: E402
from data import open_tokens  # noqa: E402
from generation import label_logprobs  # noqa: E402


def sampled_examples(name, split, limit, data_root):
    """Indices into a prepared validation split of the --limit sample. prepare_finetune.py writes
    row i of the raw split as example i, so the sample is drawn from the raw rows' strata."""
    task = tasks.get_task(name)
    rows = task.load_rows("validation", data_root, limit=len(split))
    if len(rows) != len(split):
        raise UserError(f"the prepared {name} validation split has {len(split)} examples but the raw one "
                        f"{len(rows)}; prepare it again from the same data (--data-root)")
    return task.sample_indices(rows, limit)


@torch.no_grad()
def target_loss(model, split, examples):
    total, count = 0.0, 0
    for i in examples:
        tokens, prompt_len = split.example(i)
        x = torch.from_numpy(tokens[None])
        logits, _ = model(x[:, :-1], all_logits=True)
        losses = F.cross_entropy(logits[0, prompt_len - 1:].float(), x[0, prompt_len:], reduction="sum")
        total, count = total + losses.item(), count + len(tokens) - prompt_len
    return total / count


@torch.no_grad()
def sst2_accuracy(model, split, enc):
    labels = [enc.encode_ordinary(w) for w in tasks.get_task("sst2").label_words]
    correct = 0
    for start in range(0, len(split), 64):
        rows = [split.example(i) for i in range(start, min(start + 64, len(split)))]
        scores = label_logprobs(model, [t[:p].tolist() for t, p in rows], labels)
        truth = [next(k for k, label in enumerate(labels) if t[p:p + len(label)].tolist() == label) for t, p in rows]
        correct += int((scores.argmax(1) == torch.tensor(truth)).sum())
    return correct / len(split)


@torch.no_grad()
def owt_loss(model, tokens):
    T = model.config.block_size
    n = (len(tokens) - 1) // T
    windows = torch.from_numpy(np.asarray(tokens[:n * T + 1], dtype=np.int64))
    losses = [model(windows[k * T:(k + 1) * T][None], targets=windows[k * T + 1:(k + 1) * T + 1][None])[1].item()
              for k in range(n)]
    return float(np.mean(losses))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+")
    p.add_argument("--finetune-dir", default="data/finetune_512")
    p.add_argument("--owt-bin", default="data/owt/val.bin")
    p.add_argument("--limit", type=int, default=200, help="examples per task for the target losses (a seeded "
                                                          "stratified sample, as evaluate.py --limit draws)")
    p.add_argument("--data-root", help="the raw task data the sample is drawn from (default: the hub)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "out", "bench", "objective.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    enc, owt = get_tokenizer(), open_tokens(args.owt_bin)
    names = ("cnn_dailymail", "squad", "sst2")
    splits = {n: tasks.FinetuneSplit(os.path.join(args.finetune_dir, n, "validation")) for n in names}
    samples = {n: sampled_examples(n, s, args.limit, args.data_root) for n, s in splits.items()}
    results = {}
    print(f"{'checkpoint':<32}" + "".join(f"{n + ' loss':>20}" for n in names) + f"{'sst2 acc':>10}{'owt loss':>10}")
    for path in args.ckpts:
        model = load_model(path)[0]
        row = {f"{n}_loss": target_loss(model, s, samples[n]) for n, s in splits.items()}
        row.update(sst2_acc=sst2_accuracy(model, splits["sst2"], enc), owt_loss=owt_loss(model, owt))
        results[path] = row
        print(f"{path:<32}" + "".join(f"{row[n + '_loss']:>20.3f}" for n in names)
              + f"{row['sst2_acc']:>10.3f}{row['owt_loss']:>10.3f}", flush=True)
    write_json(args.out, {"args": vars(args), "results": results})


if __name__ == "__main__":
    run_main(main)
