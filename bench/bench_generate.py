"""Benchmark generation (--parts): tokens/s with and without the KV cache (cache), per-prompt vs
batched beam search (beam), eager vs compiled decoding (compiled), and the wall time of a
whole-split evaluation (eval).

The model has the CPU preset's shape (n_layer 4, n_head 4, n_embd 256, block_size 512), or with
--shape gpt2 GPT-2 124M's, with random weights (speed does not depend on them). Each prompt has
--prompt-len tokens and is continued by exactly --new-tokens greedy tokens (no stop token), so
both paths do the same work; the cache path feeds one token per step, the other re-runs the whole sequence.
Times are the median of --repeats runs; both paths must produce the same tokens.

Beam part: --num-beams beams (n-gram blocking 3, as the gpu preset evaluates) over prompts of
--beam-prompt-len/2 to --beam-prompt-len tokens, --beam-new-tokens new tokens, one prompt at a
time (generation.beam_search, the reference) and all of a batch at once
(batched_beam_search), alternated, median of --repeats; examples/s and whether they agree.

Compiled part: the same model eager and with generation.compile_decoding (--cuda-graphs: also
CUDA graphs), on the same prompts, alternated, median of --repeats: greedy at each --batch-sizes
(--prompt-len, --new-tokens) and beam search at each --beam-batch-sizes (as the beam part), no
stop token so that every run takes all its steps; tokens/s count prompts x new tokens. The first
call of each shape is timed apart (it compiles); both must give the same tokens.

Eval part: scoring.evaluate_task on each task's scored split, greedy and with --eval-beams
beams (n-gram blocking 3), with --ckpt or else random weights of --shape (never
an EOT, so every example generates the task's whole max_new_tokens: an upper bound). All of a
split, or a sample of --limit examples (evaluate.py's seeded stratified sample) extrapolated to the
whole split (reported as an estimate); --per-prompt-too also times beam runs with the one-prompt-at-a-time search.

    python bench/bench_generate.py                      # one thread, as the numbers in the docs
    python bench/bench_generate.py --parts beam --repeats 3
    python bench/bench_generate.py --parts compiled --repeats 3
    python bench/bench_generate.py --parts compiled --device cuda --shape gpt2 --cuda-graphs   # on a GPU
    python bench/bench_generate.py --parts eval --data-root ../shared/data --limit 32 --per-prompt-too
Writes out/bench/generate.json.
"""
import argparse
import copy
import os
import statistics
import sys
import time
from unittest import mock

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import scoring  # noqa: E402
from generation import batched_beam_search, beam_search, compile_decoding  # noqa: E402
import tasks  # noqa: E402
from common import UserError, get_tokenizer, run_main, write_json  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from checkpoint import load_model  # noqa: E402
from runtime import setup_runtime  # noqa: E402


