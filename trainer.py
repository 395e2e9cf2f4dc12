"""The one training loop, shared by train.py (pretraining) and finetune.py.

It runs on one CPU, one GPU, or many processes under torchrun (DDP), with autocast, optional
torch.compile, gradient accumulation, warmup + cosine (or warmup-stable-decay) learning rate,
clipping, periodic evaluation, a metrics log and atomic checkpoints that resume exactly.

A batch is (x, y, loss_rows, loss_weights, positions): inputs, next-token targets, and for
finetuning the flat positions that carry loss with their weights and the token positions of the
packed documents (built by the data loader, so the model never has to look at a mask on the host).
The host waits for the device only at logged steps. How a step is batched and how long the run
may take is plan.py's: the micro-batch (fitted to memory with batch_size=auto), the time budget.
"""
import contextlib
import copy
import dataclasses
import inspect
import json
import math
import os
import signal
import socket
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import memory
from checkpoint import (changed_model_fields, gather_rng, load_checkpoint, load_weights, model_record, rng_state,
                        save_checkpoint, set_rng_state)
from common import UserError
from data import Prefetcher, loss_token_fraction, row_range, split_rows, to_device
from muon import Muon
from plan import (BatchPlan, TimeBudget, budget_line, divisors, figures_line, initial_plan, probe_line,
                  sequences_per_process, start_figures)
from runtime import cpu_peak_flops, maybe_compile, peak_flops, synchronize

clock = time.perf_counter  # every duration the loop plans with (tests run it faster)
STOPPED_BY_SIGNAL, STOPPED_FOR_TIME = 130, 75  # exit statuses of a run that stopped early with a checkpoint


def lr_at(it, cfg, base_lr):
    """Linear warmup, then cosine decay to min_lr * base_lr / learning_rate; or (lr_schedule=wsd)
    warmup, the peak rate, and a linear decay to the same floor over the last cooldown_frac of the
    decay span. Until its cooldown WSD's rate does not depend on max_iters: a run resumed with more
    steps, or cut short by a budget, keeps the schedule it had."""
    min_lr = cfg.min_lr * base_lr / cfg.learning_rate
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return base_lr * (it + 1) / cfg.warmup_iters
    if it >= decay_iters:
        return min_lr
    if cfg.lr_schedule == "wsd":
        return min_lr + (base_lr - min_lr) * min(1.0, (decay_iters - it) / (cfg.cooldown_frac * decay_iters))
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (base_lr - min_lr)


def build_optimizers(model, cfg, rt):
    """AdamW with weight decay on matrices only; or Muon for the hidden matrices with AdamW for
    the rest (embeddings, head, norms, biases). Fused AdamW where the device plan has it (CUDA);
    Muon's Newton-Schulz compiled on CUDA unless --compile=false; with muon_split_qkv the fused
    Q/K/V matrices are a Muon group of their own, orthogonalized as three blocks."""
    params = [p for p in model.parameters() if p.requires_grad]
    embeds = {id(model.wte.weight), id(model.lm_head.weight)} | ({id(model.wpe.weight)} if model.wpe else set())
    fused = {"fused": True} if rt.plan.fused_adamw else {}
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return [torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, **fused)]
    if cfg.optimizer == "muon":
        hidden = [p for p in params if p.dim() == 2 and id(p) not in embeds]
        rest_matrices = [p for p in params if p.dim() >= 2 and id(p) in embeds]
        vectors = [p for p in params if p.dim() < 2]
        adamw = torch.optim.AdamW([{"params": rest_matrices, "weight_decay": cfg.weight_decay},
                                   {"params": vectors, "weight_decay": 0.0}],
                                  lr=cfg.learning_rate, betas=betas, **fused)
        qkv = {id(block.attn.c_attn.weight) for block in model.blocks} if cfg.muon_split_qkv else set()
        groups = [{"params": [p for p in hidden if id(p) not in qkv]}]
        if qkv:  # Q, K and V orthogonalized apart, as the separate matrices they act as
            groups.append({"params": [p for p in hidden if id(p) in qkv], "blocks": 3})
        decay = cfg.weight_decay if cfg.muon_weight_decay == -1 else cfg.muon_weight_decay
        return [Muon(groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=decay, ns_variant=cfg.muon_ns,
                     compile=None if cfg.compile else False), adamw]
    raise UserError(f"optimizer={cfg.optimizer!r}; choose adamw or muon")


