"""Score a checkpoint on the finetuning tasks, beside a trivial baseline, and on web-text loss.

    python evaluate.py --task squad                        # the newest finetuned out/**/model.pt
    python evaluate.py --task squad --ckpt out/finetune/model.pt --data-root ../shared/data
    python evaluate.py --task all --ckpt out/pretrain/ckpt.pt --shots 3   # pretrained, few-shot
    python evaluate.py --task all --ckpt out/finetune/model.pt --limit 200 --constrained
    python evaluate.py --task cnn_dailymail --ckpt model.pt --num-beams 4 --no-repeat-ngram-size 3
    python evaluate.py --task cnn_dailymail --ckpt out/pretrain/ckpt.pt --protocol gpt2   # GPT-2's zero-shot
    python evaluate.py --task owt --ckpt out/pretrain/ckpt.pt --owt-bin data/owt/val.bin --limit 100

Prompts come only from Task.prompt (tasks.py), byte for byte the prompts of finetuning. Examples are
sorted by prompt length and decoded in batches (greedy by default; SQuAD also stops at a
newline). SST-2 compares the likelihoods of the two label words: nothing is parsed.
Baselines: Lead-3 (CNN/DM), the sentence sharing most words with the question (SQuAD), the
majority training label (SST-2); all scored by the same metrics.py code as the model.
owt: mean next-token loss and perplexity over non-overlapping block_size windows.

Each task is scored on its first eval split (CNN/DM: test; SQuAD, SST-2: validation) unless
--split says otherwise. --shots K (fewshot.py) puts K solved training examples before each prompt
(as many as fit the block); --shots 0 is zero-shot (CNN/DM in GPT-2's "TL;DR:" format); without
it the prompt is the finetuning one. --protocol gpt2 scores CNN/DM zero-shot as GPT-2's paper did
(top-k=2 sampling, the first 3 sentences; scoring.py), the protocol of its published anchor.
--limit N scores a seeded random sample of N examples, stratified by SQuAD article and by CNN/DM
source (subsets.py), never the first N; the metrics record the seed and a hash of the chosen ids.
Writes to --out (default <checkpoint folder>/eval): <task>_<split>_predictions.jsonl and
<task>_<split>_metrics.json (scores, baseline, sample, decoding settings, prompt truncation, shots,
batch size, checkpoint sha256, data source, tasks_version, speed). evaluate_task() is the same core
for use from Python.

    torchrun --standalone --nproc_per_node=8 evaluate.py --task all --ckpt out/full/finetune/model.pt

Under torchrun the processes share out the batches (batch i to process i % N) and process 0 writes
the files: the same predictions and metrics as one process, but for the timing fields
(scoring.TIMING_FIELDS). --batch-size auto (the default) fits the decoding batch to the GPU's
memory on the longest prompts; on the CPU and MPS, which report no memory, it is 16 prompts.
"""
import argparse
import hashlib
import json
import os
import sys
from dataclasses import replace

# common first: it sets OMP_WAIT_POLICY, which OpenMP reads once, as torch loads it
from common import EOT, UserError, atomic_path, get_tokenizer, run_main, write_json

import numpy as np
import torch.distributed as dist

import subsets
import tasks
from checkpoint import load_checkpoint, model_from_checkpoint
from corpus import documents
from data import open_tokens
from generation import compile_decoding, release_decoding_cache
from runtime import compile_blocker, setup_runtime
from scoring import (PROTOCOLS, EvalSettings, default_checkpoint, evaluate_owt, evaluate_task, owt_windows,
                     prompt_block_size, warn_if_not_finetuned_here)



def owt_tokens(args, enc, block_size):
    """Tokens of --owt-bin, or of the --owt-text documents (EOT after each; only as many as needed)."""
    if args.owt_bin:
        return open_tokens(args.owt_bin), args.owt_bin, os.path.splitext(os.path.basename(args.owt_bin))[0]
    need, ids = args.limit * block_size + 1 if args.limit else None, []
    for text in documents(args.owt_text):
        ids.extend(enc.encode_ordinary(text) + [EOT])
        if need and len(ids) >= need:
            break
    return np.asarray(ids, dtype=np.int64), args.owt_text, "text"


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def print_table(result):
    base, processes = result["baseline"], result["processes"]
    print(f"\n{result['task']} {result['split']}: {result['count']} examples in {result['wall_time_s']:.1f} s"
          + (f" on {processes} processes" if processes > 1 else "") + (f"; baseline: {base['name']}" if base else ""))
    print(f"  {'metric':<14}{'model':>10}{'baseline':>10}")
    for key, value in result["scores"].items():
        if isinstance(value, float):
            other = base["scores"].get(key) if base else None
            print(f"  {key:<14}{value:>10.2f}" + (f"{other:>10.2f}" if other is not None else f"{'-':>10}"))
    if "bleu_signature" in result["scores"]:
        print(f"  BLEU signature: {result['scores']['bleu_signature']}")


