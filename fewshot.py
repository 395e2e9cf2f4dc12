"""Zero- and few-shot prompts, for scoring any checkpoint (the pretrained one too) on the tasks.

shots=None  the finetuning prompt, byte for byte (tasks.Task.prompt): what a finetuned model saw.
shots=0     zero-shot: the same prompt (an instruction names the task), except where the task has a
            published zero-shot format: CNN/DM is the bare article then "\nTL;DR:" (GPT-2).
shots=K     GPT-3 style: K solved training examples (prompt + " " + target, then a blank line)
            before the finetuning prompt. The query is never cut further for them: as many
            demonstrations as fit the block (with the target's room) are used, the rest dropped,
            and the number used is reported. Demonstrations come from a seeded sample of the
            training split, in its random order: each query takes the first K that fit (a long
            one is skipped for a shorter one after it), so labels stay mixed.
"""
import dataclasses
import random
import statistics

POOL_ROWS = 2000  # training rows read (the first ones of the split) ...
POOL_SIZE = 64  # ... of which a seeded sample are the candidate demonstrations
DEMO_END = "\n\n"


def prompt_format(task, shots):
    """The task whose Task.prompt builds the query for `shots` (a bare variant for zero-shot)."""
    if shots == 0 and task.zero_shot_separator is not None:
        return dataclasses.replace(task, instruction=None, separator=task.zero_shot_separator)
    return task


def describe(task, shots):
    if shots is None:
        return "finetuning prompt"
    if prompt_format(task, shots) is not task:
        return f"the bare input, then {task.zero_shot_separator!r}"
    return f"finetuning prompt after up to {shots} training examples" if shots else "the finetuning prompt alone"


def demonstrations(task, enc, block_size, data_root=None, seed=0):
    """Candidate solved training examples as token lists, in a seeded random order."""
    rows = task.load_rows("train", data_root, limit=POOL_ROWS)
    sample = random.Random(seed).sample(rows, min(POOL_SIZE, len(rows)))
    end = enc.encode_ordinary(DEMO_END)
    demos = [task.prompt(r, enc, block_size).ids + task.target_ids(r, enc)[0][:-1] + end for r in sample]
    return demos  # target_ids ends with EOT: a demonstration does not


def with_demonstrations(prompt, demos, shots, room):
    """prompt preceded by the first `shots` demonstrations that fit together in `room` tokens;
    returns (Prompt, number used)."""
    chosen = []
    for demo in demos:
        if len(chosen) == shots:
            break
        if len(demo) <= room:
            chosen.append(demo)
            room -= len(demo)
    ids = [t for demo in chosen for t in demo]
    start, end = prompt.input_span
    return prompt._replace(ids=ids + prompt.ids, input_span=(start + len(ids), end + len(ids))), len(chosen)


def build_prompts(task, rows, enc, block_size, shots=None, data_root=None):
    """The prompts of `rows` for `shots`, and the record of what was done (for the metrics JSON)."""
    prompts = [prompt_format(task, shots).prompt(row, enc, block_size) for row in rows]
    record = {"requested": shots, "format": describe(task, shots)}
    if shots:
        demos = demonstrations(task, enc, block_size, data_root)
        room = [block_size - task.max_target_tokens - len(p.ids) for p in prompts]
        prompts, used = zip(*(with_demonstrations(p, demos, shots, r) for p, r in zip(prompts, room)))
        record.update(used_mean=round(statistics.fmean(used), 3), used_min=min(used), used_max=max(used))
        return list(prompts), list(used), record
    return prompts, [0 if shots == 0 else None] * len(prompts), record