class StopFlag:
    """SIGINT, SIGTERM and SIGUSR1 (what SLURM's --signal sends before a job's time is up) ask the loop
    to checkpoint and exit at the next logged step; so does the --max_minutes deadline (time_up).
    The previous handlers come back when the run ends."""
    SIGNALS = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None]

    def __init__(self):
        self.requested, self.time_up, self.reason = False, False, None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C means now; a repeated SIGTERM or SIGUSR1 is the same request
            if signum == signal.SIGINT:  # again (SLURM signals every process, and torchrun passes it on too)
                raise KeyboardInterrupt
            return
        self.requested = True
        again = " (Ctrl-C again to abort)" if signum == signal.SIGINT else ""
        print(f"\nsignal {signum}: saving a checkpoint at the next logged step{again}", flush=True)

    def agreed(self, rt):
        """All ranks must stop at the same step, or DDP would hang. Called at logged steps only,
        where the loop syncs anyway. Sets reason: "signal" or "time"."""
        code = 2 if self.requested else 1 if self.time_up else 0
        if rt.ddp:
            flag = torch.tensor([float(code)], device=rt.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        self.reason = {0: None, 1: "time", 2: "signal"}[code]
        return code > 0


def wandb_module(cfg):
    """The wandb module when wandb_log is on, else None: imported only when asked for, and checked
    by every process before any collective, so a missing package stops them all alike."""
    if not cfg.wandb_log:
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=true needs the wandb package: pip install wandb (or leave wandb_log off)") from None
    return wandb


def wandb_run(cfg, wandb):
    """A Weights & Biases run for MetricsLog to send its records to, or None (wandb: None). It
    writes its files under out_dir/wandb; WANDB_MODE=offline keeps them there (`wandb sync` uploads
    them later). A resumed run is a new W&B run. Charts are drawn against the records' `iter`."""
    if wandb is None:
        return None
    name = cfg.wandb_run_name or os.path.basename(os.path.normpath(cfg.out_dir))
    run = wandb.init(project=cfg.wandb_project, name=name, config=dataclasses.asdict(cfg), dir=cfg.out_dir)
    run.define_metric("*", step_metric="iter")
    return run


class MetricsLog:
    """out_dir/metrics.jsonl: one JSON object per line, appended; a resumed run first drops the
    lines of steps past its checkpoint so that curves have no duplicates. Each record also goes to
    `tracker` (a wandb run, see wandb_run), as it is, if one is given."""

    def __init__(self, path, resume_iter=None, tracker=None):
        self.path, self.tracker, keep = path, tracker, []
        if resume_iter is not None and os.path.exists(path):
            with open(path) as f:  # a stop record says why the last session ended: not this one's
                records = [(line, json.loads(line)) for line in f if line.strip()]
            keep = [line for line, r in records if r.get("iter", 0) <= resume_iter and r.get("type") != "stop"]
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
        if self.tracker is not None:
            self.tracker.log(record)

    def close(self):
        if self.tracker is not None:
            self.tracker.finish()


@torch.no_grad()
def estimate_losses(model, eval_sources, eval_iters, rt):
    """Mean loss over eval_iters fixed batches per source (the same batches at every evaluation,
    so successive values are comparable), split across processes: the batches' losses over the
    sum of their loss weights (a finetuning batch's need not sum to 1). `model` is not DDP-wrapped:
    a rank with no batch to score runs no collective but the final sum."""
    model.eval()
    losses = {}
    for name, source in eval_sources.items():
        total = torch.zeros(2, device=rt.device)
        for k in range(rt.rank, eval_iters, rt.world_size):
            x, y, rows, weights, positions = (t.to(rt.device) if t is not None else None for t in source.batch(0, k))
            with rt.autocast():
                _, loss = model(x, targets=y, loss_rows=rows, loss_weights=weights, positions=positions)
            total += torch.stack([loss.float(), loss_mass(weights, rt.device)])
        if rt.ddp:
            dist.all_reduce(total)
        losses[name] = (total[0] / total[1]).item()
    model.train()
    return losses


def loss_mass(weights, device, share=1.0):
    """What a batch's loss weights sum to (a mean loss's: 1), times its share of its batch: its loss
    over this is its mean loss per unit of weight."""
    return weights.sum() * share if weights is not None else torch.full((), share, device=device)


def check_out_dir(cfg, names=("ckpt.pt", "metrics.jsonl")):
    """Never overwrite a run without being told to."""
    found = [n for n in names if os.path.exists(os.path.join(cfg.out_dir, n))]
    if found and not cfg.resume and not cfg.overwrite:
        raise UserError(f"{cfg.out_dir} already holds a run ({found[0]}); pass --resume to continue it, "
                        f"--overwrite to replace it, or choose another --out_dir")


def seed_process(seed, rank):
    """Each process its own dropout (and CUDA) random stream, drawn after the model was built the same
    on every process: one seed everywhere would drop the same units on every GPU."""
    torch.manual_seed(seed + rank)


def wrap_for_training(model, rt, compile_wanted):
    """(the module the loop trains through, the one it evaluates with). Under DDP the compiled module
    wraps DDP, not the reverse: dynamo then splits the graph at DDP's gradient buckets, so each bucket's
    all-reduce runs while the backward pass goes on (DDP around a compiled model sees every gradient
    only at the end). Evaluation runs outside DDP: a process with no batch to score joins no collective."""
    if not rt.ddp:
        model = maybe_compile(model, compile_wanted, rt)
        return model, model
    # the buffers (RoPE's frequencies) are constants: no sync at every forward (torch 2.13 renamed the option)
    constant_buffers = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else {"broadcast_buffers": False}
    ddp = DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None, **constant_buffers,
              gradient_as_bucket_view=True)  # gradients live in the all-reduce buckets: no second copy
    trained = maybe_compile(ddp, compile_wanted, rt)
    return trained, (torch.compile(model) if trained is not ddp else model)


