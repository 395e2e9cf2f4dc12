"""Score a model on a task (prompts from tasks.py, batched decoding, the task's scorer and
baseline) or on web text (loss and perplexity): the core that evaluate.py runs, for use from
Python (benchmarks, tests, notebooks)."""
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

import fewshot
import tasks
from common import EOT, UserError
from generation import batched_beam_search, constrained_span_decode, decode_text, label_logprobs


@dataclass
class EvalSettings:
    split: str = "validation"
    batch_size: int = 16
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    constrained: bool = False        # SQuAD only: answers are spans of the passage
    max_new_tokens: Optional[int] = None  # None: the task's own
    data_root: Optional[str] = None  # for training rows: the majority baseline, few-shot examples
    prompt_block_size: Optional[int] = None  # the finetuning data's (model.pt records it); None: the model's
    shots: Optional[int] = None      # None: the finetuning prompt; K: K training examples first
    progress: bool = True


def _in_length_order(prompts, batch_size, desc, progress):
    """Yield batches of indices, longest prompts first (little padding, worst memory up front)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    with tqdm(total=len(order), desc=desc, unit="ex", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(order), batch_size):
            yield order[start:start + batch_size]
            bar.update(len(order[start:start + batch_size]))


def decoding_settings(task, s):
    if task.label_words:
        return {"strategy": "label_likelihood", "labels": list(task.label_words)}
    strategy = ("constrained_span" if s.constrained and task.extractive else
                "beam" if s.num_beams > 1 or s.no_repeat_ngram_size else "greedy")
    out = {"strategy": strategy, "max_new_tokens": s.max_new_tokens or task.max_new_tokens,
           "stop_tokens": list(task.stop_tokens if strategy != "constrained_span" else (EOT,))}
    if strategy == "beam":
        out.update(num_beams=s.num_beams, length_penalty=s.length_penalty,
                   no_repeat_ngram_size=s.no_repeat_ngram_size, ngram_blocking="generated tokens only")
    return out


def _generate(model, prompts, decoding):
    """New tokens for a batch of Prompts, by the decoding strategy's rules."""
    batch = [p.ids for p in prompts]
    room = model.config.block_size - max(len(p) for p in batch)  # the prompt reserved the target cap
    n = min(decoding["max_new_tokens"], room)
    if decoding["strategy"] == "constrained_span":
        return constrained_span_decode(model, batch, [p.ids[slice(*p.input_span)] for p in prompts], n)
    if decoding["strategy"] == "beam":
        return batched_beam_search(model, batch, decoding["num_beams"], n, decoding["length_penalty"],
                                   decoding["no_repeat_ngram_size"], decoding["stop_tokens"])
    return model.generate(batch, n, stop_tokens=decoding["stop_tokens"])


@torch.no_grad()
def evaluate_task(model, enc, task, rows, settings, autocast=nullcontext):
    """Score `model` on `rows` of a task (a Task or its name; autocast: a context factory, e.g.
    Runtime.autocast). Returns (metrics dict, list of prediction dicts)."""
    task = tasks.get_task(task) if isinstance(task, str) else task
    started = time.perf_counter()
    model.eval()
    prompts, shots, shots_record = fewshot.build_prompts(task, rows, enc, settings.prompt_block_size or
                                                          model.config.block_size, settings.shots, settings.data_root)
    decoding = decoding_settings(task, settings)
    labels = [enc.encode_ordinary(w) for w in task.label_words or ()]
    outputs, generated = [None] * len(rows), 0
    for chunk in _in_length_order([p.ids for p in prompts], settings.batch_size, task.name, settings.progress):
        with autocast():
            if labels:
                results = label_logprobs(model, [prompts[i].ids for i in chunk], labels).tolist()
            else:
                results = _generate(model, [prompts[i] for i in chunk], decoding)
                generated += sum(len(r) for r in results)
        for i, result in zip(chunk, results):
            outputs[i] = result
    elapsed = time.perf_counter() - started
    predictions = []
    for row, out, n_shots in zip(rows, outputs, shots):
        pred = {"id": task.example_id(row)} | ({} if n_shots is None else {"shots": n_shots})
        if labels:
            pred["prediction"] = task.label_words[int(np.argmax(out))].strip()
            pred["label_logprobs"] = {w.strip(): lp for w, lp in zip(task.label_words, out)}
        else:
            pred["prediction"] = decode_text(enc, out)
        pred["references"] = task.references(row)
        predictions.append(pred)
    scores = task.score([p["prediction"] for p in predictions], [p["references"] for p in predictions])
    result = {"task": task.name, "split": settings.split, "count": len(rows), "scores": scores,
              "baseline": task.baseline(rows, settings.data_root, settings.split), "decoding": decoding,
              "shots": shots_record,
              "wall_time_s": round(elapsed, 3), "examples_per_s": round(len(rows) / elapsed, 3),
              "generated_tokens": None if labels else generated,
              "generated_tokens_per_s": None if labels else round(generated / elapsed, 2)}
    return result, predictions


@torch.no_grad()
def evaluate_owt(model, tokens, limit=None, autocast=nullcontext):
    """Mean loss / perplexity over consecutive non-overlapping block_size windows of a token array."""
    started, T = time.perf_counter(), model.config.block_size
    windows = (len(tokens) - 1) // T
    windows = min(windows, limit) if limit else windows
    if windows == 0:
        raise UserError(f"{len(tokens)} tokens are fewer than block_size + 1 = {T + 1}; give more text")
    model.eval()
    device, per_batch, total = model.wte.weight.device, max(1, 4096 // T), 0.0
    for start in tqdm(range(0, windows, per_batch), desc="owt", unit="batch", file=sys.stderr):
        n = min(per_batch, windows - start)
        rows = np.stack([np.asarray(tokens[w * T:(w + 1) * T + 1], dtype=np.int64) for w in range(start, start + n)])
        rows = torch.from_numpy(rows).to(device)
        with autocast():
            _, loss = model(rows[:, :-1], targets=rows[:, 1:])
        total += loss.float().item() * n
    loss = total / windows
    elapsed = time.perf_counter() - started
    return {"task": "owt", "count": windows, "scores": {"loss": loss, "perplexity": float(np.exp(loss)),
            "windows": windows, "tokens": windows * T}, "baseline": None,
            "wall_time_s": round(elapsed, 3), "tokens_per_s": round(windows * T / elapsed, 1)}
