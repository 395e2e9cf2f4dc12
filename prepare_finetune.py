"""Tokenize the finetuning tasks (CNN/DailyMail, SQuAD v1.1, SST-2) into flat token files.

    python prepare_finetune.py [--tasks cnn_dailymail,squad,sst2] [--splits train,validation]
        [--data-root DIR] [--out-dir data/finetune] [--block-size 1024] [--limit N] [--num-proc K]

Prompts and targets come from tasks.py (the same code evaluate.py uses). For each task and split:

    <out-dir>/<task>/<split>.bin      np.uint16 tokens: each example's prompt ids then its target
                                      ids (ending with EOT), examples back to back
    <out-dir>/<task>/<split>.idx.npy  np.int64, shape (N, 3), one row per example:
                                      [offset of its first token in .bin, prompt_len, length]
                                      (length = prompt_len + target_len; the loss goes on
                                      tokens[prompt_len:length], i.e. target + EOT)
    <out-dir>/<task>/meta.json        tasks_version, block_size, tokenizer, per-split figures and
                                      how the selection slice was chosen

Preparing train also writes select (tasks.SELECTION_SPLIT): a slice held out of train, which
finetune.py chooses model.pt on, so that no reported split (Task.eval_splits) ever steers
training. It takes whole texts (Task.holdout_key: an article, a SQuAD passage with all its
questions, a sentence) in the order of their blake2b hashes until it holds 5% of the train rows
or 500 examples, whichever is fewer (the last text whole, so a few more): the same slice whatever
the order of the rows. Its examples are not in train, and a text that is also in a reported split
is never selected on (with --limit: in that split's first N rows).

Every example fits: prompt_len + target_len <= block_size. tasks.FinetuneSplit(prefix) reads a
split. Files are written atomically, meta.json last; a meta.json from an earlier run with the
same tasks_version, block size and tokenizer keeps its other splits. Rows are tokenized in a
process pool (imap keeps the order), so the output is the same for any --num-proc. Without
--data-root the data comes from the Hugging Face hub. Unlabelled splits (SST-2 test) and
splits a task does not have are skipped with a note.
"""
import argparse
import hashlib
import json
import os
import time
import multiprocessing as mp

import numpy as np
from tqdm import tqdm

import tasks
from common import UserError, atomic_path, check_worker, get_tokenizer, guarded_init, run_main, write_json

_ENC = None
SELECT_FRACTION, SELECT_MAX = 0.05, 500  # the selection slice: 5% of the train rows, or 500 if fewer


def _init_worker():
    global _ENC
    _ENC = get_tokenizer()