@contextlib.contextmanager
def local_optimizer_steps(optimizers):
    """Optimizer steps that join no collective (Muon shares its work out across processes): a memory
    probe on one process may fail while another's succeeds, and must not leave it waiting."""
    sharded = [opt for opt in optimizers if getattr(opt, "shard", False)]
    for opt in sharded:
        opt.shard = False
    try:
        yield
    finally:
        for opt in sharded:
            opt.shard = True


def cpu_copy(obj):
    """A copy of a (nested) state with its tensors on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


class Run:
    """The state of one training run: model, optimizers, scaler, batch plan, iteration, best validation
    score, and the time budget its evaluations and checkpoint writes are timed into."""

    def __init__(self, cfg, model, rt, checkpoint_extra, best_name, selection, budget):
        self.cfg, self.rt, self.raw_model, self.budget = cfg, rt, model.to(rt.device), budget
        self.extra, self.best_name, self.selection = checkpoint_extra or {}, best_name, selection
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        self.optimizers = build_optimizers(model, cfg, rt)
        for opt in self.optimizers:  # the schedule scales each group's own base rate (Muon's differs)
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
        self.iter, self.best_val, self.saved_plan, self.time_plan = 0, float("inf"), None, None
        self.plan, self.micro_steps, self.syncing = None, 0, False
        ckpt = self._checkpoint_to_resume()
        self.restored = ckpt is not None
        if self.restored:
            self._restore(ckpt)
        else:
            if cfg.resume and rt.master:
                print(f"no checkpoint at {self.ckpt_path}: starting from scratch")
            seed_process(cfg.seed, rt.rank)
        del ckpt
        self.start_iter = self.iter
        self.model, self.eval_model = wrap_for_training(model, rt, cfg.compile)
        self.first_bad_iter = torch.full((), -1, device=rt.device)  # first step whose loss was not finite
        self.first_inputs = None  # for record_ranks

    def _checkpoint_to_resume(self):
        """The checkpoint to resume, or None. Rank 0 decides (whether out_dir may be used, whether to
        resume and from which iteration); every rank must then read that same checkpoint. Without
        storage that every node shares only rank 0's node has it: a rank that cannot read it is one
        clear error on every rank, not a hang."""
        rt, ckpt, decision, error = self.rt, None, None, None
        try:
            if rt.master:  # on a node without rank 0's storage the folder may look empty: its verdict counts
                check_out_dir(self.cfg)
            if rt.master and self.cfg.resume and os.path.exists(self.ckpt_path):
                ckpt = load_checkpoint(self.ckpt_path)
                decision = (ckpt["iter_num"], ckpt.get("weights_sha256"))
        except UserError as e:
            error = str(e)
        if not rt.ddp:
            if error:
                raise UserError(error)
            return ckpt
        shared = [decision, error]
        dist.broadcast_object_list(shared, src=0)
        decision, error = shared
        if error:
            raise UserError(error)
        problem = None
        if decision and not rt.master:
            try:
                ckpt = load_checkpoint(self.ckpt_path)
                if (ckpt["iter_num"], ckpt.get("weights_sha256")) != decision:
                    problem = f"its {self.ckpt_path} is another one (iteration {ckpt['iter_num']})"
            except UserError as e:
                problem = str(e)
        views = [None] * rt.world_size
        dist.all_gather_object(views, (rt.rank, socket.gethostname(), problem))
        bad = [v for v in views if v[2]]
        if bad:
            rank, host, problem = bad[0]
            raise UserError(f"rank 0 resumes {self.ckpt_path} at iteration {decision[0]}, but rank {rank} on {host} "
                            f"cannot ({problem}; {len(bad)} rank(s) in all): put out_dir on storage that every node "
                            f"shares, or copy ckpt.pt to the same path on every node, then rerun with --resume")
        return ckpt

    def _restore(self, ckpt):
        load_weights(self.raw_model, ckpt["model"], self.ckpt_path)
        # What a resumed run must keep: the model's function (a soft-cap or an activation has no weights whose
        # shape would object); Muon's state would not fit AdamW's, nor the reverse; nor one Muon group the
        # Q/K/V split's two; the Newton-Schulz variant is a setting of Muon's groups, which the saved ones would
        # silently override; and the schedule, which a switch would jump
        kept = changed_model_fields(ckpt["model_config"], dataclasses.asdict(self.raw_model.config))
        before = {"optimizer": "adamw", "muon_split_qkv": False, "muon_ns": "quintic", "lr_schedule": "cosine",
                  "cooldown_frac": 0.4}  # what runs ran before each existed
        settings = (["optimizer", "lr_schedule"] + (["muon_split_qkv", "muon_ns"] if self.cfg.optimizer == "muon" else [])
                    + (["cooldown_frac"] if self.cfg.lr_schedule == "wsd" else []))
        kept += [(key, ckpt["config"].get(key, before[key])) for key in settings
                 if ckpt["config"].get(key, before[key]) != getattr(self.cfg, key)]
        if kept:
            key, value = kept[0]
            raise UserError(f"{self.ckpt_path} was trained with {key}={value}, not {getattr(self.cfg, key)}; "
                            f"resume it with --{key}={value}, or start a new run (--overwrite or another --out_dir)")
        for opt, state in zip(self.optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        if ckpt["scaler"] and self.scaler.is_enabled():  # a run may resume in another dtype
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iter, self.best_val = ckpt["iter_num"], ckpt["best_val_loss"]
        self.saved_plan, self.time_plan = ckpt.get("batch_plan"), ckpt.get("time_plan")
        timings = ckpt.get("timings") or {}  # --max_minutes must leave room for them before this session times any
        self.budget.eval_s, self.budget.save_s = timings.get("eval_s", 0.0), timings.get("save_s", 0.0)
        if self.time_plan and self.cfg.budget_hours:  # the budget was planned once: a resumed run keeps it
            self.cfg.max_iters = self.time_plan["max_iters"]
        rng = ckpt["rng"]
        set_rng_state(rng[self.rt.rank] if self.rt.rank < len(rng) else rng[0], self.rt.device)
        if self.rt.master:
            print(f"resuming from {self.ckpt_path} at iteration {self.iter}")

    # ---- the batch plan ----------------------------------------------------------------------

    def decide_batches(self, make_sources):
        """The micro-batch and accumulation: from the config, from the checkpoint being resumed, or
        fitted to memory (batch_size=auto). Written back into cfg, so that the sources, the figures
        and the saved config hold the numbers that run."""
        self.make_sources = make_sources  # for a probe, should the configured micro-batch not fit
        plan = initial_plan(self.cfg, self.rt.world_size, self.saved_plan) or self.fit_to_memory()
        self.plan, self.micro_steps = plan, plan.accumulation // self.rt.world_size
        self.cfg.batch_size, self.cfg.gradient_accumulation_steps = plan.micro_batch, plan.accumulation

    def fit_to_memory(self):
        """batch_size=auto: the largest micro-batch that fits (probe), and the accumulation that keeps
        the tokens per step."""
        cfg, rt = self.cfg, self.rt
        sequences = sequences_per_process(cfg, rt.world_size)
        best, tries = self.probe(sequences)
        if best is None:
            raise UserError(f"batch_size=auto: not even one sequence of {cfg.block_size} tokens fits in the memory of "
                            f"{rt.device} with this model and dtype; lower block_size or the model's size")
        plan = BatchPlan(best, sequences // best * rt.world_size, chosen_by="memory probe", tries=tries)
        if rt.master:
            print(probe_line(plan, cfg.block_size, rt.world_size), flush=True)
        return plan

    def probe(self, sequences):
        """Micro-batches of the first batch's rows, tried for real (forward, backward and optimizer
        step; eager, as a compiled probe would recompile for every size): the largest that fits on every
        process (memory.largest_that_fits) and the tries. Weights, optimizer, scaler and random states
        are put back afterwards: the run goes on exactly as if started with that micro-batch."""
        rt = self.rt
        batch = to_device(self.make_sources(sequences)[0].batch(0, 0), rt.device)
        before = cpu_copy({"model": self.raw_model.state_dict(), "scaler": self.scaler.state_dict(),
                           "optimizers": [opt.state_dict() for opt in self.optimizers], "rng": rng_state(rt.device)})

        def attempt(size):
            (x, y, rows, weights, positions), _ = row_range(batch, 0, size)
            try:
                with rt.autocast():
                    _, loss = self.raw_model(x, targets=y, loss_rows=rows, loss_weights=weights, positions=positions)
                self.scaler.scale(loss).backward()
                with local_optimizer_steps(self.optimizers):
                    for opt in self.optimizers:
                        opt.step()
            finally:
                for opt in self.optimizers:
                    opt.zero_grad(set_to_none=True)

        def agree(fitted):  # a size fits only if it fits on every process
            flag = torch.tensor([float(fitted)], device=rt.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            return bool(flag.item())
        best, tries = memory.largest_that_fits(divisors(sequences), attempt, rt.device, agree=agree if rt.ddp else None)
        self.raw_model.load_state_dict(before["model"])
        for opt, state in zip(self.optimizers, before["optimizers"]):
            opt.load_state_dict(state)
        self.scaler.load_state_dict(before["scaler"])
        set_rng_state(before["rng"], rt.device)
        memory.release(rt.device)
        return best, [[size, None if used is None else round(used / 2 ** 20), ok] for size, used, ok in tries]

    def batch_keys(self):
        """Each process takes its own slice of the micro-steps, so together they draw every batch once.
        max_iters is read as the keys are drawn: --budget_hours sets it after the first steps (until
        then the keys go on, as the prefetch thread runs ahead of the loop)."""
        first, it = self.rt.rank * self.micro_steps, self.iter
        while it < self.cfg.max_iters or self.budget.decide_at:
            for k in range(self.micro_steps):
                yield it, first + k
            it += 1

    # ---- checkpoints and evaluation ------------------------------------------------------------

    def save(self):
        started = clock()
        rng = gather_rng(self.rt)  # collective: every process calls save
        if self.rt.master:
            save_checkpoint({**model_record(self.raw_model, self.cfg, **self.extra),
                             "optimizers": [opt.state_dict() for opt in self.optimizers],
                             "scaler": self.scaler.state_dict(), "iter_num": self.iter,
                             "best_val_loss": self.best_val, "rng": rng,
                             "batch_plan": vars(self.plan), "time_plan": self.time_plan,
                             "timings": {"eval_s": self.budget.eval_s, "save_s": self.budget.save_s}}, self.ckpt_path)
        self.budget.timed("save", clock() - started)

    def evaluate(self, eval_sources, log):
        self.check_finite()  # never save weights that a non-finite step has spoiled
        started = clock()
        losses = estimate_losses(self.eval_model, eval_sources, self.cfg.eval_iters, self.rt)
        self.budget.timed("eval", clock() - started)
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

    # ---- one optimizer step --------------------------------------------------------------------

    def step(self, batches):
        """One optimizer step over this process's micro-batches; returns the last micro-batch's loss
        (a device tensor: reading it is a host sync). A step that runs out of memory is run again with
        each micro-batch in more pieces: the same sequences, the same gradient, no step lost."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr_at(self.iter, self.cfg, group["initial_lr"])
        micro = [batches.next() for _ in range(self.micro_steps)]  # kept until the step is done
        self.first_inputs = micro[0][0] if self.first_inputs is None else self.first_inputs
        while True:
            try:
                loss = self._accumulate(micro)
                break
            except Exception as e:  # only running out of memory is retried
                if not memory.is_out_of_memory(e):
                    raise
            self._more_pieces()  # outside the except block, so the failed pass's tensors can be freed
        try:
            if self.cfg.grad_clip:
                for opt in self.optimizers:
                    self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(self.clipped_parameters(), self.cfg.grad_clip)
            for opt in self.optimizers:
                self.scaler.step(opt)
        except Exception as e:  # the optimizer's state is allocated at its first step, beside the activations
            if not memory.is_out_of_memory(e):
                raise
            self._optimizer_out_of_memory()
        self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.iter += 1
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad_iter < 0)
        self.first_bad_iter = torch.where(bad, self.iter, self.first_bad_iter)  # on the device: no sync
        return loss

    def clipped_parameters(self):
        """What grad_clip's norm covers: every parameter, or with clip_muon=false only AdamW's (Muon's
        orthogonalized update has the same size whatever its gradient's)."""
        if self.cfg.clip_muon:
            return self.model.parameters()
        return [p for opt in self.optimizers if not isinstance(opt, Muon) for g in opt.param_groups for p in g["params"]]

    def _accumulate(self, micro):
        """Forward and backward of every micro-batch (in plan.pieces pieces each); under DDP only the
        last backward all-reduces. Returns the last micro-batch's mean loss: its loss over its loss
        weights' sum (finetuning's weights sum to about 1, not exactly: data.FinetuneMixture)."""
        last, total, mass = len(micro) - 1, None, 0.0
        for k, batch in enumerate(micro):
            pieces = split_rows(batch, self.plan.pieces) if self.plan.pieces > 1 else [(batch, 1.0)]
            for j, ((x, y, rows, weights, positions), share) in enumerate(pieces):
                self.syncing = k == last and j == len(pieces) - 1
                with contextlib.nullcontext() if not self.rt.ddp or self.syncing else self.model.no_sync():
                    with self.rt.autocast():
                        _, loss = self.model(x, targets=y, loss_rows=rows, loss_weights=weights, positions=positions)
                    if share != 1.0:
                        loss = loss * share
                    self.scaler.scale(loss / self.micro_steps).backward()
                if k == last:
                    total = loss if total is None else total + loss
                    mass = mass + loss_mass(weights, x.device, share)
        return total / mass

    def _more_pieces(self):
        """After running out of memory: drop the partial gradients and run each micro-batch in twice the
        pieces. Under DDP a process can do so alone only before its all-reducing backward. A micro-batch
        set in the config that fails at once is a setting to fix, named with the largest that fits."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        memory.release(self.rt.device)
        size, pieces = self.plan.micro_batch, self.plan.pieces
        self._configured_batch_must_fit()
        if self.rt.ddp and self.syncing:
            raise UserError(f"out of memory at step {self.iter + 1} in the backward pass that all-reduces the "
                            f"gradients, which one process cannot rerun alone; rerun with --resume "
                            f"--batch_size={self._smaller_micro_batch()}")
        if pieces >= size:
            raise UserError(f"out of memory at step {self.iter + 1} even with one sequence at a time; lower "
                            f"block_size or the model's size, or free the GPU's memory")
        self.plan.pieces = min(size, 2 * pieces)
        who = f"rank {self.rt.rank}: " if self.rt.ddp else ""
        print(f"{who}out of memory at step {self.iter + 1}: each micro-batch of {size} sequences now runs as "
              f"{self.plan.pieces} pieces; the step is run again, nothing is lost", flush=True)

    def _optimizer_out_of_memory(self):
        """Out of memory in the optimizer's step: some parameters may be updated already, so the step
        cannot be run again; the last checkpoint is the state to resume, with a smaller micro-batch."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        memory.release(self.rt.device)
        self._configured_batch_must_fit()
        raise UserError(f"out of memory in the optimizer step of step {self.iter + 1}; {self.ckpt_path} is the last "
                        f"good state: rerun with --resume --batch_size={self._smaller_micro_batch()}")

    def _configured_batch_must_fit(self):
        """A micro-batch set in the config that fails at once is a setting to fix: one line naming the
        largest that fits (under DDP the other processes wait in this step's all-reduce: no probe)."""
        if self.plan.chosen_by != "config" or self.iter != self.start_iter or self.restored:
            return
        fits = ""
        if not self.rt.ddp:
            best, _ = self.probe(sequences_per_process(self.cfg, 1))
            fits = f"; the largest micro-batch that fits is {best}: pass --batch_size={best}" if best else \
                "; not even one sequence fits: lower block_size or the model's size"
        raise UserError(f"batch_size={self.plan.micro_batch} does not fit in the memory of {self.rt.device}{fits} "
                        f"(or --batch_size=auto)")

    def _smaller_micro_batch(self):
        size = self.plan.micro_batch
        return max([d for d in divisors(sequences_per_process(self.cfg, self.rt.world_size)) if d < size] or [1])

    def check_finite(self):
        """A non-finite loss stops the run before anything is saved: the last checkpoint stays good."""
        bad = self.first_bad_iter.clone()
        if self.rt.ddp:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() >= 0:
            raise UserError(f"loss became nan or inf at iteration {int(bad.item())}; {self.ckpt_path} is the "
                            f"last good state: lower learning_rate (or use dtype=bfloat16) and --resume")

    def plan_time(self, log):
        """--budget_hours: once the step time is measured, max_iters (the same on every process)."""
        planned = self.budget.plan_steps(self.iter, lambda: synchronize(self.rt.device))
        if self.rt.ddp:
            shared = [planned]
            dist.broadcast_object_list(shared, src=0)
            planned = shared[0]
        if planned:
            self.time_plan, self.cfg.max_iters = planned, planned["max_iters"]
            self.budget.decide_at = 0  # only now: until max_iters is set, the prefetch thread must go on
            if self.rt.master:
                print(budget_line(planned), flush=True)
                log.write(type="plan", iter=self.iter, time=log.elapsed(), **planned)


