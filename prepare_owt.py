"""Tokenize a web-text corpus (OpenWebText by default) into train.bin / val.bin for pretraining.

Writes <out-dir>/<name>/:
  train.bin, val.bin  GPT-2 BPE ids (tiktoken encode_ordinary) as np.uint16, EOT 50256 after
                      every document
  meta.json           tokenizer, per-split token/document counts, source, arguments and
                      decontamination counts; written last, so a folder without it is unfinished

Documents are streamed, tokenized in chunks by a process pool and appended to the output as
they come back, so memory stays flat whatever the corpus size. A document goes to val when a
seeded hash of its text falls below --val-fraction: the split depends only on the text and
--seed (identical documents share a split), so the output is byte-identical for any --num-proc.

examples:
  python prepare_owt.py --max-tokens 10000000          # first 10M tokens of OpenWebText (hub)
  python prepare_owt.py --source ../shared/data/webtext --decontaminate --data-root ../shared/data
"""
import argparse
import collections
import contextlib
import hashlib
import multiprocessing as mp
import os
import time

import numpy as np
from tqdm import tqdm

import decontaminate
from corpus import HUB_DATASET, documents
from common import EOT, UserError, atomic_path, check_worker, get_tokenizer, guarded_init, run_main, write_json

CHUNK_DOCS, CHUNK_BYTES = 64, 1 << 20  # one pool task: up to 64 documents or ~1 MB of text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="a directory (its files, sorted; not recursive: use a glob like 'd/**/*.txt'), a glob or a file of "
                   ".jsonl / .jsonl.gz / .parquet (field or column 'text') or .txt (one file = one document); "
                   f"default: stream {HUB_DATASET} from the hub")
    p.add_argument("--name", default="owt", help="output folder under --out-dir (default: owt)")
    p.add_argument("--out-dir", default="data", help="default: data")
    p.add_argument("--max-tokens", type=int, metavar="N", help="keep the longest prefix of the documents whose tokens "
                   "(EOT included, train+val) total at most N; documents are never cut")
    p.add_argument("--max-bytes", type=int, metavar="N", help="read the longest prefix of the source documents whose "
                   "UTF-8 text totals at most N bytes (decontaminated documents count: they were read)")
    p.add_argument("--val-fraction", type=float, default=0.005, help="expected share of documents in val")
    p.add_argument("--num-proc", type=int, default=min(8, os.cpu_count() or 1), help="tokenizer processes")
    p.add_argument("--seed", type=int, default=0, help="salts the train/val split hash")
    p.add_argument("--decontaminate", action="store_true", help="drop documents sharing a 13-word span "
                   "(case and punctuation ignored) with the finetuning tasks' evaluation texts, or containing "
                   "a shorter one (5-12 words) whole")
    p.add_argument("--data-root", help="local task data for --decontaminate, e.g. ../shared/data; "
                   "default: the hub")
    args = p.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    for flag in ("num_proc", "max_tokens", "max_bytes"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.decontaminate and args.data_root and not os.path.isdir(args.data_root):
        raise UserError(f"--data-root {args.data_root} is not a directory; point it at the task data")
    return args


# ---- reading documents ----------------------------------------------------------------------

def chunked(docs):
    chunk, size = [], 0
    for text in docs:
        chunk.append(text)
        size += len(text)
        if len(chunk) >= CHUNK_DOCS or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# ---- tokenizing (in worker processes) -------------------------------------------------------

_worker = {}  # set once per process by init_worker


def init_worker(seed, val_fraction, index):
    _worker.update(enc=get_tokenizer(), key=str(seed).encode(), val_below=val_fraction * 2**64, index=index)


def goes_to_val(raw):
    """Seeded hash of the text, read as a uniform number in [0, 2**64), below the val share."""
    digest = hashlib.blake2b(raw, digest_size=8, key=_worker["key"]).digest()
    return int.from_bytes(digest, "little") < _worker["val_below"]


def tokenize_chunk(chunk):
    """For each document: (UTF-8 bytes, goes to val, uint16 tokens + EOT, or None if contaminated)."""
    check_worker()
    out = []
    for text in chunk:
        raw = text.encode("utf-8", "surrogatepass")  # JSON may carry lone surrogates: count, don't fail
        tokens = None
        if _worker["index"] is None or not _worker["index"].contains_any(text):
            tokens = np.array(_worker["enc"].encode_ordinary(text) + [EOT], dtype=np.uint16)
        out.append((len(raw), goes_to_val(raw), tokens))
    return out


@contextlib.contextmanager
def chunk_mapper(args, index):
    """A map() over chunks that keeps their order: in-process for one process, else a Pool."""
    initargs = (args.seed, args.val_fraction, index)
    if args.num_proc == 1:
        init_worker(*initargs)
        yield map
        return
    # spawn, not fork: a forked child of a process that runs other threads (torch's, a data
    # loader's) can deadlock on a lock one of them held; the index is pickled to each worker
    get_tokenizer()  # fail fast, before the workers start; guarded_init catches what else goes wrong
    pool = mp.get_context("spawn").Pool(args.num_proc, guarded_init, (init_worker,) + initargs)
    runs = []

    def ordered_map(fn, items):
        runs.append(bounded_imap(pool, fn, items, window=2 * args.num_proc))
        return runs[-1]

    try:
        yield ordered_map
    finally:
        for run in runs:  # a cap or an error stops early: let the few tasks in flight finish
            run.close()
        pool.close()  # not terminate(): it can hang while the pool's feeder thread is mid-write
        pool.join()


def bounded_imap(pool, fn, items, window):
    """Like pool.imap, but reads `items` here, lazily, with at most `window` tasks in flight:
    memory stays bounded and stopping early leaves only those to wait for."""
    pending = collections.deque()
    try:
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        for result in pending:
            result.wait()


# ---- writing --------------------------------------------------------------------------------

def write_splits(results, files, args):
    """Append each document's tokens to its split's file in source order, applying the caps.
    Returns the counts for meta.json."""
    splits = {s: {"tokens": 0, "documents": 0} for s in ("train", "val")}
    read = dropped = nbytes = ntokens = 0
    stopped_by = None
    start = time.time()
    with tqdm(unit="doc", desc="tokenizing") as bar:
        for chunk in results:
            for size, to_val, tokens in chunk:
                read += 1
                if args.max_bytes is not None and nbytes + size > args.max_bytes:
                    stopped_by = "max_bytes"
                    break
                nbytes += size
                if tokens is None:
                    dropped += 1
                    continue
                if args.max_tokens is not None and ntokens + tokens.size > args.max_tokens:
                    stopped_by = "max_tokens"
                    break
                split = "val" if to_val else "train"
                files[split].write(tokens.tobytes())
                splits[split]["tokens"] += tokens.size
                splits[split]["documents"] += 1
                ntokens += tokens.size
            bar.update(len(chunk))
            bar.set_postfix_str(f"{ntokens / max(time.time() - start, 1e-9):,.0f} tok/s", refresh=False)
            if stopped_by:
                break
    if read == 0:
        raise UserError(f"--source {args.source or HUB_DATASET} holds no documents; point it at a non-empty corpus")
    if ntokens == 0:
        why = (f"--{stopped_by.replace('_', '-')} is smaller than the first document; raise it" if stopped_by
               else "--decontaminate dropped every document; check the source")
        raise UserError(f"no documents kept: {why}")
    return {"splits": splits, "source_bytes": nbytes, "stopped_by": stopped_by, "dropped": dropped}


def prepare(args):
    docs = documents(args.source)  # resolves the files first: path errors come before any work
    index = None
    if args.decontaminate:
        print("building the 13-gram index of the evaluation texts...")
        index = decontaminate.load_eval_index(data_root=args.data_root)
    out = os.path.join(args.out_dir, args.name)
    paths = {s: os.path.join(out, f"{s}.bin") for s in ("train", "val")}
    with atomic_path(paths["train"]) as train_tmp, atomic_path(paths["val"]) as val_tmp:
        with open(train_tmp, "wb", buffering=1 << 20) as train_f, open(val_tmp, "wb", buffering=1 << 20) as val_f:
            with chunk_mapper(args, index) as imap:
                stats = write_splits(imap(tokenize_chunk, chunked(docs)), {"train": train_f, "val": val_f}, args)
        # The .bin files replace the old ones as this block exits: remove the old meta.json first,
        # so a folder is never left with a meta.json that describes other .bin files.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, "meta.json"))
    meta = {
        "tokenizer": "gpt2", "vocab_size": 50257, "eot": EOT, "dtype": "uint16",
        "source": args.source or f"hub:{HUB_DATASET}",
        "splits": stats["splits"], "source_bytes": stats["source_bytes"], "stopped_by": stats["stopped_by"],
        "decontamination": {"enabled": args.decontaminate, "n": decontaminate.N,
                            "eval_ngrams": len(index) if index is not None else 0,
                            "min_words": decontaminate.MIN_WORDS,
                            "short_texts_matched_whole": index.short_texts if index is not None else 0,
                            "texts_too_short": index.too_short if index is not None else 0,
                            "documents_dropped": stats["dropped"]},
        "args": vars(args),
    }
    write_json(os.path.join(out, "meta.json"), meta)  # last: its presence marks a finished run
    report(meta, out)
    return meta


def report(meta, out):
    for name, s in meta["splits"].items():
        print(f"{name}: {s['tokens']:,} tokens in {s['documents']:,} documents")
    if meta["decontamination"]["enabled"]:
        d = meta["decontamination"]
        print(f"decontamination: dropped {d['documents_dropped']:,} documents sharing a 13-word span with the "
              f"evaluation texts ({d['eval_ngrams']:,} n-grams) or containing one of the "
              f"{d['short_texts_matched_whole']:,} shorter ones ({d['min_words']}-12 words) whole; "
              f"{d['texts_too_short']:,} texts under {d['min_words']} words are not matched")
    if meta["splits"]["val"]["documents"] == 0:
        print("warning: val is empty; raise --val-fraction or use more documents")
    print(f"wrote {out}/train.bin, val.bin, meta.json")


def main(argv=None):
    return prepare(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
