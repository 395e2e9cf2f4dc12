"""Score a model on a task (prompts from tasks.py, batched decoding, the task's scorer and
baseline) or on web text (loss and perplexity): the core that evaluate.py runs, for use from
Python (benchmarks, tests, notebooks).

Under torchrun (rank, world_size) every process builds the same prompts and the same batches,
longest prompts first; batch i is decoded by process i % world_size (interleaved, so the shares
take about the same time), and process 0 gathers the outputs, scores them and returns the
results. N processes thus decode exactly the batches one process decodes: the predictions and
scores are the same, and only the TIMING_FIELDS of the metrics differ.

protocol "gpt2" (CNN/DM zero-shot) is Radford et al. 2019's summarization protocol: the article,
"TL;DR:", 100 tokens of top-k=2 sampling, and the first 3 generated sentences as the summary. The
sampling generator of each batch is seeded from the seed and the batch's prompts: the same seed
and batch size give the same summaries (under torchrun too); another batch size draws others.
"""
import hashlib
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import fewshot
import memory
import metrics
import subsets
import tasks
from checkpoint import newest_finetuned
from common import EOT, UserError
from generation import (batched_beam_search, constrained_span_decode, decode_text, label_logprobs,
                        release_decoding_cache)

AUTO_BATCH_NO_MEMORY_SIGNAL = 16  # prompts per batch where the device reports no memory (CPU, MPS)
MAX_BATCH_ROWS = 256  # cap on a fitted batch, prompts x beams: beyond it decoding gains little, and
# fewer, larger batches leave processes idle when torchrun shares them out
OWT_BATCH_TOKENS = 4096
# fields of a metrics JSON that say how the run went, not what it computed: wall-clock figures, the
# number of processes, batches split after running out of memory. Two runs of the same checkpoint,
# data and settings on the same kind of device agree on everything else: compare them without these.
TIMING_FIELDS = ("wall_time_s", "examples_per_s", "generated_tokens_per_s", "tokens_per_s", "processes",
                 "batches_halved")
PROTOCOLS = ("default", "gpt2")
# Radford et al. 2019, section 3.6: "generate 100 tokens with Top-k random sampling with k = 2 ... We
# use the first 3 generated sentences in these 100 tokens as the summary"
GPT2_SUMMARY = dict(strategy="sampling", top_k=2, temperature=1.0, max_new_tokens=100, keep_sentences=3)


@dataclass
class EvalSettings:
    split: str = "validation"
    batch_size: Union[int, str] = "auto"  # prompts per batch; auto: fitted to memory (16 on CPU, MPS)
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    constrained: bool = False        # SQuAD only: answers are spans of the passage
    max_new_tokens: Optional[int] = None  # None: the task's own
    data_root: Optional[str] = None  # for training rows: the majority baseline, few-shot examples
    prompt_block_size: Optional[int] = None  # the finetuning data's (model.pt records it); None: the model's
    shots: Optional[int] = None      # None: the finetuning prompt; K: K training examples first
    protocol: str = "default"        # "gpt2": GPT-2's zero-shot summarization protocol (CNN/DM, shots 0)
    decoding_seed: int = 0           # seeds the sampling of a sampling protocol
    progress: bool = True


def length_order(prompts):
    """Indices of the prompts, longest first: little padding in a batch, and the worst batch (the
    most memory) first, where fitting the batch size measures it."""
    return sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))


def batches_of(order, size):
    return [order[start:start + size] for start in range(0, len(order), size)]


def progress_bar(total, name, unit, rank, world_size, enabled):
    """A bar per process, named by its rank; on a terminal each process's bar keeps its own line."""
    desc = name if world_size == 1 else f"{name} [rank {rank}/{world_size}]"
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                position=rank if sys.stderr.isatty() else None)


def gather(part, world_size):
    """Every process's `part` (any picklable object), in rank order."""
    if world_size == 1:
        return [part]
    parts = [None] * world_size
    dist.all_gather_object(parts, part)
    return parts