class Throughput:
    """Rate, MFU, ETA and peak memory between logged steps. A CPU peak measured at the start that the
    run then beats (MFU over 100%: other work slowed the measurement) is measured again, and taken
    as at least the rate the run achieved; the record that does so says so (peak_flops)."""

    def __init__(self, cfg, model, rt, head_fraction, start_iter):
        self.tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
        self.flops_per_iter = model.flops_per_token(cfg.block_size, head_fraction) * self.tokens_per_iter
        self.threads, self.world_size = cfg.num_threads or torch.get_num_threads(), rt.world_size
        self.peak = peak_flops(rt.device, cfg.peak_flops, self.threads) * rt.world_size
        self.measured_cpu = rt.device.type == "cpu" and not cfg.peak_flops
        self.device = rt.device
        self.t_last, self.last_iter = clock(), start_iter

    def measure(self, it, max_iters):
        now = clock()
        dt = (now - self.t_last) / max(1, it - self.last_iter)
        self.t_last, self.last_iter = now, it
        s = {"ms_per_iter": dt * 1000, "tokens_per_s": self.tokens_per_iter / dt,
             "mfu": self.flops_per_iter / dt / self.peak if self.peak else 0.0, "eta_s": (max_iters - it) * dt,
             "peak_mem_mib": memory.peak_mib(self.device)}
        if s["mfu"] > 1 and self.measured_cpu:
            s.update(self.refresh_peak(self.flops_per_iter / dt))
        return s

    def refresh_peak(self, achieved):
        self.peak = max(cpu_peak_flops(self.threads) * self.world_size, achieved)
        self.t_last = clock()  # the measurement is not training time
        return {"mfu": achieved / self.peak, "peak_flops": self.peak}


