"""The plan of a training run: how a step's sequences are batched, how long the run may take, and
the figures printed at its start. trainer.py carries it out.

A step is tokens_per_step tokens: each process draws its share of the sequences as micro-batches
of micro_batch sequences (batches are drawn per micro-batch, so --resume keeps the micro-batch),
and gradient accumulation sums them. batch_size=auto fits the micro-batch to the GPU's memory
(trainer.Run.probe); a micro-batch that later runs out of memory runs as pieces of fewer rows: the
same sequences and the same gradient, so no step is lost.

--max_minutes stops the run with a checkpoint before the session ends; --budget_hours sets
max_iters, and with it the decay, from step times measured before the decay starts.
"""
import dataclasses
import math
import time

import torch

from common import UserError, human
from config import AUTO

MEASURED_STEPS = 10  # --budget_hours times this many steps, after the first (which compiles)
SAFETY = 1.1  # --max_minutes: estimated time to the next check and a checkpoint, plus 10%


@dataclasses.dataclass
class BatchPlan:
    micro_batch: int  # sequences per micro-batch and process: the unit batches are drawn in
    accumulation: int  # micro-batches per step, all processes together (gradient_accumulation_steps)
    pieces: int = 1  # each micro-batch runs as this many pieces, since it ran out of memory
    chosen_by: str = "config"  # config | memory probe | checkpoint
    tries: list = dataclasses.field(default_factory=list)  # the probe's [size, peak MiB or None, fitted]

    def tokens_per_step(self, block_size):
        return self.micro_batch * self.accumulation * block_size


def configured_tokens_per_step(cfg):
    """The tokens of one optimizer step, as configured (a run's micro-batch does not change it)."""
    return cfg.tokens_per_step or cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps


def sequences_per_process(cfg, world_size):
    """The sequences each process trains on per step."""
    if cfg.tokens_per_step:
        if cfg.tokens_per_step % cfg.block_size:
            raise UserError(f"tokens_per_step={cfg.tokens_per_step} is not a multiple of block_size={cfg.block_size}")
        sequences, rest = divmod(cfg.tokens_per_step // cfg.block_size, world_size)
        if rest or not sequences:
            raise UserError(f"tokens_per_step={cfg.tokens_per_step} is {cfg.tokens_per_step // cfg.block_size} "
                            f"sequences, which {world_size} processes cannot share equally; make it a multiple of "
                            f"{world_size * cfg.block_size}")
        return sequences
    micro_steps, rest = divmod(cfg.gradient_accumulation_steps, world_size)
    if rest or not micro_steps:
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple "
                        f"of the number of processes ({world_size})")
    return cfg.batch_size * micro_steps


