"""Finetune a pretrained GPT on a random mix of tasks (CNN/DailyMail, SQuAD, SST-2) plus a
share of pretraining text, with the loss on target tokens only. Same loop as pretraining.

    python prepare_finetune.py --block-size 512 --data-root ../shared/data
    python finetune.py config/finetune_cpu.py --init_from=out/cpu/ckpt.pt
    python finetune.py config/finetune_cpu.py --init_from=gpt2   # OpenAI's GPT-2 (or a local HF folder)
    torchrun --standalone --nproc_per_node=8 finetune.py config/finetune_gpu.py

Writes out_dir/model.pt (the best model by mean per-task loss on the selection split, a slice that
prepare_finetune.py held out of each task's train split: the deliverable), out_dir/ckpt.pt (the
last state, for --resume) and out_dir/metrics.jsonl. Training reads only the train and select
splits: a split that is reported (validation, test) never steers it.
"""
import collections
import json
import os
import sys

# common first: it sets OMP_WAIT_POLICY, which OpenMP reads once, as torch loads it
from common import UserError, run_main

import torch

import tasks
from config import FinetuneConfig, parse_config
from data import FinetuneMixture, TokenWindows, check_mix_options
from checkpoint import pretrained_model
from runtime import choose_attention, setup_runtime
from trainer import train


def task_weights(cfg, names, sizes):
    """Sampling weight per task: given explicitly, or each task's size capped at mix_cap (so a
    huge task does not drown the small ones)."""
    return given_weights(cfg, names) or {n: float(min(sizes[n], cfg.mix_cap)) for n in names}


def given_weights(cfg, names):
    """task_weights as {task: weight}, checked against the tasks; None when not given."""
    if not cfg.task_weights:
        return None
    weights = {}
    for item in cfg.task_weights.split(","):
        name, _, value = item.partition(":")
        name = name.strip()
        if name not in names:
            raise UserError(f"task_weights names {name!r}, which is not in tasks ({', '.join(names)})")
        try:
            weights[name] = float(value)
        except ValueError:
            raise UserError(f"task_weights entry {item!r} must look like name:number") from None
    missing = [n for n in names if n not in weights]
    if missing or any(w < 0 for w in weights.values()) or not sum(weights.values()):
        raise UserError(f"task_weights must give every task a weight >= 0, not all 0 (missing: {missing})")
    return weights


def open_task_splits(cfg, names, split):
    """{task: FinetuneSplit}, the block size the data was prepared for (one for all tasks) and
    {task: its meta.json}."""
    splits, block_sizes, metas = {}, {}, {}
    for name in names:
        meta_path = os.path.join(cfg.finetune_dir, name, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"{meta_path} not found; run prepare_finetune.py --tasks {name} "
                            f"--block-size {cfg.block_size} first")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta["tasks_version"] != tasks.TASKS_VERSION:
            raise UserError(f"{meta_path} was prepared with task prompts v{meta['tasks_version']}, this code has "
                            f"v{tasks.TASKS_VERSION}; rerun prepare_finetune.py")
        if meta["block_size"] > cfg.block_size:
            raise UserError(f"{meta_path} was prepared for block_size {meta['block_size']} but the model has "
                            f"{cfg.block_size}; rerun prepare_finetune.py --block-size {cfg.block_size}")
        if split not in meta["splits"]:
            raise UserError(f"{meta_path} has no {split!r} split; rerun prepare_finetune.py --block-size "
                            f"{meta['block_size']} (it writes train and select, the slice held out of train that "
                            f"model.pt is chosen on)")
        block_sizes[name], metas[name] = meta["block_size"], meta
        splits[name] = tasks.FinetuneSplit(os.path.join(cfg.finetune_dir, name, split))
        if not len(splits[name]):
            raise UserError(f"{cfg.finetune_dir}/{name}/{split} has no examples")
    if len(set(block_sizes.values())) > 1:
        raise UserError(f"the tasks in {cfg.finetune_dir} were prepared for different block sizes {block_sizes}; "
                        f"rerun prepare_finetune.py with one --block-size for all of them")
    return splits, block_sizes[names[0]], metas


