"""The one training loop, shared by train.py (pretraining) and finetune.py.

It runs on one CPU, one GPU, or many processes under torchrun (DDP), with autocast, optional
torch.compile, gradient accumulation, warmup + cosine learning rate, clipping, periodic
evaluation, a metrics log and atomic checkpoints that resume exactly.

A batch is (x, y, loss_rows, loss_weights, positions): inputs, next-token targets, and for
finetuning the flat positions that carry loss with their weights and the token positions of the
packed documents (built by the data loader, so the model never has to look at a mask on the host). The host waits for the device only at logged steps.
"""
import contextlib
import json
import math
import os
import signal
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import gather_rng, load_checkpoint, load_weights, model_record, save_checkpoint, set_rng_state
from common import UserError
from data import Prefetcher
from runtime import maybe_compile, peak_flops


def lr_at(it, cfg, base_lr):
    """Linear warmup, then cosine decay to min_lr * base_lr / learning_rate."""
    min_lr = cfg.min_lr * base_lr / cfg.learning_rate
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return base_lr * (it + 1) / cfg.warmup_iters
    if it >= decay_iters:
        return min_lr
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (base_lr - min_lr)


def build_optimizers(model, cfg, device):
    """AdamW with weight decay on matrices only; or Muon for the hidden matrices with AdamW for
    the rest (embeddings, head, norms, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    embeds = {id(model.wte.weight), id(model.lm_head.weight)} | ({id(model.wpe.weight)} if model.wpe else set())
    fused = {"fused": True} if device.type == "cuda" else {}
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return [torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, **fused)]
    if cfg.optimizer == "muon":
        from muon import Muon
        hidden = [p for p in params if p.dim() == 2 and id(p) not in embeds]
        rest_matrices = [p for p in params if p.dim() >= 2 and id(p) in embeds]
        vectors = [p for p in params if p.dim() < 2]
        adamw = torch.optim.AdamW([{"params": rest_matrices, "weight_decay": cfg.weight_decay},
                                   {"params": vectors, "weight_decay": 0.0}],
                                  lr=cfg.learning_rate, betas=betas, **fused)
        return [Muon(hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay), adamw]
    raise UserError(f"optimizer={cfg.optimizer!r}; choose adamw or muon")


class StopFlag:
    """SIGINT/SIGTERM ask the loop to checkpoint and exit at the next logged step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nsignal {signum}: saving a checkpoint at the next logged step (again to abort)", flush=True)

    def agreed(self, rt):
        """All ranks must stop at the same step, or DDP would hang. Called at logged steps only,
        where the loop syncs anyway."""
        if not rt.ddp:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class MetricsLog:
    """out_dir/metrics.jsonl: one JSON object per line, appended; a resumed run first drops the
    lines of steps past its checkpoint so that curves have no duplicates."""

    def __init__(self, path, resume_iter=None):
        self.path, keep = path, []
        if resume_iter is not None and os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if line.strip() and json.loads(line).get("iter", 0) <= resume_iter]
            with open(path, "w") as f:
                f.writelines(keep)
        elif resume_iter is None and os.path.exists(path):
            os.remove(path)
        # "time" is training time: a resumed run continues from its last line, so that curves
        # against wall-clock stay monotonic (bench/ablate.py compares recipes at equal time)
        self.started = time.time() - (json.loads(keep[-1]).get("time", 0.0) if keep else 0.0)

    def elapsed(self):
        return time.time() - self.started

    def write(self, **record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


@torch.no_grad()
def estimate_losses(model, eval_sources, eval_iters, rt):
    """Mean loss over eval_iters fixed batches per source (the same batches at every evaluation,
    so successive values are comparable), split across processes. `model` is not DDP-wrapped:
    a rank with no batch to score runs no collective but the final sum."""
    model.eval()
    losses = {}
    for name, source in eval_sources.items():
        total = torch.zeros(2, device=rt.device)
        for k in range(rt.rank, eval_iters, rt.world_size):
            x, y, rows, weights, positions = (t.to(rt.device) if t is not None else None for t in source.batch(0, k))
            with rt.autocast():
                _, loss = model(x, targets=y, loss_rows=rows, loss_weights=weights, positions=positions)
            total += torch.stack([loss.float(), torch.ones((), device=rt.device)])
        if rt.ddp:
            dist.all_reduce(total)
        losses[name] = (total[0] / total[1]).item()
    model.train()
    return losses


def check_out_dir(cfg, names=("ckpt.pt", "metrics.jsonl")):
    """Never overwrite a run without being told to."""
    found = [n for n in names if os.path.exists(os.path.join(cfg.out_dir, n))]
    if found and not cfg.resume and not cfg.overwrite:
        raise UserError(f"{cfg.out_dir} already holds a run ({found[0]}); pass --resume to continue it, "
                        f"--overwrite to replace it, or choose another --out_dir")


class Run:
    """The state of one training run: model, optimizers, scaler, iteration, best validation score."""

    def __init__(self, cfg, model, rt, checkpoint_extra, best_name, selection):
        self.micro_steps, rest = divmod(cfg.gradient_accumulation_steps, rt.world_size)
        if rest or not self.micro_steps:
            raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple "
                            f"of the number of processes ({rt.world_size})")
        self.cfg, self.rt, self.raw_model = cfg, rt, model.to(rt.device)
        self.extra, self.best_name, self.selection = checkpoint_extra or {}, best_name, selection
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        self.optimizers = build_optimizers(model, cfg, rt.device)
        for opt in self.optimizers:  # the schedule scales each group's own base rate (Muon's differs)
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
        self.iter, self.best_val = 0, float("inf")
        self.restored = cfg.resume and os.path.exists(self.ckpt_path)
        if self.restored:
            self._restore()
        elif cfg.resume and rt.master:
            print(f"no checkpoint at {self.ckpt_path}: starting from scratch")
        self.start_iter = self.iter
        self.eval_model = maybe_compile(model, cfg.compile, rt)
        self.model = DDP(self.eval_model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
                         broadcast_buffers=False) if rt.ddp else self.eval_model  # buffers are constants
        self.first_bad_iter = torch.full((), -1, device=rt.device)  # first step whose loss was not finite
        self.first_inputs = None  # for record_ranks

    def _restore(self):
        ckpt = load_checkpoint(self.ckpt_path)
        load_weights(self.raw_model, ckpt["model"], self.ckpt_path)
        saved = ckpt["config"].get("optimizer", "adamw")
        if saved != self.cfg.optimizer:  # Muon's state would not fit AdamW's, nor the reverse
            raise UserError(f"{self.ckpt_path} was trained with optimizer={saved}, not {self.cfg.optimizer}; resume "
                            f"it with --optimizer={saved}, or start a new run (--overwrite or another --out_dir)")
        for opt, state in zip(self.optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        if ckpt["scaler"] and self.scaler.is_enabled():  # a run may resume in another dtype
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iter, self.best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        rng = ckpt["rng"]
        set_rng_state(rng[self.rt.rank] if self.rt.rank < len(rng) else rng[0], self.rt.device)
        if self.rt.master:
            print(f"resuming from {self.ckpt_path} at iteration {self.iter}")

    def batch_keys(self):
        """Each process takes its own slice of the micro-steps, so together they draw every batch once."""
        first = self.rt.rank * self.micro_steps
        return ((it, first + k) for it in range(self.iter, self.cfg.max_iters) for k in range(self.micro_steps))

    def save(self):
        rng = gather_rng(self.rt)  # collective: every process calls save
        if self.rt.master:
            save_checkpoint({**model_record(self.raw_model, self.cfg, **self.extra),
                             "optimizers": [opt.state_dict() for opt in self.optimizers],
                             "scaler": self.scaler.state_dict(), "iter_num": self.iter,
                             "best_val_loss": self.best_val, "rng": rng}, self.ckpt_path)

    def evaluate(self, eval_sources, log):
        self.check_finite()  # never save weights that a non-finite step has spoiled
        losses = estimate_losses(self.eval_model, eval_sources, self.cfg.eval_iters, self.rt)
        score = self.selection(losses)
        if self.rt.master:
            print(f"iter {self.iter}: val {score:.4f} (" + ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
                  + ")", flush=True)
            log.write(type="eval", iter=self.iter, time=log.elapsed(), val_loss=score,
                      **{f"val/{k}": v for k, v in losses.items()})
            if score < self.best_val:
                save_checkpoint({**model_record(self.raw_model, self.cfg, **self.extra), "iter_num": self.iter,
                                 "val_loss": score, "val_losses": losses},
                                os.path.join(self.cfg.out_dir, self.best_name))
        self.best_val = min(self.best_val, score)
        self.save()
        return losses

    def step(self, batches):
        """One optimizer step over micro_steps micro-batches; returns the last micro-batch's loss
        (a device tensor: reading it is a host sync)."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr_at(self.iter, self.cfg, group["initial_lr"])
        for k in range(self.micro_steps):
            x, y, rows, weights, positions = batches.next()
            self.first_inputs = x if self.first_inputs is None else self.first_inputs
            last = k == self.micro_steps - 1
            with contextlib.nullcontext() if not self.rt.ddp or last else self.model.no_sync():
                with self.rt.autocast():
                    _, loss = self.model(x, targets=y, loss_rows=rows, loss_weights=weights, positions=positions)
                self.scaler.scale(loss / self.micro_steps).backward()
        if self.cfg.grad_clip:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        for opt in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.iter += 1
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad_iter < 0)
        self.first_bad_iter = torch.where(bad, self.iter, self.first_bad_iter)  # on the device: no sync
        return loss

    def check_finite(self):
        """A non-finite loss stops the run before anything is saved: the last checkpoint stays good."""
        bad = self.first_bad_iter.clone()
        if self.rt.ddp:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() >= 0:
            raise UserError(f"loss became nan or inf at iteration {int(bad.item())}; {self.ckpt_path} is the "
                            f"last good state: lower learning_rate (or use dtype=bfloat16) and --resume")


class Throughput:
    """Rate, MFU and ETA between logged steps."""

    def __init__(self, cfg, model, rt, head_fraction, start_iter):
        self.tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
        # with a loss mask only head_fraction of the tokens go through the output layer: count just those
        head_flops = 6 * model.lm_head.weight.numel()
        self.flops_per_iter = (model.flops_per_token(cfg.block_size) - (1 - head_fraction) * head_flops) \
            * self.tokens_per_iter
        self.peak = peak_flops(rt.device, cfg.peak_flops) * rt.world_size
        self.t_last, self.last_iter = time.perf_counter(), start_iter

    def measure(self, it, max_iters):
        now = time.perf_counter()
        dt = (now - self.t_last) / max(1, it - self.last_iter)
        self.t_last, self.last_iter = now, it
        return {"ms_per_iter": dt * 1000, "tokens_per_s": self.tokens_per_iter / dt,
                "mfu": self.flops_per_iter / dt / self.peak if self.peak else 0.0, "eta_s": (max_iters - it) * dt}


def train(cfg, model, train_source, eval_sources, rt, checkpoint_extra=None, best_name="best.pt",
          selection=lambda losses: sum(losses.values()) / len(losses), head_fraction=1.0):
    """Run cfg.max_iters optimizer steps. eval_sources: name -> batch source; the selection of
    their losses picks the best checkpoint. Returns the final evaluation losses."""
    check_out_dir(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    run = Run(cfg, model, rt, checkpoint_extra, best_name, selection)
    if run.iter >= cfg.max_iters:
        if rt.master:
            print(f"{run.ckpt_path} is already at iteration {run.iter} of {cfg.max_iters}: nothing to do")
        return {}
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), run.iter if cfg.resume else None) if rt.master else None
    speed = Throughput(cfg, run.raw_model, rt, head_fraction, run.iter)
    if rt.master:
        print(f"{run.raw_model.num_params() / 1e6:.2f}M parameters, {speed.tokens_per_iter:,} tokens per step, "
              f"{rt.world_size} process(es) on {rt.device}, {str(rt.dtype).removeprefix('torch.')}")
    batches, stop, losses = Prefetcher(train_source, rt.device, run.batch_keys()), StopFlag(), {}

    while run.iter < cfg.max_iters:
        if run.iter % cfg.eval_interval == 0 and (run.iter > run.start_iter or not run.restored):  # a checkpoint
            # was written by the evaluation of its own step: a resumed run does not repeat it
            losses = run.evaluate(eval_sources, log)
        loss = run.step(batches)
        if run.iter % cfg.log_interval and run.iter != cfg.max_iters:
            continue
        loss_value = loss.item()  # the only host sync of a logged step, with the two below
        run.check_finite()
        if rt.master:
            s = speed.measure(run.iter, cfg.max_iters)
            lr = run.optimizers[-1].param_groups[0]["lr"]
            print(f"iter {run.iter}/{cfg.max_iters}: loss {loss_value:.4f}, lr {lr:.2e}, {s['ms_per_iter']:.0f} "
                  f"ms/iter, {s['tokens_per_s']:,.0f} tok/s, mfu {s['mfu'] * 100:.1f}%, eta {s['eta_s'] / 60:.1f} min",
                  flush=True)
            log.write(type="train", iter=run.iter, time=log.elapsed(), loss=loss_value, lr=lr,
                      ms_per_iter=s["ms_per_iter"], tokens_per_s=s["tokens_per_s"], mfu=s["mfu"])
        if stop.agreed(rt):
            if run.iter % cfg.eval_interval == 0:  # the evaluation due now would be skipped on resume
                run.evaluate(eval_sources, log)
            else:
                run.save()
            if rt.master:
                print(f"stopped at iteration {run.iter}; rerun with --resume to continue")
            raise SystemExit(130)
    if run.iter > run.start_iter or not losses:  # the last step's evaluation and checkpoint
        losses = run.evaluate(eval_sources, log)
    if rt.ddp:
        record_ranks(run.raw_model, run.first_inputs, rt, log)
    return losses


def record_ranks(model, first_batch, rt, log):
    """Log each process's first-batch and final-weights checksums: the batches must differ and
    the weights must not (a cheap proof that DDP kept the replicas in sync)."""
    weights = sum(float(p.detach().double().sum()) for p in model.parameters())
    batch = float(first_batch.double().sum()) if first_batch is not None else None
    sums = [None] * rt.world_size
    dist.all_gather_object(sums, {"rank": rt.rank, "first_batch": batch, "weights": weights})
    if rt.master:
        log.write(type="ranks", ranks=sums)
        if len({s["weights"] for s in sums}) > 1:
            print(f"warning: processes ended with different weights: {sums}")
