"""Batches from memmapped token files, for pretraining and for finetuning.

Every batch is a pure function of (seed, split, step, micro_step): no sampler state to save,
so a resumed run draws exactly the batches the uninterrupted run would have drawn, and each
torchrun process draws different batches by taking its own micro-steps.
"""
import os
import threading
from queue import Queue

import numpy as np
import torch

from common import EOT, UserError


def open_tokens(path):
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; run prepare_owt.py (or point data_dir at its output)")
    if os.path.getsize(path) < 4:
        raise UserError(f"{path} is empty; prepare more documents (or a larger --val-fraction for val.bin)")
    return np.memmap(path, dtype=np.uint16, mode="r")


def inputs_and_targets(rows):
    """(x, y) of (B, T + 1) token rows, contiguous: a strided tensor's pinned copy to a GPU would
    first be copied again, unpinned, on the training thread."""
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def batch_rng(seed, *keys):
    return np.random.default_rng([seed, *keys])


class TokenWindows:
    """Random contiguous windows of a token file: inputs x and next-token targets y."""

    def __init__(self, path, block_size, batch_size, seed, split_id=0):
        self.tokens = open_tokens(path)
        if len(self.tokens) <= block_size:
            raise UserError(f"{path} has {len(self.tokens)} tokens, fewer than block_size+1={block_size + 1}")
        self.block_size, self.batch_size, self.seed, self.split_id = block_size, batch_size, seed, split_id

    def sample_rows(self, rng, n):
        starts = rng.integers(0, len(self.tokens) - self.block_size - 1, size=n)
        return np.stack([self.tokens[s:s + self.block_size + 1] for s in starts]).astype(np.int64)

    def batch(self, step, micro_step):
        rows = self.sample_rows(batch_rng(self.seed, self.split_id, step, micro_step), self.batch_size)
        return inputs_and_targets(torch.from_numpy(rows)) + (None, None)


class FinetuneMixture:
    """Rows packed with whole task examples (prompt + target + EOT) drawn by task weight, plus a
    replay share of rows of plain pretraining text. Loss falls only on targets (and their EOT);
    the rest of a row that no example fits in is EOT padding without loss."""

    def __init__(self, splits, weights, block_size, batch_size, seed, split_id=0,
                 replay=None, replay_fraction=0.0):
        self.splits, self.names = splits, list(splits)
        w = np.array([weights[n] for n in self.names], dtype=np.float64)
        self.probs = w / w.sum()
        self.block_size, self.batch_size, self.seed, self.split_id = block_size, batch_size, seed, split_id
        self.replay, self.replay_fraction = replay, replay_fraction if replay is not None else 0.0

    def pack_row(self, rng):
        x = np.full(self.block_size + 1, EOT, dtype=np.int64)
        mask = np.zeros(self.block_size + 1, dtype=bool)
        filled = 0
        for _ in range(64):  # bounded: stop once an example does not fit
            split = self.splits[self.names[rng.choice(len(self.names), p=self.probs)]]
            tokens, prompt_len = split.example(int(rng.integers(len(split))))
            if filled + len(tokens) > self.block_size + 1:
                if filled == 0:
                    raise UserError(f"a {len(tokens)}-token example does not fit block_size "
                                    f"{self.block_size}; rerun prepare_finetune.py --block-size {self.block_size}")
                break
            x[filled:filled + len(tokens)] = tokens
            mask[filled + prompt_len:filled + len(tokens)] = True
            filled += len(tokens)
        return x, mask

    def batch(self, step, micro_step):
        rng = batch_rng(self.seed, self.split_id, step, micro_step)
        rows, masks = [], []
        n_replay = int(rng.binomial(self.batch_size, self.replay_fraction)) if self.replay_fraction else 0
        if n_replay:
            rows.extend(self.replay.sample_rows(rng, n_replay))
            masks.extend(np.ones((n_replay, self.block_size + 1), dtype=bool))
        for _ in range(self.batch_size - n_replay):
            x, mask = self.pack_row(rng)
            rows.append(x)
            masks.append(mask)
        loss_rows, loss_weights = loss_positions(np.stack(masks)[:, 1:])  # a target carries loss if its token does
        return inputs_and_targets(torch.from_numpy(np.stack(rows))) + (loss_rows, loss_weights)


class RandomTokens:
    """Stand-in batches of random tokens, for benchmarks (speed does not depend on the tokens).
    loss_fraction > 0 gives finetuning-shaped batches: that share of each row, at its end, carries loss."""

    def __init__(self, block_size, batch_size, seed, loss_fraction=0.0):
        self.block_size, self.batch_size, self.seed, self.loss_fraction = block_size, batch_size, seed, loss_fraction

    def batch(self, step, micro_step):
        rng = batch_rng(self.seed, step, micro_step)
        rows = torch.from_numpy(rng.integers(0, 50257, size=(self.batch_size, self.block_size + 1)))
        if not self.loss_fraction:
            return inputs_and_targets(rows) + (None, None)
        mask = np.zeros((self.batch_size, self.block_size), dtype=bool)
        mask[:, int(self.block_size * (1 - self.loss_fraction)):] = True
        return inputs_and_targets(rows) + loss_positions(mask)


def loss_positions(mask, bucket=256):
    """(flat indices, weights) of a (B, T) loss mask: every masked position weighs 1/count, so
    the weighted sum is the mean loss. The index is padded (position 0, weight 0) to a multiple
    of `bucket`, so a compiled model sees few distinct shapes."""
    rows = np.flatnonzero(mask.reshape(-1))
    if len(rows) == 0:
        raise UserError("a finetuning batch has no target token; check the prepared data")
    padded = -(-len(rows) // bucket) * bucket
    index = np.zeros(padded, dtype=np.int64)
    weights = np.zeros(padded, dtype=np.float32)
    index[:len(rows)], weights[:len(rows)] = rows, 1.0 / len(rows)
    return torch.from_numpy(index), torch.from_numpy(weights)


def loss_mask(batch):
    """The (B, T) boolean mask of a batch's loss-carrying target positions (None: all of them)."""
    x, _, rows, weights = batch
    if rows is None:
        return torch.ones_like(x, dtype=torch.bool)
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[rows[weights > 0]] = True
    return mask.view_as(x)


class Prefetcher:
    """Builds the next batch on a background thread while the model computes (and pins it
    there, for a non-blocking copy to a CUDA device)."""

    def __init__(self, source, device, keys):
        self.source, self.device, self.keys = source, device, iter(keys)
        self.queue = Queue(maxsize=2)
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self):
        for key in self.keys:
            try:
                batch = self.source.batch(*key)
                if self.device.type == "cuda":
                    batch = tuple(t.pin_memory() if t is not None else None for t in batch)
                self.queue.put(batch)
            except Exception as e:  # surface loader errors in the training thread
                self.queue.put(e)
                return
        self.queue.put(None)

    def next(self):
        item = self.queue.get()
        if isinstance(item, Exception):
            raise item
        return to_device(item, self.device)


def to_device(batch, device):
    """Move a batch's tensors to the model's device (any device: cuda, mps, ...)."""
    if device.type == "cpu":
        return batch
    return tuple(t.to(device, non_blocking=t.is_pinned()) if t is not None else None for t in batch)