def initial_plan(cfg, world_size, saved=None):
    """The batch plan from the config, or from the checkpoint being resumed (`saved`); None when the
    micro-batch is still to be fitted to memory (batch_size=auto)."""
    sequences = sequences_per_process(cfg, world_size)
    explicit = getattr(cfg, "explicit", frozenset())
    if cfg.tokens_per_step and "gradient_accumulation_steps" in explicit:
        raise UserError("gradient_accumulation_steps follows from tokens_per_step and the micro-batch; set one of "
                        "them (--tokens_per_step=0 to count the tokens from gradient_accumulation_steps)")
    if cfg.batch_size != AUTO:
        if sequences % cfg.batch_size:
            raise UserError(f"tokens_per_step={cfg.tokens_per_step} gives each of {world_size} process(es) {sequences} "
                            f"sequences per step, not a multiple of batch_size={cfg.batch_size}; choose a batch_size "
                            f"that divides it, or batch_size=auto")
        return BatchPlan(cfg.batch_size, sequences // cfg.batch_size * world_size)
    if saved and sequences % saved["micro_batch"] == 0:  # --resume keeps the batches it was drawing
        return BatchPlan(saved["micro_batch"], sequences // saved["micro_batch"] * world_size,
                         saved.get("pieces", 1), "checkpoint", saved.get("tries", []))
    return None


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def probe_line(plan, block_size, world_size):
    tried = ", ".join(f"{size} " + ("out of memory" if mib is None and not ok else
                                    "fits" if mib is None else f"{mib / 1024:.1f} GiB" + ("" if ok else " (too close)"))
                      for size, mib, ok in plan.tries)
    return (f"batch_size=auto: micro-batch {plan.micro_batch} sequences (tried {tried}); accumulation "
            f"{plan.accumulation} over {world_size} process(es) keeps {plan.tokens_per_step(block_size):,} tokens per step")


def start_figures(model, optimizers, cfg, plan, flops_per_step, world_size):
    """What the run will cost, before it starts: parameters, tokens, FLOPs and checkpoint sizes."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    embeddings = model.wte.weight.numel() + (model.wpe.weight.numel() if model.wpe is not None else 0)
    state_bytes = 0  # AdamW keeps two moments of each of its parameters, Muon one momentum
    for opt in optimizers:
        per_param = 2 if isinstance(opt, torch.optim.AdamW) else 1
        state_bytes += per_param * sum(p.numel() * p.element_size() for g in opt.param_groups for p in g["params"])
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    return {"params": total, "non_embedding_params": total - embeddings,
            "tokens_per_step": plan.tokens_per_step(cfg.block_size), "steps": cfg.max_iters,
            "tokens": plan.tokens_per_step(cfg.block_size) * cfg.max_iters,
            "train_flops": flops_per_step * cfg.max_iters, "micro_batch": plan.micro_batch,
            "accumulation": plan.accumulation, "pieces": plan.pieces, "processes": world_size,
            "batch_chosen_by": plan.chosen_by, "ckpt_bytes": weight_bytes + state_bytes, "best_bytes": weight_bytes}


def figures_line(f):
    pieces = f" (each in {f['pieces']} pieces)" if f["pieces"] > 1 else ""
    return (f"plan: {f['params'] / 1e6:.1f}M parameters ({f['non_embedding_params'] / 1e6:.1f}M non-embedding); "
            f"micro-batch {f['micro_batch']}{pieces} x {f['accumulation']} accumulated over {f['processes']} "
            f"process(es) = {f['tokens_per_step']:,} tokens per step; {f['steps']:,} steps = {human(f['tokens'])} "
            f"tokens, {f['train_flops']:.2e} FLOPs; checkpoints {f['ckpt_bytes'] / 1e9:.2f} GB (ckpt.pt) and "
            f"{f['best_bytes'] / 1e9:.2f} GB (best)")


class TimeBudget:
    """--max_minutes: whether to stop now, so that the next logged step and a checkpoint would still end
    before the deadline. --budget_hours: max_iters from the step time measured over MEASURED_STEPS steps
    after the first, decided before the warmup ends (until then the rate does not depend on max_iters).
    Times come from `clock` (seconds); evaluations and checkpoint writes are timed as they happen."""

    def __init__(self, cfg, clock=time.perf_counter):
        self.cfg, self.clock, self.started = cfg, clock, clock()
        self.eval_s = self.save_s = self.eval_total = 0.0  # the last evaluation's and write's seconds
        self.decide_at, self.mark = 0, None
        if cfg.budget_hours:
            if cfg.warmup_iters < 2:
                raise UserError("budget_hours measures the step time before the learning rate starts to decay: "
                                "it needs warmup_iters >= 2")
            self.decide_at = min(cfg.warmup_iters, 1 + MEASURED_STEPS)

    def timed(self, kind, seconds):
        if kind == "eval":
            self.eval_s, self.eval_total = seconds, self.eval_total + seconds
        else:
            self.save_s = max(self.save_s, seconds)

    def should_stop(self, it, step_s):
        """At a logged step: would going on to the next one, then saving, run past --max_minutes?"""
        cfg = self.cfg
        if not cfg.max_minutes or it >= cfg.max_iters:
            return False
        ahead = min(cfg.log_interval, cfg.max_iters - it)
        evals = sum(1 for k in range(it + 1, it + ahead + 1) if k % cfg.eval_interval == 0)
        needed = SAFETY * (ahead * step_s + evals * self.eval_s + self.save_s)
        return self.clock() + needed > self.started + 60 * cfg.max_minutes

    def plan_steps(self, it, sync):
        """Call after every step until it returns: the first call starts the clock (sync: wait for the
        device); the first at or after decide_at returns the planned max_iters and the figures behind it."""
        if self.mark is None or it < self.decide_at:
            if self.mark is None:
                sync()
                self.mark = (it, self.clock(), self.eval_total)
            return None
        sync()
        now = self.clock()
        start, then, evals = self.mark
        step_s = (now - then - (self.eval_total - evals)) / (it - start)
        left = 3600 * self.cfg.budget_hours - (now - self.started)
        per_step = step_s + (self.eval_s + self.save_s) / self.cfg.eval_interval  # evaluations, checkpoints
        steps = it + max(0, math.floor((left - self.eval_s - self.save_s) / per_step))  # the last evaluation too
        return {"budget_hours": self.cfg.budget_hours, "max_iters": steps, "measured": [start + 1, it], "step_s": step_s,
                "eval_s": self.eval_s, "save_s": self.save_s, "seconds_left": left}


def budget_line(p):
    end = time.strftime("%H:%M", time.localtime(time.time() + p["seconds_left"]))
    return (f"budget_hours={p['budget_hours']:g}: {p['step_s']:.3g} s per step over steps {p['measured'][0]}-{p['measured'][1]}, "
            f"{p['eval_s']:.1f} s per evaluation and {p['save_s']:.1f} s per checkpoint -> max_iters "
            f"{p['max_iters']:,}, ending by about {end}")