SHAPES = {"cpu": dict(block_size=512, n_layer=4, n_head=4, n_embd=256),
          "gpt2": dict(block_size=1024, n_layer=12, n_head=12, n_embd=768)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--parts", nargs="+", default=["cache", "beam"], choices=["cache", "beam", "compiled", "eval"])
    p.add_argument("--cuda-graphs", action="store_true", help="compiled: also CUDA graphs (mode reduce-overhead)")
    p.add_argument("--shape", default="cpu", choices=list(SHAPES),
                   help="the random-weight model's shape: the CPU preset's or GPT-2 124M's (the gpu preset's)")
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--beam-batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--beam-prompt-len", type=int, default=128)
    p.add_argument("--beam-new-tokens", type=int, default=32)
    p.add_argument("--ckpt", help="eval: a finetuned checkpoint (default: random weights of --shape)")
    p.add_argument("--data-root", help="eval: local task data (default: the hub)")
    p.add_argument("--tasks", nargs="+", default=["all"], help="eval: tasks to time")
    p.add_argument("--eval-beams", type=int, nargs="+", default=[1, 4], help="eval: 1 is greedy")
    p.add_argument("--limit", type=int, help="eval: time evaluate.py's --limit sample of N examples of each split "
                                             "and extrapolate")
    p.add_argument("--per-prompt-too", action="store_true",
                   help="eval: also time beam runs with the per-prompt reference search, as evaluate.py did before")
    p.add_argument("--batch-size", type=int, default=16, help="eval: evaluation batch size")
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
    print(f"cache: {args.new_tokens} new tokens after {args.prompt_len}-token prompts")
    model = bench_model(device, args.shape)
    if args.prompt_len + args.new_tokens > model.config.block_size:
        raise UserError(f"--prompt-len + --new-tokens must fit block_size {model.config.block_size}")
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
    return {"model": {"shape": args.shape, **SHAPES[args.shape], "weights": "random"}, "repeats": args.repeats,
            "runs": rows}


def bench_model(device, shape="cpu"):
    torch.manual_seed(0)
    return GPT(GPTConfig(**SHAPES[shape])).to(device).eval()


def bench_beam(args, device):
    """Per-prompt vs batched beam search on the same prompts, alternated so both see the same load."""
    model, gen = bench_model(device, args.shape), torch.Generator().manual_seed(0)
    search = dict(num_beams=args.num_beams, max_new_tokens=args.beam_new_tokens, no_repeat_ngram_size=3)
    rows = []
    for batch in args.beam_batch_sizes:
        lengths = torch.randint(args.beam_prompt_len // 2, args.beam_prompt_len + 1, (batch,), generator=gen)
        prompts = [torch.randint(0, 50257, (int(n),), generator=gen).tolist() for n in lengths]
        times, outputs = {"per_prompt": [], "batched": []}, {}
        for _ in range(args.repeats):
            start = time.perf_counter()
            outputs["per_prompt"] = [beam_search(model, p, **search) for p in prompts]
            times["per_prompt"].append(time.perf_counter() - start)
            start = time.perf_counter()
            outputs["batched"] = batched_beam_search(model, prompts, **search)
            times["batched"].append(time.perf_counter() - start)
        row = {"batch": batch, **{f"{k}_s": round(statistics.median(v), 3) for k, v in times.items()}}
        row.update({f"{k}_examples_per_s": round(batch / row[f"{k}_s"], 3) for k in times},
                   speedup=round(row["per_prompt_s"] / row["batched_s"], 2),
                   same_outputs=sum(a == b for a, b in zip(outputs["per_prompt"], outputs["batched"])))
        print(f"beam {args.num_beams}, batch {batch:>3}: per prompt {row['per_prompt_examples_per_s']:>7.2f} ex/s   "
              f"batched {row['batched_examples_per_s']:>7.2f} ex/s   speed-up {row['speedup']:.1f}x   "
              f"same output for {row['same_outputs']}/{batch}", flush=True)
        rows.append(row)
    return {"num_beams": args.num_beams, "no_repeat_ngram_size": 3, "new_tokens": args.beam_new_tokens,
            "prompt_len": [args.beam_prompt_len // 2, args.beam_prompt_len], "repeats": args.repeats, "runs": rows}


def bench_compiled(args, device):
    """Eager against compiled decoding, greedy and beam search, on the same prompts, alternated."""
    eager, gen = bench_model(device, args.shape), torch.Generator().manual_seed(0)
    if args.prompt_len + args.new_tokens > eager.config.block_size:
        raise UserError(f"--prompt-len + --new-tokens must fit block_size {eager.config.block_size}")
    fast = compile_decoding(copy.deepcopy(eager), cuda_graphs=args.cuda_graphs)
    cases = []
    for batch in args.batch_sizes:
        prompts = torch.randint(0, 50257, (batch, args.prompt_len), generator=gen).tolist()
        cases.append(("greedy", batch, args.new_tokens, lambda m, p=prompts, n=args.new_tokens:
                      m.generate(p, n, stop_tokens=())))
    for batch in args.beam_batch_sizes:
        lengths = torch.randint(args.beam_prompt_len // 2, args.beam_prompt_len + 1, (batch,), generator=gen)
        prompts = [torch.randint(0, 50257, (int(n),), generator=gen).tolist() for n in lengths]
        cases.append((f"beam {args.num_beams}", batch, args.beam_new_tokens, lambda m, p=prompts:
                      batched_beam_search(m, p, args.num_beams, args.beam_new_tokens, no_repeat_ngram_size=3,
                                          stop_tokens=())))
    rows = []
    for search, batch, new_tokens, decode in cases:
        start = time.perf_counter()
        decode(fast)  # compiles the first time a number of rows is seen
        first_call_s = time.perf_counter() - start
        times, outputs = {"eager": [], "compiled": []}, {}
        for _ in range(args.repeats):
            for name, model in (("eager", eager), ("compiled", fast)):
                start = time.perf_counter()
                outputs[name] = decode(model)
                times[name].append(time.perf_counter() - start)
        row = {"search": search, "batch": batch, "new_tokens": new_tokens,
               "compiled_first_call_s": round(first_call_s, 1)}
        for name, seconds in times.items():
            row[f"{name}_s"] = round(statistics.median(seconds), 3)
            row[f"{name}_tokens_per_s"] = round(batch * new_tokens / statistics.median(seconds), 1)
        row["speedup"] = round(row["eager_s"] / row["compiled_s"], 2)
        row["same_tokens"] = sum(a == b for a, b in zip(outputs["eager"], outputs["compiled"]))
        print(f"{search}, batch {batch:>3}: eager {row['eager_tokens_per_s']:>8.1f} tok/s   compiled "
              f"{row['compiled_tokens_per_s']:>8.1f} tok/s   ratio {row['speedup']:.2f}x   same tokens for "
              f"{row['same_tokens']}/{batch}   (first compiled call {first_call_s:.0f} s)", flush=True)
        rows.append(row)
    return {"cuda_graphs": args.cuda_graphs, "repeats": args.repeats, "runs": rows}


def per_prompt_search(model, prompts, *args):
    """The reference: beam_search one prompt at a time (the batched search's signature)."""
    return [beam_search(model, p, *args) for p in prompts]


def time_eval(model, enc, task, rows, settings, rt, search=None):
    """evaluate_task's decoding seconds (the baseline's scoring not included), with `search` in
    place of the batched beam search if given."""
    with mock.patch.object(scoring, "batched_beam_search", search or batched_beam_search):
        return scoring.evaluate_task(model, enc, task, rows, settings, rt.autocast)[0]["wall_time_s"]


def bench_eval(args, device):
    """Decoding time of each task's scored split, extrapolated from --limit examples."""
    rt = setup_runtime(args.device, num_threads=args.threads)
    model = load_model(args.ckpt, rt.device)[0] if args.ckpt else bench_model(rt.device, args.shape)
    enc, runs = get_tokenizer(), []
    for task in tasks.task_list(",".join(args.tasks)):
        name, split = task.name, task.eval_splits[0]
        rows = task.load_rows(split, args.data_root)
        timed = task.subset(rows, args.limit)[0]
        for beams in (args.eval_beams if not task.label_words else [1]):  # labels are scored, not decoded
            settings = scoring.EvalSettings(split=split, batch_size=args.batch_size, data_root=args.data_root,
                                             num_beams=beams, no_repeat_ngram_size=3 if beams > 1 else 0)
            searches = {"batched": None} | ({"per_prompt": per_prompt_search} if args.per_prompt_too and beams > 1
                                            else {})
            for search, fn in searches.items():
                timed_s = time_eval(model, enc, task, timed, settings, rt, fn)
                seconds = timed_s * len(rows) / len(timed)
                runs.append({"task": name, "split": split, "num_beams": beams, "search": search,
                             "labels_scored": bool(task.label_words), "examples_timed": len(timed),
                             "split_size": len(rows), "seconds_timed": timed_s, "full_split_seconds": round(seconds, 1),
                             "full_split_is_estimate": len(timed) < len(rows)})
                label = f"ESTIMATE from a sample of {len(timed)}" if len(timed) < len(rows) else "measured"
                print(f"{name} {split} ({len(rows)} examples), {'greedy' if beams == 1 else f'beam {beams}'}"
                      f"{'' if beams == 1 else f' ({search})'}: {seconds / 60:.1f} min ({label}); "
                      f"{len(timed) / timed_s:.2f} ex/s", flush=True)
    for beams in args.eval_beams:
        total = sum(r["full_split_seconds"] for r in runs if (r["num_beams"] == beams or r["labels_scored"])
                    and r["search"] == "batched")
        print(f"all tasks, {'greedy' if beams == 1 else f'beam {beams}'}: {total / 60:.1f} min")
    return {"checkpoint": args.ckpt or f"random weights, {args.shape} shape", "batch_size": args.batch_size,
            "runs": runs}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"generation benchmark: {', '.join(args.parts)}; median of {args.repeats}, {args.threads} thread(s), "
          f"{device}")
    report = {"threads": args.threads, "device": str(device)}
    parts = {"cache": bench_cache, "beam": bench_beam, "compiled": bench_compiled, "eval": bench_eval}
    for part in args.parts:
        report[part] = parts[part](args, device)
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