def realised_mix(source, min_examples=2000, max_batches=1000):
    """The examples per task that the run's first batches really hold (drawn exactly as training
    draws them), to set beside the weights, and the share of positions that replay text fills."""
    source.drawn, batches = collections.Counter(), 0
    while sum(source.drawn.values()) < min_examples and batches < max_batches:
        source.batch(batches, 0)
        batches += 1
    drawn, source.drawn = source.drawn, None
    return {"batches": batches, "examples": {n: drawn[n] for n in source.names},
            "replay_positions": source.replay_len / (source.batch_size * source.room)}


def check_settings(cfg):
    """The run's own settings, before any data or checkpoint is looked for: a mistyped task_weights
    is reported even where the data is not prepared yet. Returns the task names."""
    names = [task.name for task in tasks.task_list(cfg.tasks)]
    given_weights(cfg, names)
    check_mix_options(cfg.replay_fraction, cfg.task_average)
    if cfg.mix_cap < 1:
        raise UserError(f"mix_cap={cfg.mix_cap} must be at least 1 (examples a task counts for at most)")
    return names


def main(argv=None):
    cfg = parse_config(FinetuneConfig, sys.argv[1:] if argv is None else argv)
    names = check_settings(cfg)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.num_threads, cfg.backend)
    torch.manual_seed(cfg.seed)
    model = pretrained_model(cfg)

    train_splits, data_block_size, metas = open_task_splits(cfg, names, "train")
    select_splits = open_task_splits(cfg, names, tasks.SELECTION_SPLIT)[0]
    selection = {n: metas[n]["selection"] for n in names}
    weights = task_weights(cfg, names, {n: len(s) for n, s in train_splits.items()})

    def sources(batch_size):  # the trainer settles the micro-batch (batch_size=auto fits it to memory)
        replay = None
        if cfg.replay_fraction > 0:
            replay = TokenWindows(os.path.join(cfg.data_dir, "train.bin"), cfg.block_size, batch_size, cfg.seed)
        train_source = FinetuneMixture(train_splits, weights, cfg.block_size, batch_size, cfg.seed,
                                       replay=replay, replay_fraction=cfg.replay_fraction, average=cfg.task_average,
                                       isolate=cfg.isolate_examples)
        # loss per target token on the held-out slice of train: comparable across objectives
        eval_sources = {n: FinetuneMixture({n: s}, {n: 1.0}, cfg.block_size, batch_size, cfg.seed, split_id=1,
                                           average="token") for n, s in select_splits.items()}
        return train_source, eval_sources

    def describe(train_source):
        mix, total = realised_mix(train_source), sum(weights.values())
        drawn = sum(mix["examples"].values())
        lines = ["task mix: " + ", ".join(f"{n} {w / total:.1%}" for n, w in weights.items()) +
                 f"; replay text {cfg.replay_fraction:.0%} of positions and of the loss",
                 f"realised in the first {mix['batches']} batches: " + ", ".join(
                     f"{n} {c / max(drawn, 1):.1%}" for n, c in mix["examples"].items()) + " of examples",
                 "model.pt is chosen on the selection split, held out of train: " + ", ".join(
                     f"{n} {s['examples']:,} examples" for n, s in selection.items())]
        return lines, {"realised_mix": mix, "selection": selection}
    if cfg.replay_fraction > 0:  # missing replay text fails now, before anything is trained
        TokenWindows(os.path.join(cfg.data_dir, "train.bin"), cfg.block_size, 1, cfg.seed)
    # evaluate.py builds its prompts at the data's block size, byte for byte those of finetuning
    extra = {"tasks_version": tasks.TASKS_VERSION, "tasks": names, "init_from": cfg.init_from,
             "data_block_size": data_block_size, "finetune_dir": cfg.finetune_dir}
    if cfg.isolate_examples:  # packed examples: FlexAttention's block mask where it runs, else the dense mask
        choose_attention(model, rt)
    train(cfg, model, sources, rt, checkpoint_extra=extra, best_name="model.pt", describe=describe)
    if rt.ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