def log_line(it, max_iters, loss, lr, s):
    finish = time.strftime("%H:%M", time.localtime(time.time() + s["eta_s"]))
    peak = f", peak {s['peak_mem_mib'] / 1024:.1f} GiB" if s["peak_mem_mib"] else ""
    refreshed = " (mfu >100%: CPU peak re-measured)" if "peak_flops" in s else ""
    return (f"iter {it}/{max_iters}: loss {loss:.4f}, lr {lr:.2e}, {s['ms_per_iter']:.0f} ms/iter, "
            f"{s['tokens_per_s']:,.0f} tok/s, mfu {s['mfu'] * 100:.1f}%{refreshed}{peak}, "
            f"eta {s['eta_s'] / 60:.1f} min ({finish})")


def train(cfg, model, make_sources, rt, checkpoint_extra=None, best_name="best.pt",
          selection=lambda losses: sum(losses.values()) / len(losses), describe=None):
    """Run cfg.max_iters optimizer steps. make_sources(batch_size) -> (train source, {name: eval
    source}) for the micro-batch the plan settles on; describe(train source) -> (lines to print,
    fields for the checkpoints and the log's plan record), e.g. finetuning's task mix. The selection
    of the evaluation losses picks the best checkpoint. Returns the final evaluation losses."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    wandb = wandb_module(cfg)
    budget = TimeBudget(cfg, clock)  # --max_minutes counts from here
    if budget.decide_at:  # until the budget sets it, train at least as far as the measurement
        cfg.max_iters = max(cfg.max_iters, budget.decide_at)
    run = Run(cfg, model, rt, checkpoint_extra, best_name, selection, budget)
    if run.time_plan:
        budget.decide_at = 0
    if run.iter >= cfg.max_iters:
        if rt.master:
            print(f"{run.ckpt_path} is already at iteration {run.iter} of {cfg.max_iters}: nothing to do")
        return {}
    run.decide_batches(make_sources)
    train_source, eval_sources = make_sources(run.plan.micro_batch)
    fields = {}
    if describe:
        lines, fields = describe(train_source)
        run.extra.update(fields)
        if rt.master:
            print("\n".join(lines))
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), run.iter if cfg.resume else None,
                     wandb_run(cfg, wandb)) if rt.master else None
    loss_fraction = loss_token_fraction(train_source)
    speed = Throughput(cfg, run.raw_model, rt, loss_fraction, run.iter)
    figures = start_figures(run.raw_model, run.optimizers, cfg, run.plan, speed.flops_per_iter, rt.world_size)
    if rt.master:
        if loss_fraction < 1:
            print(f"{loss_fraction:.1%} of batch tokens carry loss (only they go through the output layer)")
        print(f"{rt.world_size} process(es) on {rt.device}, {str(rt.dtype).removeprefix('torch.')}")
        print(figures_line(figures), flush=True)
        log.write(type="plan", iter=run.iter, time=log.elapsed(), **figures, batch_tries=run.plan.tries, **fields)
    batches, stop, losses = Prefetcher(train_source, rt.device, run.batch_keys()), StopFlag(), {}
    try:
        while run.iter < cfg.max_iters:
            if run.iter % cfg.eval_interval == 0 and (run.iter > run.start_iter or not run.restored):  # a checkpoint
                # was written by the evaluation of its own step: a resumed run does not repeat it
                losses = run.evaluate(eval_sources, log)
            loss = run.step(batches)
            if budget.decide_at:
                run.plan_time(log)
            if run.iter % cfg.log_interval and run.iter != cfg.max_iters:
                continue
            loss_value = loss.item()  # the only host sync of a logged step, with the two below
            run.check_finite()
            s = speed.measure(run.iter, cfg.max_iters)
            if rt.master:
                lr = run.optimizers[-1].param_groups[0]["lr"]
                print(log_line(run.iter, cfg.max_iters, loss_value, lr, s), flush=True)
                log.write(type="train", iter=run.iter, time=log.elapsed(), loss=loss_value, lr=lr, **s)
            stop.time_up = budget.should_stop(run.iter, s["ms_per_iter"] / 1000)
            if stop.agreed(rt):
                if run.iter % cfg.eval_interval == 0:  # the evaluation due now would be skipped on resume
                    run.evaluate(eval_sources, log)
                else:
                    run.save()
                if rt.master:  # under torchrun the exit status is torchrun's own: the log says why it ended
                    log.write(type="stop", iter=run.iter, time=log.elapsed(), reason=stop.reason or "signal")
                    why = (f"--max_minutes={cfg.max_minutes:g} is near" if stop.reason == "time" else "asked to stop")
                    print(f"stopped at iteration {run.iter} of {cfg.max_iters} with a checkpoint ({why}); rerun "
                          f"with --resume to continue", flush=True)
                raise SystemExit(STOPPED_FOR_TIME if stop.reason == "time" else STOPPED_BY_SIGNAL)
        if run.iter > run.start_iter or not losses:  # the last step's evaluation and checkpoint
            losses = run.evaluate(eval_sources, log)
        if rt.ddp:
            record_ranks(run.raw_model, run.first_inputs, rt, log)
    finally:
        stop.close()
        if log is not None:
            log.close()
    return losses


def record_ranks(model, first_batch, rt, log):
    """Log each process's first-batch and final-weights checksums and a dropout mask drawn from its
    random stream: the batches and masks must differ and the weights must not (a cheap proof that DDP
    kept the replicas in sync while each process drew its own data and dropout)."""
    weights = sum(float(p.detach().double().sum()) for p in model.parameters())
    batch = float(first_batch.double().sum()) if first_batch is not None else None
    mask = torch.nn.functional.dropout(torch.ones(64, device=rt.device), 0.5).cpu()  # CUDA has no integer dot
    dropout = int((mask > 0).long() @ (2 ** torch.arange(64) % 1_000_003))
    sums = [None] * rt.world_size
    dist.all_gather_object(sums, {"rank": rt.rank, "first_batch": batch, "weights": weights, "dropout": dropout})
    if rt.master:
        log.write(type="ranks", ranks=sums)
        if len({s["weights"] for s in sums}) > 1:
            print(f"warning: processes ended with different weights: {sums}")
