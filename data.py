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
    if os.path.getsize(path) % 2:  # uint16 tokens: a file cut mid-token (a partial copy or download)
        raise UserError(f"{path} has an odd number of bytes, so it is not whole uint16 tokens; "
                        f"copy it again or rerun prepare_owt.py")
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
        return inputs_and_targets(torch.from_numpy(rows)) + (None, None, None)


def check_mix_options(replay_fraction, average):
    """The mixture's own settings, checkable before any data is opened (finetune.py does so first)."""
    if average not in ("example", "token"):
        raise UserError(f"task_average={average!r}; choose example or token")
    if not 0 <= replay_fraction < 1:
        raise UserError(f"replay_fraction={replay_fraction} must be at least 0 and below 1")


class FinetuneMixture:
    """Rows packed with whole task examples (prompt + target + EOT) drawn by task weight, plus
    replay_fraction of the batch's positions as one window of pretraining text (so replay gets
    the same share of compute as of the loss). Every packed document starts at position 0 and
    attends only to itself, as a prompt does at evaluation (the batch carries the positions).

    The loss is (1 - replay_fraction) * task loss + replay_fraction * replay loss. Within the
    tasks `average="example"` gives every example the same weight, spread over its target tokens,
    so task_weights are the tasks' shares of the loss too ("token": every target token weighs the
    same, which hands most of the loss to CNN/DM's long summaries). The same weight in every
    batch, not just within one: an example weighs 1 / (the examples a batch holds on average), a
    constant of the calibration, not 1 / (the examples this batch holds), which would give the
    few examples of a batch of long ones more weight each. So a batch's loss weights sum to about
    1, not exactly; its mean loss is its loss over its weights' sum."""

    def __init__(self, splits, weights, block_size, batch_size, seed, split_id=0,
                 replay=None, replay_fraction=0.0, average="example", isolate=True):
        check_mix_options(replay_fraction, average)
        self.splits, self.names = [splits[n] for n in splits], list(splits)
        w = np.array([weights[n] for n in self.names], dtype=np.float64)
        self.weights = w / w.sum()
        self.lengths = [np.asarray(s.index[:, 2]) for s in self.splits]
        self.target_lengths = [np.asarray(s.index[:, 2] - s.index[:, 1]) for s in self.splits]
        self.room = block_size + 1  # tokens per row: inputs and the last target
        self.block_size, self.batch_size, self.seed, self.split_id = block_size, batch_size, seed, split_id
        self.replay, self.replay_fraction, self.average = replay, replay_fraction if replay else 0.0, average
        self.isolate = isolate  # False: examples see the ones before them in their row (no positions)
        self.replay_len = int(round(self.replay_fraction * batch_size * self.room))
        if self.replay_len and batch_size * self.room - self.replay_len < max(map(np.min, self.lengths)):
            raise UserError(f"replay_fraction {replay_fraction} leaves no room for task examples; lower it")
        self.probs, self.expected = self.calibrate()
        self.drawn = None  # a Counter: while set, batch() counts the examples it places, by task

    def layout(self, rng, probs):
        """Where each drawn example goes, [(row, start, task, index)], and the task of the draw that
        ended the batch. Examples fill the rows in the order drawn, after the replay window; one
        that does not fit in the current row starts the next row, and the first that fits in no row
        ends the batch (it is not used)."""
        sizes = np.array([len(n) for n in self.lengths])
        row, filled = divmod(self.replay_len, self.room)
        placed = []
        while True:
            tasks = rng.choice(len(probs), size=32, p=probs)
            picks = (rng.random(32) * sizes[tasks]).astype(np.int64)
            for task, i in zip(tasks.tolist(), picks.tolist()):
                n = int(self.lengths[task][i])
                if n > self.room:
                    raise UserError(f"a {n}-token example does not fit block_size {self.block_size}; "
                                    f"rerun prepare_finetune.py --block-size {self.block_size}")
                if filled + n > self.room:
                    row, filled = row + 1, 0
                    if row == self.batch_size:
                        return placed, task
                placed.append((row, filled, task, i))
                filled += n

    def calibrate(self, examples=20000, max_batches=2000, rounds=3):
        """(drawing probabilities, {"examples", "targets": their number per batch on average}).
        Under the probabilities the examples that make it into batches follow the weights: the draw
        that ends a batch is not used and is more often a long one, so long tasks are drawn a little
        more often. By Wald's identity a batch that takes N draws holds p_k E[N] - q_k examples of
        task k on average, q_k the chance that its last draw is task k; drawing at
        p = ((E[N] - 1) weights + q) / E[N] makes that proportional to the weights. E[N] and q
        depend on p, so a few rounds, each measured on the example lengths alone with fixed draws
        (the counts' own noise never enters p: only the means E[N] and q do)."""
        probs = self.weights.copy()
        for _ in range(rounds if len(probs) > 1 else 0):
            draws, last, _, _ = self.draw_statistics(probs, examples, max_batches)
            probs = ((draws - 1) * self.weights + last) / draws  # sums to 1: last does
        _, _, examples_per_batch, targets_per_batch = self.draw_statistics(probs, examples, max_batches)
        return probs, {"examples": examples_per_batch, "targets": targets_per_batch}

    def draw_statistics(self, probs, examples, max_batches):
        """Per batch on average, at drawing probabilities probs, over fixed draws of about `examples`
        examples (in at most max_batches batches): draws taken (the unused last one included), the
        tasks of the last draw (shares), examples held and their target tokens."""
        rng, batches, draws, held, targets = batch_rng(self.seed, 7919), 0, 0, 0, 0
        last = np.zeros(len(probs))
        while held < examples and batches < max_batches:
            placed, stop = self.layout(rng, probs)
            batches, draws, held = batches + 1, draws + len(placed) + 1, held + len(placed)
            last[stop] += 1
            targets += sum(int(self.target_lengths[task][i]) for _, _, task, i in placed)
        return draws / batches, last / batches, held / batches, targets / batches

    def batch(self, step, micro_step):
        """(x, y, loss_rows, loss_weights, positions): positions restart at 0 in each document."""
        rng = batch_rng(self.seed, self.split_id, step, micro_step)
        tokens = np.full((self.batch_size, self.room), EOT, dtype=np.int64)
        starts = np.zeros((self.batch_size, self.room), dtype=bool)  # where a document (or padding) begins
        starts[:, 0] = True
        replay = np.zeros((self.batch_size, self.room), dtype=bool)
        if self.replay_len:  # one window per row it spans, so each row's piece is a document
            windows = self.replay.sample_rows(rng, -(-self.replay_len // self.room))
            tokens.reshape(-1)[:self.replay_len] = windows.reshape(-1)[:self.replay_len]
            replay.reshape(-1)[:self.replay_len] = True
        targets = []
        for row, start, task, i in self.layout(rng, self.probs)[0]:
            ex, prompt_len = self.splits[task].example(i)
            tokens[row, start:start + len(ex)] = ex
            if self.drawn is not None:
                self.drawn[self.names[task]] += 1
            starts[row, start] = True
            targets.append((row, start + prompt_len, start + len(ex)))
        ends = np.flatnonzero(np.diff(replay.reshape(-1).astype(np.int8)) < 0) + 1  # padding after replay
        starts.reshape(-1)[ends] = True
        for row, _, end in targets:
            starts[row, end:end + 1] = True  # the padding after an example (if any) is a document too
        weight = np.zeros((self.batch_size, self.room))  # loss weight of predicting each token
        replay &= ~starts  # the first token of a piece has nothing of its document to be predicted from
        if replay.any():
            weight[replay] = self.replay_fraction / replay.sum()
        for row, begin, end in targets:  # the expected count, not this batch's: the same weight in every batch
            per = 1.0 / (self.expected["examples"] * (end - begin)) if self.average == "example" \
                else 1.0 / self.expected["targets"]
            weight[row, begin:end] = (1.0 - self.replay_fraction) * per
        col = np.arange(self.room)
        positions = col - np.maximum.accumulate(np.where(starts, col, 0), axis=1)
        loss_rows, loss_weights = loss_positions(weight[:, 1:])  # a target carries loss if its token does
        x, y = inputs_and_targets(torch.from_numpy(tokens))
        positions = torch.from_numpy(positions[:, :-1]).contiguous() if self.isolate else None
        return x, y, loss_rows, loss_weights, positions


class RandomTokens:
    """Stand-in batches of random tokens, for benchmarks (speed does not depend on the tokens).
    loss_fraction > 0 gives finetuning-shaped batches: that share of each document, at its end, carries
    loss; documents > 1 packs each row with that many documents of equal length, each attending only
    to itself (the batch carries their positions, as FinetuneMixture's do)."""

    def __init__(self, block_size, batch_size, seed, loss_fraction=0.0, documents=1):
        self.block_size, self.batch_size, self.seed, self.loss_fraction = block_size, batch_size, seed, loss_fraction
        self.documents = documents

    def batch(self, step, micro_step):
        rng = batch_rng(self.seed, step, micro_step)
        rows = torch.from_numpy(rng.integers(0, 50257, size=(self.batch_size, self.block_size + 1)))
        if not self.loss_fraction:
            return inputs_and_targets(rows) + (None, None, None)
        length = -(-self.block_size // self.documents)
        position = np.arange(self.block_size) % length  # restarts at 0 in each document
        size = np.minimum(length, self.block_size - np.arange(self.block_size) // length * length)
        mask = np.broadcast_to(position >= size * (1 - self.loss_fraction), (self.batch_size, self.block_size))
        positions = torch.from_numpy(position).expand(self.batch_size, -1).contiguous() if self.documents > 1 else None
        return inputs_and_targets(rows) + loss_positions(mask) + (positions,)


LOSS_BUCKET = 256  # loss indices are padded to a multiple of this: a compiled model sees few shapes


def loss_positions(weight, bucket=LOSS_BUCKET):
    """(flat indices, weights) of a (B, T) array of loss weights, kept as they are (or a boolean
    mask: every masked position weighs 1/count, so the weighted sum is the mean loss). The index is
    padded (position 0, weight 0) to a multiple of `bucket`, so a compiled model sees few shapes."""
    weight = np.asarray(weight)
    weight = (weight / max(weight.sum(), 1) if weight.dtype == bool else weight.astype(np.float64)).reshape(-1)
    rows = np.flatnonzero(weight)
    if len(rows) == 0:
        raise UserError("a finetuning batch has no target token; check the prepared data")
    return _padded(torch.from_numpy(rows), torch.from_numpy(weight[rows]).float(), bucket)


def _padded(index, weights, bucket=LOSS_BUCKET):
    n = -(-max(len(index), 1) // bucket) * bucket
    return (torch.cat((index, index.new_zeros(n - len(index)))),
            torch.cat((weights, weights.new_zeros(n - len(weights)))))


def row_range(batch, a, b):
    """Rows a..b of a batch as a batch of their own, and their share of the batch's loss: a mean loss
    (pretraining) splits by rows; a weighted one (finetuning) keeps its weights, which sum over the
    whole batch, and only re-indexes them. (Selecting the loss index syncs with the device.)"""
    x, y, rows, weights, positions = batch
    B, T = x.shape
    cut = (x[a:b], y[a:b], None, None, None if positions is None else positions[a:b])
    if rows is None:
        return cut, (b - a) / B
    keep = (rows >= a * T) & (rows < b * T) & (weights != 0)
    return cut[:2] + _padded(rows[keep] - a * T, weights[keep]) + cut[4:], 1.0


def split_rows(batch, parts):
    """A batch as `parts` batches of consecutive rows, as even as the rows allow, each with its share
    of the loss: the shares times the pieces' losses sum to the batch's loss, so a micro-batch too
    large for memory runs as pieces with the same gradient."""
    B = batch[0].shape[0]
    bounds = [round(B * k / parts) for k in range(parts + 1)]
    return [row_range(batch, a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def loss_token_fraction(source, n=8):
    """The share of a source's batch positions that carry loss (1.0 without a loss index)."""
    masks = [loss_mask(source.batch(0, k)) for k in range(n)]
    return float(torch.cat([m.flatten() for m in masks]).float().mean())


def loss_mask(batch):
    """The (B, T) boolean mask of a batch's loss-carrying target positions (None: all of them)."""
    x, _, rows, weights = batch[:4]
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
