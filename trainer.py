"""The one training loop, shared by train.py (pretraining) and finetune.py.

It runs on one CPU, one GPU, or many processes under torchrun (DDP), with autocast, optional
torch.compile, gradient accumulation, warmup + cosine learning rate, clipping, periodic
evaluation, a metrics log and atomic checkpoints that resume exactly.
"""
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import UserError, torch_save
from data import Prefetcher
from model import GPT, GPTConfig

# dense bf16 peak FLOP/s per GPU, for MFU
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                  "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


@dataclasses.dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dtype: torch.dtype = torch.float32

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def setup_runtime(cfg):
    """Device, dtype and (under torchrun) the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device=cuda but CUDA is not available; use --device=cpu")
    if device == "cuda" and world_size > 1:
        device = f"cuda:{local_rank}"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    elif device.type == "cpu" and world_size > 1:  # share the cores: oversubscribed OpenMP threads crawl
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if world_size > 1:
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend)
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if cuda_bf16 else torch.float16 if device.type == "cuda" else torch.float32
    elif cfg.dtype in names:
        dtype = names[cfg.dtype]
    else:
        raise UserError(f"dtype={cfg.dtype!r}; choose auto, float32, bfloat16 or float16")
    per_rank, rest = divmod(cfg.gradient_accumulation_steps, world_size)
    if rest or per_rank == 0:
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple "
                        f"of the number of processes ({world_size})")
    return Runtime(device, rank, world_size, local_rank, dtype)


def peak_flops(cfg, device):
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), 0.0)
    if device.type == "cpu":  # measured fp32 matmul rate: the best this CPU does in practice
        a = torch.ones(1024, 1024)  # not randn: must not move the RNG a resumed run restored
        a @ a
        t0, n = time.perf_counter(), 10
        for _ in range(n):
            a @ a
        return 2 * 1024 ** 3 * n / (time.perf_counter() - t0)
    return 0.0


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


def build_model(cfg):
    return GPT(GPTConfig(**cfg.model_fields()))


def load_weights(model, state, source):
    """Load a state dict, turning a shape/key mismatch into one line that says what differs."""
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = (f"shape of {wrong[0]}: checkpoint {tuple(state[wrong[0]].shape)} vs config "
                  f"{tuple(own[wrong[0]].shape)}" if wrong else
                  f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}")
        raise UserError(f"{source} does not fit the configured model ({detail}); use the same n_layer, "
                        f"n_head, n_embd, block_size and architecture options as the run that wrote it")
    model.load_state_dict(state)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found; train one first or fix the path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}); the file is damaged "
                        f"or not a checkpoint") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this toolkit (no model / model_config)")
    return ckpt


def model_from_checkpoint(ckpt, path):
    """The GPT a loaded checkpoint describes, with its weights (for sampling and evaluation)."""
    try:
        model = GPT(GPTConfig(**ckpt["model_config"]))
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} has a model_config this code cannot build ({e})") from None
    load_weights(model, ckpt["model"], path)
    return model


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopFlag:
    """SIGINT/SIGTERM ask the loop to checkpoint and exit at the end of the current step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nsignal {signum}: saving a checkpoint after this step (again to abort)", flush=True)

    def agreed(self, rt):
        """All ranks must stop at the same step, or DDP would hang."""
        if not rt.ddp:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class MetricsLog:
    """out_dir/metrics.jsonl: one JSON object per line, appended; a resumed run first drops the
    lines of steps past its checkpoint so that curves have no duplicates."""

    def __init__(self, path, resume_iter=None):
        self.path = path
        if resume_iter is not None and os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if json.loads(line).get("iter", 0) <= resume_iter]
            with open(path, "w") as f:
                f.writelines(keep)
        elif resume_iter is None and os.path.exists(path):
            os.remove(path)

    def write(self, **record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


@torch.no_grad()
def estimate_losses(model, eval_sources, cfg, rt):
    """Mean loss over eval_iters fixed batches per source (the same batches at every evaluation,
    so successive values are comparable), split across processes."""
    model.eval()
    losses = {}
    for name, source in eval_sources.items():
        total = torch.zeros(2, device=rt.device)
        for k in range(rt.rank, cfg.eval_iters, rt.world_size):
            x, y, mask = (t.to(rt.device) if t is not None else None for t in source.batch(0, k))
            with rt.autocast():
                _, loss = model(x, targets=y, loss_mask=mask)
            total += torch.stack([loss.float(), torch.ones((), device=rt.device)])
        if rt.ddp:
            dist.all_reduce(total)
        losses[name] = (total[0] / total[1]).item()
    model.train()
    return losses


def train(cfg, model, train_source, eval_sources, rt, checkpoint_extra=None, best_name="best.pt",
          selection=lambda losses: sum(losses.values()) / len(losses), head_fraction=1.0):
    """Run cfg.max_iters optimizer steps. eval_sources: name -> batch source; the selection of
    their losses picks the best checkpoint. Returns the final evaluation losses."""
    checkpoint_extra = checkpoint_extra or {}
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    model.to(rt.device)
    optimizers = build_optimizers(model, cfg, rt.device)
    for opt in optimizers:  # the schedule scales each group's own base rate (Muon's differs)
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    start_iter, best_val = 0, float("inf")
    if cfg.resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        load_weights(model, ckpt["model"], ckpt_path)
        for opt, state in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        scaler.load_state_dict(ckpt["scaler"])
        start_iter, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        set_rng_state(ckpt["rng"][rt.rank] if rt.rank < len(ckpt["rng"]) else ckpt["rng"][0])
        if rt.master:
            print(f"resuming from {ckpt_path} at iteration {start_iter}")
    elif cfg.resume and rt.master:
        print(f"no checkpoint at {ckpt_path}: starting from scratch")
    if start_iter >= cfg.max_iters:
        if rt.master:
            print(f"{ckpt_path} is already at iteration {start_iter} of {cfg.max_iters}: nothing to do")
        return {}
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), start_iter if cfg.resume else None) \
        if rt.master else None

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    micro_steps = cfg.gradient_accumulation_steps // rt.world_size
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    # with a loss mask only head_fraction of the tokens go through the output layer: count just those
    head_flops = 6 * raw_model.lm_head.weight.numel()
    flops_per_iter = (raw_model.flops_per_token(cfg.block_size) - (1 - head_fraction) * head_flops) * tokens_per_iter
    peak = peak_flops(cfg, rt.device) * rt.world_size
    if rt.master:
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters, {tokens_per_iter:,} tokens per step, "
              f"{rt.world_size} process(es) on {rt.device}, {str(rt.dtype).removeprefix('torch.')}")

    # each process takes its own slice of the micro-steps, so together they draw every batch once
    first = rt.rank * micro_steps
    keys = ((it, first + k) for it in range(start_iter, cfg.max_iters) for k in range(micro_steps))
    batches = Prefetcher(train_source, rt.device, keys)
    stop, losses, it, first_batch = StopFlag(), {}, start_iter, None
    started, t_last, last_logged = time.time(), time.perf_counter(), start_iter

    def model_record():
        return {"model": raw_model.state_dict(), "model_config": dataclasses.asdict(raw_model.config),
                "config": dataclasses.asdict(cfg), **checkpoint_extra}

    def save(it):  # every process calls it: gathering RNG states is collective
        rng = gather_rng(rt)
        if rt.master:
            torch_save({**model_record(), "optimizers": [opt.state_dict() for opt in optimizers],
                        "scaler": scaler.state_dict(), "iter_num": it, "best_val_loss": best_val, "rng": rng},
                       ckpt_path)

    def evaluate(it):
        nonlocal best_val
        losses = estimate_losses(model, eval_sources, cfg, rt)
        score = selection(losses)
        if rt.master:
            print(f"iter {it}: val {score:.4f} (" + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()) + ")",
                  flush=True)
            log.write(type="eval", iter=it, time=time.time() - started, val_loss=score,
                      **{f"val/{k}": v for k, v in losses.items()})
            if score < best_val:
                torch_save({**model_record(), "iter_num": it, "val_loss": score, "val_losses": losses},
                           os.path.join(cfg.out_dir, best_name))
        best_val = min(best_val, score)
        save(it)
        return losses

    while it < cfg.max_iters:
        if it % cfg.eval_interval == 0 and (it > start_iter or it == 0):  # iter 0: the starting point
            losses = evaluate(it)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr_at(it, cfg, group["initial_lr"])
        for k in range(micro_steps):
            x, y, mask = batches.next()
            if first_batch is None:
                first_batch = x
            sync = contextlib.nullcontext() if not rt.ddp or k == micro_steps - 1 else model.no_sync()
            with sync:
                with rt.autocast():
                    _, loss = model(x, targets=y, loss_mask=mask)
                scaler.scale(loss / micro_steps).backward()
        if cfg.grad_clip:
            for opt in optimizers:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        it += 1
        if it % cfg.log_interval == 0 or it == cfg.max_iters:
            loss_value = loss.item()  # the only sync per logged step
            now = time.perf_counter()
            dt = (now - t_last) / (it - last_logged)
            t_last, last_logged = now, it
            if rt.master:
                tok_s = tokens_per_iter / dt
                mfu = flops_per_iter / dt / peak if peak else 0.0
                eta = (cfg.max_iters - it) * dt
                print(f"iter {it}/{cfg.max_iters}: loss {loss_value:.4f}, lr {optimizers[-1].param_groups[0]['lr']:.2e}, "
                      f"{dt * 1000:.0f} ms/iter, {tok_s:,.0f} tok/s, mfu {mfu * 100:.1f}%, eta {eta / 60:.1f} min",
                      flush=True)
                log.write(type="train", iter=it, time=time.time() - started, loss=loss_value,
                          lr=optimizers[-1].param_groups[0]["lr"], ms_per_iter=dt * 1000, tokens_per_s=tok_s, mfu=mfu)
        if stop.agreed(rt):
            save(it)
            if rt.master:
                print(f"stopped at iteration {it}; rerun with --resume to continue")
            raise SystemExit(130)
    if it > start_iter or not losses:  # the last step's evaluation and checkpoint
        losses = evaluate(it)
    if rt.ddp:
        record_ranks(raw_model, first_batch, rt, log)
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


def gather_rng(rt):
    """Every process's RNG state (dropout draws differ per process), gathered to rank 0."""
    state = rng_state()
    if not rt.ddp:
        return [state]
    states = [None] * rt.world_size
    dist.all_gather_object(states, state)
    return states