def _encode(job):
    """Worker: (task, row, block_size) -> (token bytes, prompt_len, input_cut, target_cut)."""
    check_worker()
    task, row, block_size = job
    ex = task.encode_example(row, _ENC, block_size)
    tokens = np.array(ex["prompt"] + ex["target"], dtype=np.uint16)
    return tokens.tobytes(), len(ex["prompt"]), ex["input_cut"], ex["target_cut"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="all", help=f"comma-separated task names ({', '.join(tasks.TASKS)}) or all")
    p.add_argument("--splits", default="train,validation", help="comma-separated split names")
    p.add_argument("--data-root", default=None, help="folder with <task>/<split>.jsonl.gz (default: the hub)")
    p.add_argument("--out-dir", default="data/finetune")
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--limit", type=int, default=None, help="at most N rows per split (smoke tests)")
    p.add_argument("--num-proc", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    return p.parse_args(argv)


def check_rows(task, rows, source):
    """Fail early, naming the row, on anything the workers would trip over."""
    for i, row in enumerate(rows):
        try:
            task.training_target(row)
            for text in task.inputs(row):
                if not isinstance(text, str):
                    raise UserError(f"an input is {type(text).__name__}, not text")
        except UserError as e:
            raise UserError(f"{task.name}: {source} row {i + 1}: {e}")
        except (AttributeError, TypeError, KeyError, IndexError) as e:
            raise UserError(f"{task.name}: {source} row {i + 1} is malformed ({type(e).__name__}: {e}); fix the data")


def blake2b(text, size=8):
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def reported_keys(task, args):
    """The holdout keys of the texts in every split a task is scored on, and those splits' names."""
    keys, names = set(), []
    for split in task.eval_splits:
        if split in task.unlabelled_splits:
            continue
        if args.data_root and task.local_file(split, args.data_root) is None:
            print(f"note: {task.name} has no {split!r} file under {args.data_root}; the selection slice is not "
                  f"checked against it")
            continue
        keys.update(task.holdout_key(row) for row in task.load_rows(split, args.data_root, args.limit))
        names.append(split)
    return keys, names


def hold_out(task, rows, reported, reported_splits):
    """(train rows, selection rows, record of the selection): whole texts in blake2b order, skipping the
    texts of a reported split, until the slice holds SELECT_FRACTION of the rows or SELECT_MAX if fewer."""
    groups = {}
    for row in rows:
        groups.setdefault(task.holdout_key(row), []).append(row)
    want = min(SELECT_MAX, max(1, round(SELECT_FRACTION * len(rows))))
    chosen, select = set(), []
    for _, key in sorted((blake2b(key), key) for key in groups if key not in reported):
        if len(select) >= want:
            break
        chosen.add(key)
        select += sorted(groups[key], key=task.example_id)  # an order of its own, not the rows'
    train = [row for row in rows if task.holdout_key(row) not in chosen]
    if not select or not train:
        raise UserError(f"{task.name}: {len(rows)} train rows are too few to hold out a selection slice and still "
                        f"train on the rest; raise --limit")
    ids = sorted(task.example_id(row) for row in select)
    return train, select, {
        "split": tasks.SELECTION_SPLIT, "from": "train", "examples": len(select), "texts": len(chosen),
        "rule": f"whole texts (Task.holdout_key) in blake2b order until {SELECT_FRACTION:.0%} of the train rows "
                f"or {SELECT_MAX} examples are held, whichever is fewer",
        "reported_splits": reported_splits, "reported_texts_skipped": sum(key in reported for key in groups),
        "ids_blake2b": blake2b("\n".join(ids), 16)}


def prepare_split(task, split, rows, args, pool):
    prefix = os.path.join(args.out_dir, task.name, split)
    index = np.zeros((len(rows), 3), dtype=np.int64)
    offset = target_tokens = n_input_cut = tokens_cut = max_cut = n_target_cut = 0
    jobs = ((task, row, args.block_size) for row in rows)
    results = pool.imap(_encode, jobs, chunksize=64) if pool is not None else map(_encode, jobs)
    with atomic_path(prefix + ".bin") as tmp_bin:
        with open(tmp_bin, "wb") as f:
            for i, (data, prompt_len, input_cut, target_cut) in enumerate(
                    tqdm(results, total=len(rows), desc=f"{task.name}/{split}", unit="ex", mininterval=1.0)):
                length = len(data) // 2
                f.write(data)
                index[i] = (offset, prompt_len, length)
                offset += length
                target_tokens += length - prompt_len
                if input_cut:
                    n_input_cut += 1
                    tokens_cut += input_cut
                    max_cut = max(max_cut, input_cut)
                n_target_cut += bool(target_cut)
        with atomic_path(prefix + ".idx.npy") as tmp_idx:
            with open(tmp_idx, "wb") as f:
                np.save(f, index)
    lengths = index[:, 2]
    return {
        "examples": len(rows),
        "tokens": int(offset),
        "target_tokens": int(target_tokens),
        "target_fraction": round(target_tokens / max(offset, 1), 4),
        "mean_length": round(float(lengths.mean()), 1),
        "max_length": int(lengths.max()),
        "inputs_cut": n_input_cut,
        "input_tokens_cut_mean": round(tokens_cut / n_input_cut, 1) if n_input_cut else 0.0,
        "input_tokens_cut_max": int(max_cut),
        "targets_cut": n_target_cut,
    }


def main(argv=None):
    args = parse_args(argv)
    task_list = tasks.task_list(args.tasks)
    split_names = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not split_names:
        raise UserError("--splits needs at least one name, e.g. --splits train,validation")
    if args.block_size < 64:
        raise UserError(f"--block-size {args.block_size} is too small; use at least 64 (1024 for GPT-2)")
    if args.num_proc < 1:
        raise UserError(f"--num-proc must be at least 1, not {args.num_proc}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, not {args.limit}")
    if args.data_root is not None and not os.path.isdir(args.data_root):
        raise UserError(f"--data-root {args.data_root} is not a folder; point it at the folder holding "
                        f"cnn_dailymail/, squad/, glue_sst2/")

    get_tokenizer()  # fail fast, with its one-line message, before any work
    start = time.time()
    # spawn: a forked child of a threaded process can deadlock (see prepare_owt.chunk_mapper)
    pool = mp.get_context("spawn").Pool(args.num_proc, guarded_init, (_init_worker,)) if args.num_proc > 1 else None
    if pool is None:
        _init_worker()
    try:
        for task in task_list:
            stats, selection = {}, None
            for split in split_names:
                if split not in task.splits:
                    print(f"note: {task.name} has no {split!r} split (it has {', '.join(task.splits)}); skipped")
                    continue
                if split in task.unlabelled_splits:
                    print(f"note: {task.name} {split!r} is unlabelled (labels -1); skipped")
                    continue
                rows = task.load_rows(split, args.data_root, args.limit)
                check_rows(task, rows, task.source_name(split, args.data_root))
                parts = {split: rows}
                if split == "train":
                    parts["train"], parts[tasks.SELECTION_SPLIT], selection = hold_out(
                        task, rows, *reported_keys(task, args))
                for name, part in parts.items():
                    stats[name] = prepare_split(task, name, part, args, pool)
                    s = stats[name]
                    print(f"{task.name}/{name}: {s['examples']:,} examples, {s['tokens']:,} tokens "
                          f"({s['target_fraction']:.1%} target), {s['inputs_cut']:,} inputs cut, "
                          f"{s['targets_cut']:,} targets cut")
            if stats:
                write_meta(task, stats, selection, args)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    print(f"done in {time.time() - start:.1f}s; wrote {args.out_dir}")


def write_meta(task, stats, selection, args):
    path = os.path.join(args.out_dir, task.name, "meta.json")
    meta = {
        "task": task.name,
        "tasks_version": tasks.TASKS_VERSION,
        "block_size": args.block_size,
        "tokenizer": "gpt2",
        "dtype": "uint16",
        "index_columns": ["offset", "prompt_len", "length"],
        "max_target_tokens": task.max_target_tokens,
        "source": args.data_root or task.hub_path,
        "limit": args.limit,
        "splits": {},
        "selection": selection,  # how select was held out of train (None: train not prepared yet)
    }
    try:
        with open(path) as f:
            old = json.load(f)
        if all(old.get(k) == meta[k] for k in ("tasks_version", "block_size", "tokenizer", "limit")):
            meta["splits"].update(old.get("splits", {}))
            meta["selection"] = selection or old.get("selection")
    except (OSError, ValueError):
        pass
    meta["splits"].update(stats)
    write_json(path, meta)


if __name__ == "__main__":
    run_main(main)