def agree_on_minimum(value, device, world_size):
    """The smallest of the processes' values (an int), the same on every process."""
    if world_size == 1:
        return value
    t = torch.tensor([value], device=device if device.type == "cuda" else "cpu")  # nccl: CUDA; gloo: CPU
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def fit_batch_size(decode, order, rows_per_prompt, device):
    """Most prompts per batch for which the longest ones (the worst batch) decode in memory, with
    prompts x rows_per_prompt at most MAX_BATCH_ROWS; tried at powers of two (and all the prompts),
    by bisection. Returns (size or None, {size: outputs} of the tries that finished, tries): a try
    decodes the first prompts for real, so the one of the chosen size is the first batch, done."""
    cap = max(1, min(len(order), MAX_BATCH_ROWS // rows_per_prompt))
    sizes = sorted({min(2 ** k, cap) for k in range(cap.bit_length() + 1)})
    decoded = {}

    def attempt(size):
        decoded[size] = decode(order[:size])

    best, tries = memory.largest_that_fits(sizes, attempt, device)
    return best, decoded, tries


def choose_batch_size(requested, decode, order, rows_per_prompt, device, world_size):
    """Prompts per batch, how they were chosen (for the metrics), one line saying so (None when
    given), and outputs already decoded by the fitting ({size: outputs} of its first prompts). Every
    process forms the same batches: under torchrun they take the smallest of their fits."""
    if requested != "auto":
        return requested, "given", None, {}
    if memory.budget(device) is None:
        size, decoded = AUTO_BATCH_NO_MEMORY_SIGNAL, {}
        rule = f"auto: {size} prompts, as the device reports no memory to fit to"
        why = f"{device.type} reports no free memory to fit a batch to; --batch-size N to choose"
    else:
        size, decoded, tries = fit_batch_size(decode, order, rows_per_prompt, device)
        rule = f"auto: the most of the longest prompts that fit in memory, at most {MAX_BATCH_ROWS} rows"
        tried = ", ".join(f"{s}" + ("" if ok else " too large") for s, _, ok in tries)
        why = f"the most that fit {device} on the longest prompts, at most {MAX_BATCH_ROWS} rows; tried {tried}"
    agreed = agree_on_minimum(size or 0, device, world_size)
    if not agreed:
        raise UserError(f"out of memory decoding even one prompt on {device}; free the device's memory (other "
                        f"processes?), or lower --num-beams or --max-new-tokens")
    if agreed != size:
        why += f"; {agreed}, the smallest fit of the {world_size} processes"
    rows = f" x {rows_per_prompt} beams = {agreed * rows_per_prompt} rows" if rows_per_prompt > 1 else ""
    return agreed, rule, f"batches of {agreed} prompts{rows} (--batch-size auto: {why})", decoded


def decode_within_memory(decode, batch, device):
    """decode(batch), or, if that runs out of memory, its two halves one after the other (halved
    again as needed): no example is lost. Returns the outputs and how many batches were halved."""
    try:
        return decode(batch), 0
    except Exception as e:  # only memory errors mean "too large"; anything else is a real bug
        if not memory.is_out_of_memory(e):
            raise
        if len(batch) == 1:
            raise UserError(f"out of memory decoding a single prompt on {device}; free the device's memory "
                            f"(other processes?), or lower --num-beams or --max-new-tokens") from None
    memory.release(device)  # out of the except block: the error's traceback holds the failed try's tensors
    half = (len(batch) + 1) // 2
    first, halved_first = decode_within_memory(decode, batch[:half], device)
    second, halved_second = decode_within_memory(decode, batch[half:], device)
    return first + second, 1 + halved_first + halved_second


def decoding_settings(task, s):
    if task.label_words:
        return {"strategy": "label_likelihood", "labels": list(task.label_words)}
    if s.protocol == "gpt2":
        return {"protocol": "gpt2", **GPT2_SUMMARY, "seed": s.decoding_seed, "stop_tokens": [EOT]}
    strategy = ("constrained_span" if s.constrained and task.extractive else
                "beam" if s.num_beams > 1 or s.no_repeat_ngram_size else "greedy")
    out = {"strategy": strategy, "max_new_tokens": s.max_new_tokens or task.max_new_tokens,
           "stop_tokens": list(task.stop_tokens if strategy != "constrained_span" else (EOT,))}
    if strategy == "beam":
        out.update(num_beams=s.num_beams, length_penalty=s.length_penalty,
                   no_repeat_ngram_size=s.no_repeat_ngram_size, ngram_blocking="generated tokens only")
    return out


def _generate(model, prompts, decoding, on_token=None):
    """New tokens for a batch of Prompts, by the decoding strategy's rules."""
    batch = [p.ids for p in prompts]
    room = model.config.block_size - max(len(p) for p in batch)  # the prompt reserved the target cap
    n = min(decoding["max_new_tokens"], room)
    if decoding["strategy"] == "constrained_span":
        return constrained_span_decode(model, batch, [p.ids[slice(*p.input_span)] for p in prompts], n)
    if decoding["strategy"] == "beam":
        return batched_beam_search(model, batch, decoding["num_beams"], n, decoding["length_penalty"],
                                   decoding["no_repeat_ngram_size"], decoding["stop_tokens"])
    if decoding["strategy"] == "sampling":
        generator = torch.Generator(model.wte.weight.device).manual_seed(batch_seed(decoding["seed"], batch))
        return model.generate(batch, n, temperature=decoding["temperature"], top_k=decoding["top_k"],
                              stop_tokens=decoding["stop_tokens"], generator=generator)
    return model.generate(batch, n, stop_tokens=decoding["stop_tokens"], on_token=on_token)


def label_ids(task, enc):
    """A classification task's label words as token lists ([] for a task that generates)."""
    return [enc.encode_ordinary(w) for w in task.label_words or ()]


def decode_prompts(model, prompts, decoding, labels, on_token=None):
    """The outputs of a batch of Prompts: each one's log-probability of every label (labels: from
    label_ids; nothing is generated) or its new tokens, by decoding_settings' strategy. on_token: see
    GPT.generate (greedy decoding only)."""
    if labels:
        return label_logprobs(model, [p.ids for p in prompts], labels).tolist()
    return _generate(model, prompts, decoding, on_token)


def answer_text(task, enc, output, decoding=None):
    """The answer an output of decode_prompts stands for: the likelier label word, or the new tokens'
    text (under GPT-2's protocol, its first decoding["keep_sentences"] sentences)."""
    if task.label_words:
        return task.label_words[int(np.argmax(output))].strip()
    text = decode_text(enc, output)
    keep = (decoding or {}).get("keep_sentences")
    return metrics.first_sentences(text, keep) if keep else text


def batch_seed(seed, batch):
    """A generator seed from the seed and the batch's prompts: the same batch samples alike wherever
    it is decoded (in a batch-size try, on any torchrun process)."""
    return int.from_bytes(hashlib.blake2b(repr((seed, batch)).encode(), digest_size=8).digest(), "little") >> 1


@torch.no_grad()
def evaluate_task(model, enc, task, rows, settings, autocast=nullcontext, rank=0, world_size=1):
    """Score `model` on `rows` of a task (a Task or its name; autocast: a context factory, e.g.
    Runtime.autocast). Returns (metrics dict, list of prediction dicts). Under torchrun every
    process calls it alike, with its rank and the world size; process 0 returns the results of
    all, the others (None, None)."""
    task = tasks.get_task(task) if isinstance(task, str) else task
    started = time.perf_counter()
    model.eval()
    device = model.wte.weight.device
    block_size = settings.prompt_block_size or model.config.block_size
    prompts, shots, shots_record = fewshot.build_prompts(task, rows, enc, block_size, settings.shots, settings.data_root)
    decoding = decoding_settings(task, settings)
    labels = label_ids(task, enc)

    def decode(batch):  # indices of prompts -> their outputs
        with autocast():
            return decode_prompts(model, [prompts[i] for i in batch], decoding, labels)

    def fresh_decode(batch):  # a try measures its own memory, not the last try's compiled-decoding cache
        release_decoding_cache(model)
        return decode(batch)

    order = length_order([p.ids for p in prompts])
    size, rule, line, decoded = choose_batch_size(settings.batch_size, fresh_decode, order, decoding.get("num_beams", 1),
                                                  device, world_size)
    if line and settings.progress and rank == 0:
        print(f"{task.name}: {line}", file=sys.stderr, flush=True)
    batches = batches_of(order, size)
    outputs, halved = {}, 0
    mine = range(rank, len(batches), world_size)
    with progress_bar(sum(len(batches[b]) for b in mine), task.name, "ex", rank, world_size, settings.progress) as bar:
        for b in mine:
            if b == 0 and size in decoded:  # fitting the batch size decoded it already
                results = decoded.pop(size)
            else:
                results, n = decode_within_memory(decode, batches[b], device)
                halved += n
            outputs.update(zip(batches[b], results))
            bar.update(len(batches[b]))
    parts = gather((outputs, halved), world_size)
    if rank != 0:
        return None, None
    outputs = {i: out for part, _ in parts for i, out in part.items()}
    halved = sum(n for _, n in parts)
    elapsed = time.perf_counter() - started
    predictions = []
    for i, (row, n_shots) in enumerate(zip(rows, shots)):
        pred = {"id": task.example_id(row)} | ({} if n_shots is None else {"shots": n_shots})
        pred["prediction"] = answer_text(task, enc, outputs[i], decoding)
        if task.cluster_field:  # what the report's bootstrap resamples
            pred[task.cluster_field] = row.get(task.cluster_field)
        if labels:
            pred["label_logprobs"] = {w.strip(): lp for w, lp in zip(task.label_words, outputs[i])}
        elif "keep_sentences" in decoding:  # GPT-2's protocol: the text before its cut to sentences
            pred["generated"] = decode_text(enc, outputs[i])
        pred["references"] = task.references(row)
        predictions.append(pred)
    scores = task.score([p["prediction"] for p in predictions], [p["references"] for p in predictions])
    generated = None if labels else sum(len(out) for out in outputs.values())
    result = {"task": task.name, "split": settings.split, "count": len(rows), "scores": scores,
              "baseline": task.baseline(rows, settings.data_root, settings.split), "decoding": decoding,
              "shots": shots_record, "prompts": {"block_size": block_size, "target_room": task.max_target_tokens,
                                                 "inputs_cut": sum(p.cut > 0 for p in prompts)},
              "batch_size": size, "batch_size_rule": rule, "generated_tokens": generated,
              # the TIMING_FIELDS, together
              "wall_time_s": round(elapsed, 3), "examples_per_s": round(len(rows) / elapsed, 3),
              "generated_tokens_per_s": None if labels else round(generated / elapsed, 2),
              "processes": world_size, "batches_halved": halved}
    return result, predictions


def owt_windows(n_tokens, block_size, limit=None, seed=subsets.SEED):
    """Indices of the non-overlapping block_size windows (each with its next-token targets) that
    n_tokens hold: all of them, or a seeded random sample of `limit`, in order (subsets.py)."""
    windows = (n_tokens - 1) // block_size
    if windows <= 0:
        raise UserError(f"{n_tokens} tokens are fewer than block_size + 1 = {block_size + 1}; give more text")
    return subsets.stratified_indices([None] * windows, limit or windows, seed)


@torch.no_grad()
def evaluate_owt(model, tokens, limit=None, autocast=nullcontext, rank=0, world_size=1, progress=True,
                 seed=subsets.SEED):
    """Mean loss / perplexity over non-overlapping block_size windows of a token array: all of them,
    or a seeded sample of `limit` windows. Under torchrun batch i of windows is process i %
    world_size's, and process 0 adds up the batches' losses in order, as one process does (the same
    loss to the bit); the others return None."""
    started, T = time.perf_counter(), model.config.block_size
    windows = owt_windows(len(tokens), T, limit, seed)
    model.eval()
    device, per_batch = model.wte.weight.device, max(1, OWT_BATCH_TOKENS // T)
    batches = batches_of(windows, per_batch)
    losses = {}  # batch index -> its mean loss times its number of windows
    mine = range(rank, len(batches), world_size)
    with progress_bar(len(mine), "owt", "batch", rank, world_size, progress) as bar:
        for b in mine:
            rows = np.stack([np.asarray(tokens[w * T:(w + 1) * T + 1], dtype=np.int64) for w in batches[b]])
            rows = torch.from_numpy(rows).to(device)
            with autocast():
                _, loss = model(rows[:, :-1], targets=rows[:, 1:])
            losses[b] = loss.float().item() * len(batches[b])
            bar.update()
    parts = gather(losses, world_size)
    if rank != 0:
        return None
    losses = {b: value for part in parts for b, value in part.items()}
    loss = sum(losses[b] for b in range(len(batches))) / len(windows)
    elapsed = time.perf_counter() - started
    all_windows = [None] * ((len(tokens) - 1) // T)
    return {"task": "owt", "count": len(windows), "scores": {"loss": loss, "perplexity": float(np.exp(loss)),
            "windows": len(windows), "tokens": len(windows) * T}, "baseline": None,
            "sample": subsets.describe(all_windows, windows, windows, seed, None),
            "wall_time_s": round(elapsed, 3), "tokens_per_s": round(len(windows) * T / elapsed, 1),
            "processes": world_size}


# ---- which checkpoint, and how its prompts are cut (evaluate.py and sample.py) ----------------

def default_checkpoint(master):
    """The newest finetuned model.pt under out/ (the design's `evaluate.py --task squad`)."""
    path = newest_finetuned("out")
    if path is None:
        raise UserError("no --ckpt given and no finetuned model.pt under out/; make one with "
                        "`python pipeline.py --preset smoke --data-root ../shared/data`, or pass --ckpt PATH")
    if master:
        print(f"using {path}, the newest finetuned model.pt under out/ (--ckpt to choose another)")
    return path


def warn_if_not_finetuned_here(version, path, shots):
    if version is None and shots is None:
        print(f"warning: {path} was not finetuned on the tasks; scores will be near zero (to score a "
              f"pretrained model, give --shots 0 for zero-shot or --shots K for few-shot)", file=sys.stderr)
    elif version is not None and version != tasks.TASKS_VERSION:
        print(f"warning: {path} was finetuned with tasks version {version} but this code builds version "
              f"{tasks.TASKS_VERSION} prompts; scores may drop (re-finetune or check out the matching code)",
              file=sys.stderr)


def prompt_block_size(ckpt, model, path):
    """The block size of the data the model was finetuned on: prompts are cut exactly as there."""
    size = ckpt.get("data_block_size", model.config.block_size)
    if size > model.config.block_size:
        raise UserError(f"{path} says it was finetuned on data prepared for block size {size}, more than its "
                        f"context of {model.config.block_size}: data and checkpoint disagree; re-finetune")
    return size
