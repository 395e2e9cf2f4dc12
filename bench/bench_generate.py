"""Benchmark generation: tokens/s with and without the KV cache, and a SQuAD evaluation's time.

The model has the CPU preset's shape (n_layer 4, n_head 4, n_embd 256, block_size 512) with
random weights (speed does not depend on them). Each prompt has --prompt-len tokens and is
continued by exactly --new-tokens greedy tokens (no stop token), so both paths do the same
work; the cache path feeds one token per step, the other re-runs the whole sequence.
Times are the median of --repeats runs; both paths must produce the same tokens.

With --ckpt (a finetuned model.pt), it also times evaluate.evaluate_task on the SQuAD
validation split: all of it, or the first --limit examples extrapolated to the whole split
(reported as an estimate).

    python bench/bench_generate.py                      # one thread, as the numbers in the docs
    python bench/bench_generate.py --ckpt out/finetune/model.pt --data-root ../shared/data --limit 200
Writes out/bench/generate.json.
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402
import tasks  # noqa: E402
from common import UserError, get_tokenizer, run_main, write_json  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from checkpoint import load_model  # noqa: E402
from runtime import setup_runtime  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ckpt", help="a finetuned checkpoint: also time SQuAD validation")
    p.add_argument("--data-root", help="local task data for --ckpt (default: the hub)")
    p.add_argument("--limit", type=int, help="time only the first N SQuAD examples and extrapolate")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size for --ckpt")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "bench", "generate.json"))
    return p.parse_args(argv)


def time_generate(model, prompts, new_tokens, use_cache, repeats):
    """(median seconds, tokens of the last run)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(prompts, new_tokens, stop_tokens=(), use_cache=use_cache)  # .tolist() syncs
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench_cache(args, device):
    torch.manual_seed(0)
    config = GPTConfig(block_size=512, n_layer=4, n_head=4, n_embd=256)
    if args.prompt_len + args.new_tokens > config.block_size:
        raise UserError(f"--prompt-len + --new-tokens must fit block_size {config.block_size}")
    model = GPT(config).to(device).eval()
    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(0, 50257, (batch, args.prompt_len)).tolist()
        model.generate(prompts, 4, stop_tokens=())  # warm-up
        row = {"batch": batch, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len}
        outputs = {}
        for use_cache in (True, False):
            seconds, outputs[use_cache] = time_generate(model, prompts, args.new_tokens, use_cache, args.repeats)
            key = "cache" if use_cache else "no_cache"
            row[f"{key}_s"] = round(seconds, 3)
            row[f"{key}_tokens_per_s"] = round(batch * args.new_tokens / seconds, 1)
        row["same_tokens"] = outputs[True] == outputs[False]
        row["speedup"] = round(row["no_cache_s"] / row["cache_s"], 2)
        print(f"batch {batch:>3}: cache {row['cache_tokens_per_s']:>9.1f} tok/s   no cache "
              f"{row['no_cache_tokens_per_s']:>9.1f} tok/s   speed-up {row['speedup']:.1f}x   "
              f"same tokens: {row['same_tokens']}", flush=True)
        rows.append(row)
    return {"model": {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 512, "weights": "random"},
            "repeats": args.repeats, "runs": rows}


def bench_squad(args, device):
    rt = setup_runtime(args.device, num_threads=args.threads)
    model, _ = load_model(args.ckpt, rt.device)
    rows = tasks.get_task("squad").load_rows("validation", args.data_root)
    total, timed = len(rows), rows[:args.limit] if args.limit else rows
    settings = evaluate.EvalSettings(batch_size=args.batch_size, data_root=args.data_root)
    start = time.perf_counter()
    result, _ = evaluate.evaluate_task(model, get_tokenizer(), "squad", timed, settings, rt.autocast)
    seconds = time.perf_counter() - start  # the baseline's scoring included, as a user waits for it
    estimate = len(timed) < total
    out = {"checkpoint": args.ckpt, "examples_timed": len(timed), "split_size": total,
           "seconds_timed": round(seconds, 2), "full_split_seconds": round(seconds * total / len(timed), 1),
           "full_split_is_estimate": estimate, "examples_per_s": result["examples_per_s"],
           "generated_tokens_per_s": result["generated_tokens_per_s"], "f1": result["scores"]["f1"]}
    label = f"ESTIMATE extrapolated from the first {len(timed)} examples" if estimate else "measured"
    print(f"SQuAD validation ({total} examples): {out['full_split_seconds'] / 60:.1f} min ({label}); "
          f"{out['examples_per_s']:.2f} ex/s, {out['generated_tokens_per_s']:.1f} generated tok/s, "
          f"F1 {out['f1']:.2f}")
    return out


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"generation benchmark: {args.new_tokens} new tokens after {args.prompt_len}-token prompts, "
          f"median of {args.repeats}, {args.threads} thread(s), {device}")
    report = {"threads": args.threads, "device": str(device), "generate": bench_cache(args, device)}
    if args.ckpt:
        report["squad_eval"] = bench_squad(args, device)
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