def compiled_decoding(model, args, rt):
    """Turn on compiled decoding (generation.compile_decoding) as --compile asks, where torch.compile
    can run and a probe decodes with it (one row, then two: the graph every later number of rows
    reuses); otherwise decode eager, with one line on why. Returns whether it is on."""
    if args.compile == "false" or (args.compile == "auto" and rt.device.type != "cuda"):
        return False
    blocker = compile_blocker(rt.device, rt.dtype)
    if not blocker:
        compile_decoding(model, cuda_graphs=args.cuda_graphs)
        try:
            with rt.autocast():
                for prompts in ([[0, 0]], [[0, 0], [0, 0, 0]]):
                    model.generate(prompts, 2, stop_tokens=())
            release_decoding_cache(model)
        except Exception as e:  # the step did not compile here: the eager decoder gives the same tokens
            model.compiled_decoding = None
            blocker = f"the compiled step failed a probe ({type(e).__name__}: {str(e).strip()[:120]})"
    if blocker and rt.master:
        print(f"--compile: decoding eager, {blocker}", flush=True)
    return not blocker


def batch_size(text):
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--batch-size must be auto or a number of prompts of at least 1, got {text!r}")
    return int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help=f"{' | '.join(tasks.TASKS)} | owt | all")
    p.add_argument("--ckpt", help="a training ckpt.pt or a finetuned model.pt (default: the newest "
                                   "model.pt under out/)")
    p.add_argument("--split", help="default: each task's own (CNN/DM test, SQuAD and SST-2 validation)")
    p.add_argument("--shots", type=int, help="K training examples before each prompt (0: zero-shot); "
                                             "default: the finetuning prompt alone")
    p.add_argument("--limit", type=int, help="score a seeded random sample of N examples, stratified by article "
                                             "(SQuAD) and by source (CNN/DM), in the split's order; owt: a seeded "
                                             "sample of N windows of --owt-bin (of --owt-text: of its first "
                                             "documents, as many as hold N windows)")
    p.add_argument("--sample-seed", type=int, default=subsets.SEED,
                   help="the --limit sample's seed (default %(default)s: the sample the reports use)")
    p.add_argument("--protocol", default="default", choices=PROTOCOLS,
                   help="gpt2: CNN/DM zero-shot as GPT-2 was scored (Radford et al. 2019): the article, "
                        "\"TL;DR:\", 100 tokens of top-k=2 sampling, the first 3 sentences kept")
    p.add_argument("--decoding-seed", type=int, default=0, help="seeds a sampling protocol's draws")
    p.add_argument("--batch-size", type=batch_size, default="auto",
                   help="prompts decoded at once; auto: the most that fit the GPU's memory (16 on CPU, MPS)")
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/eval)")
    p.add_argument("--data-root", help="local task data, e.g. ../shared/data (default: the hub)")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--constrained", action="store_true", help="SQuAD: only spans of the passage")
    p.add_argument("--max-new-tokens", type=int, help="default: each task's own")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (autocast)")
    p.add_argument("--compile", default="auto", choices=("auto", "true", "false"),
                   help="decode each new token with one compiled step over a static KV cache (auto: on CUDA, "
                        "where it saves hundreds of kernel launches a step; on the CPU it gains nothing)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="with compiled decoding, replay the step as a CUDA graph (not yet confirmed on a GPU)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--owt-bin", help="a prepared .bin of uint16 tokens (e.g. data/owt/val.bin)")
    src.add_argument("--owt-text", help="raw text: a file, folder or glob of .txt/.jsonl[.gz]/.parquet")
    args = p.parse_args(argv)
    valid = (*tasks.TASKS, "owt", "all")
    if args.task not in valid:
        raise UserError(f"unknown task {args.task!r}; valid tasks: {', '.join(valid)}")
    if args.shots is not None and args.shots < 0:
        raise UserError(f"--shots must be 0 (zero-shot) or more, got {args.shots}")
    for name in ("limit", "num_beams", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.no_repeat_ngram_size < 0:
        raise UserError("--no-repeat-ngram-size must be 0 (off) or more")
    if args.constrained and args.num_beams > 1:
        raise UserError("--constrained decoding is greedy; drop --num-beams")
    if args.task == "owt" and not (args.owt_bin or args.owt_text):
        raise UserError("--task owt needs --owt-bin PATH or --owt-text GLOB")
    if args.protocol == "gpt2":
        check_gpt2_protocol(args)
    return args


def check_gpt2_protocol(args):
    """GPT-2's protocol is zero-shot CNN/DM with its own decoding: --shots 0 is implied, the rest conflicts."""
    if args.task != "cnn_dailymail":
        raise UserError(f"--protocol gpt2 is GPT-2's summarization protocol; use it with --task cnn_dailymail, "
                        f"not {args.task}")
    if args.shots not in (None, 0):
        raise UserError(f"--protocol gpt2 is zero-shot; drop --shots {args.shots} (or give --shots 0)")
    given = [flag for flag, on in (("--num-beams", args.num_beams > 1), ("--constrained", args.constrained),
                                   ("--no-repeat-ngram-size", args.no_repeat_ngram_size > 0),
                                   ("--max-new-tokens", args.max_new_tokens is not None)) if on]
    if given:
        raise UserError(f"--protocol gpt2 fixes the decoding (100 tokens, top-k=2 sampling); drop {given[0]}")
    args.shots = 0


def main(argv=None):
    args = parse_args(argv)
    # under torchrun: this process's rank. The process group is joined only once the inputs are read
    # and checked, so that bad input is the same one-line error in every process, before any collective
    master = int(os.environ.get("RANK", "0")) == 0
    names = [args.task]
    if args.task == "all":
        names = list(tasks.TASKS) + (["owt"] if args.owt_bin or args.owt_text else [])
    args.ckpt = args.ckpt or default_checkpoint(master)
    ckpt = load_checkpoint(args.ckpt)
    data = {}  # every task's rows before the model: a data problem fails fast
    for name in (n for n in names if n != "owt"):
        task = tasks.get_task(name)
        split = args.split or task.eval_splits[0]
        if split not in task.splits:
            raise UserError(f"{name} has no split {split!r}; choose one of {', '.join(task.splits)}")
        if split in task.unlabelled_splits:
            raise UserError(f"{name} split {split!r} is unlabelled and cannot be scored; "
                            f"use {', '.join(task.eval_splits)}")
        if split not in task.eval_splits and master:
            print(f"warning: {name} split {split!r} is not an evaluation split "
                  f"({', '.join(task.eval_splits)})", file=sys.stderr)
        rows, sample = task.subset(task.load_rows(split, args.data_root), args.limit, args.sample_seed)
        data[name] = split, rows, task.source_name(split, args.data_root), sample
    model = model_from_checkpoint(ckpt, args.ckpt)
    block_size = prompt_block_size(ckpt, model, args.ckpt)
    version = ckpt.get("tasks_version")
    if master:
        warn_if_not_finetuned_here(version, args.ckpt, args.shots)
    del ckpt
    enc = get_tokenizer()
    if "owt" in names:
        data["owt"] = owt_tokens(args, enc, model.config.block_size)
        owt_windows(len(data["owt"][0]), model.config.block_size)  # too few tokens: an error now
    rt = setup_runtime(args.device, args.dtype)
    model = model.to(rt.device).eval()
    compiled = compiled_decoding(model, args, rt)
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval")
    settings = EvalSettings(batch_size=args.batch_size, num_beams=args.num_beams, shots=args.shots,
                            length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                            constrained=args.constrained, max_new_tokens=args.max_new_tokens, data_root=args.data_root,
                            prompt_block_size=block_size, protocol=args.protocol, decoding_seed=args.decoding_seed)
    common = {"checkpoint": {"path": os.path.abspath(args.ckpt), "sha256": file_sha256(args.ckpt)},
              "tasks_version": tasks.TASKS_VERSION, "checkpoint_tasks_version": version,
              "device": str(rt.device), "dtype": str(rt.dtype).removeprefix("torch."),
              "compiled_decoding": compiled} if rt.master else None
    for name in names:  # every process runs every task alike; process 0 gets the results and writes them
        if name == "owt":
            tokens, source, split = data["owt"]
            result = evaluate_owt(model, tokens, args.limit, rt.autocast, rt.rank, rt.world_size, seed=args.sample_seed)
            predictions = None
        else:
            split, rows, source, sample = data[name]
            result, predictions = evaluate_task(model, enc, name, rows, replace(settings, split=split), rt.autocast,
                                                rt.rank, rt.world_size)
            if rt.master:
                result["sample"] = sample
        if not rt.master:
            continue
        result.update(common, split=split, data_source=source)
        stem = os.path.join(out_dir, f"{name}_{split}")
        if predictions is not None:
            with atomic_path(stem + "_predictions.jsonl") as tmp, open(tmp, "w") as f:
                for pred in predictions:
                    f.write(json.dumps(pred) + "\n")
        write_json(stem + "_metrics.json", result)
        print_table(result)
    if rt.master:
        print(f"\nwrote {out_dir}")
    if rt.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
