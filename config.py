"""Typed run configuration: defaults in dataclasses, presets in config/*.py, overrides on the
command line:  python train.py config/pretrain_cpu.py --n_layer=4 --compile=true

A preset is a plain Python file that assigns some of the fields below. Unknown keys and
wrong types are errors that name the valid keys, never silently ignored.
"""
import dataclasses
import inspect
import os
import re
import runpy
import sys
from dataclasses import dataclass

from common import UserError, check_choices
from model import GPTConfig
from muon import NS_VARIANTS

AUTO = "auto"  # the value of a field that the run decides for itself
AUTO_FIELDS = {"batch_size"}  # fields that take it besides their own type


@dataclass
class TrainConfig(GPTConfig):
    """A run's settings. The model's fields (n_layer, block_size, pos_emb, ...) are GPTConfig's,
    inherited, so a new architecture option is declared once, in model.py; the defaults below
    make a laptop-sized model with the recipe that won bench/ablate.py (README, "Which recipe the
    presets train"), where GPTConfig's are GPT-2's. config/gpt2_classic.py restores GPT-2's."""
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    bias: bool = False
    pos_emb: str = "rope"
    norm: str = "rmsnorm"
    mlp: str = "swiglu"
    qk_norm: bool = True
    tie_embeddings: bool = False
    # run and data
    out_dir: str = "out/run"  # checkpoints, best model and metrics.jsonl go here
    data_dir: str = "data/owt"  # holds train.bin / val.bin from prepare_owt.py
    init_from: str = ""  # "" (scratch) | a .pt checkpoint | a Hugging Face folder | gpt2[-medium|-large|-xl]
    resume: bool = False  # continue from out_dir/ckpt.pt when it exists
    overwrite: bool = False  # replace a run already in out_dir (without it, that is an error)
    seed: int = 1337  # every batch is a function of (seed, step, micro-step)
    # optimization
    batch_size: int = 8  # sequences per micro-batch, per process; auto: the largest that fits the GPU (needs tokens_per_step)
    gradient_accumulation_steps: int = 1  # micro-batches per step, summed over all processes
    tokens_per_step: int = 0  # tokens per optimizer step, all processes; sets the accumulation (0: batch_size x block_size x gradient_accumulation_steps)
    max_iters: int = 1000  # optimizer steps
    budget_hours: float = 0.0  # plan max_iters (and so the decay) to end within this many hours, measured before the decay (0: off)
    max_minutes: float = 0.0  # save a checkpoint and stop before this many minutes of this session; --resume continues (0: off)
    optimizer: str = "muon"  # muon (Muon for the hidden matrices, AdamW for the rest) | adamw
    learning_rate: float = 6e-4  # AdamW's peak rate
    min_lr: float = 6e-5  # AdamW's rate at the end of the decay
    warmup_iters: int = 100  # linear warmup steps
    lr_decay_iters: int = 0  # 0: decay until max_iters
    lr_schedule: str = "wsd"  # wsd: warmup, flat, linear to min_lr (recipe v2's win) | cosine: warmup, cosine to min_lr
    cooldown_frac: float = 0.4  # wsd: the last fraction of the decay (lr_decay_iters or max_iters) that decays
    weight_decay: float = 0.1  # on matrices only
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    muon_lr: float = 0.02  # Muon's peak rate (scaled by the same schedule)
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    muon_weight_decay: float = -1.0  # Muon's decoupled weight decay on the hidden matrices; -1: weight_decay's
    muon_split_qkv: bool = False  # Muon orthogonalizes attention's fused 3C x C input as three C x C blocks (Q, K, V)
    muon_ns: str = "quintic"  # Muon's Newton-Schulz: quintic (modded-nanogpt's) | polar_express (arXiv 2505.16932)
    clip_muon: bool = True  # grad_clip's norm covers Muon's matrices too; false: only the AdamW parameters
    # evaluation, logging, checkpoints
    eval_interval: int = 100  # steps between evaluations (each also writes ckpt.pt)
    eval_iters: int = 20  # batches per validation estimate
    log_interval: int = 10  # steps between log lines (the only host syncs)
    wandb_log: bool = False  # also send metrics.jsonl's records to Weights & Biases (pip install wandb)
    wandb_project: str = "buildgpt"  # the W&B project
    wandb_run_name: str = ""  # the W&B run's name; "": out_dir's
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 or fp16 on GPU, fp32 elsewhere) | float32 | bfloat16 | float16
    compile: bool = False  # torch.compile the model
    backend: str = "auto"  # torchrun process group: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    peak_flops: float = 0.0  # for MFU; 0: look up the GPU, or measure a matmul on CPU
    num_threads: int = 0  # CPU threads for torch; 0 leaves torch's default

    def model_fields(self):
        names = {f.name for f in dataclasses.fields(GPTConfig)}
        return {k: v for k, v in dataclasses.asdict(self).items() if k in names}

    def __post_init__(self):
        super().__post_init__()
        for name in ("gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.batch_size != AUTO and self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be at least 1, or auto")
        if self.batch_size == AUTO and not self.tokens_per_step:
            raise ValueError("batch_size=auto needs tokens_per_step (the tokens of one optimizer step, all processes "
                             "together), from which the accumulation follows")
        if self.tokens_per_step < 0 or self.tokens_per_step % self.block_size:
            raise ValueError(f"tokens_per_step={self.tokens_per_step} must be a multiple of block_size={self.block_size}")
        if self.max_iters < 0 or self.warmup_iters < 0:
            raise ValueError("max_iters and warmup_iters must be >= 0")
        if self.max_minutes < 0 or self.budget_hours < 0:
            raise ValueError("max_minutes and budget_hours must be >= 0 (0: off)")
        check_choices(self, {"lr_schedule": ("cosine", "wsd"), "muon_ns": tuple(NS_VARIANTS)})
        if not 0 < self.cooldown_frac <= 1:
            raise ValueError(f"cooldown_frac={self.cooldown_frac} must be in (0, 1]")
        if self.muon_weight_decay < 0 and self.muon_weight_decay != -1:
            raise ValueError(f"muon_weight_decay={self.muon_weight_decay} must be >= 0, or -1 for weight_decay's")


@dataclass
class FinetuneConfig(TrainConfig):
    out_dir: str = "out/finetune"
    init_from: str = "out/run/ckpt.pt"  # the pretrained checkpoint to start from: a .pt, a Hugging Face folder, gpt2[-xl]
    finetune_dir: str = "data/finetune"  # from prepare_finetune.py
    tasks: str = "all"  # comma-separated task names (tasks.py), or all
    task_weights: str = ""  # e.g. "cnn_dailymail:2,squad:2,sst2:1"; empty: proportional to size, capped
    mix_cap: int = 20000  # with empty task_weights, a task counts at most this many examples
    replay_fraction: float = 0.1  # share of positions and of the loss that is pretraining text (against forgetting)
    task_average: str = "example"  # example: each example weighs the same | token: each target token does
    isolate_examples: bool = True  # each packed example attends only to itself, from position 0
    optimizer: str = "adamw"  # adamw | muon; AdamW whatever the pretraining used (only weights carry over)
    learning_rate: float = 1e-4
    min_lr: float = 1e-5
    warmup_iters: int = 20
    lr_schedule: str = "cosine"  # finetuning keeps cosine: recipe v2 measured WSD on pretraining only
    weight_decay: float = 0.0


def _parse_value(key, text, kind):
    if key in AUTO_FIELDS and text.lower() == AUTO:
        return AUTO
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{key} expects true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        expected = f"{kind.__name__} or auto" if key in AUTO_FIELDS else kind.__name__
        raise UserError(f"--{key} expects {expected}, got {text!r}") from None


def _check_type(key, value, kind, origin):
    if key in AUTO_FIELDS and value == AUTO:
        return AUTO
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = f"{kind.__name__} or {AUTO!r}" if key in AUTO_FIELDS else kind.__name__
        raise UserError(f"{origin}: {key} must be {expected}, got {type(value).__name__} {value!r}")
    return value


def _comments(cls):
    """field name -> the comment on its line in the class source (its meaning, for --help)."""
    found = {}
    for klass in reversed(cls.__mro__[:-1]):
        for line in inspect.getsource(klass).splitlines():
            match = re.match(r"\s+(\w+): \w+ = [^#]*#\s*(.*)$", line)
            if match:
                found[match.group(1)] = match.group(2)
    return found


def usage(cls):
    """Every key with its type, default and meaning."""
    meaning = _comments(cls)
    lines = [f"usage: python {os.path.basename(sys.argv[0])} [preset.py ...] [--key=value ...]",
             "Presets (config/*.py) apply in order, then the --key=value overrides. Keys:"]
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, type) else eval(f.type)
        key = f"--{f.name}={kind.__name__}" + ("|auto" if f.name in AUTO_FIELDS else "")
        lines.append(f"  {key:<36} default {f.default!r:<20} {meaning.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def parse_config(cls, argv):
    """Build a cls from preset files (positional) and --key=value overrides, in order."""
    if "-h" in argv or "--help" in argv:
        print(usage(cls))
        raise SystemExit(0)
    types = {f.name: f.type if isinstance(f.type, type) else eval(f.type) for f in dataclasses.fields(cls)}
    valid = ", ".join(sorted(types))
    values = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise UserError(f"config file {arg} not found; presets live in config/")
            preset = {k: v for k, v in runpy.run_path(arg).items()
                      if not k.startswith("_") and not callable(v) and not isinstance(v, type(os))}
            for key, value in preset.items():
                if key not in types:
                    raise UserError(f"{arg}: unknown key {key!r}; valid keys: {valid}")
                values[key] = _check_type(key, value, types[key], arg)
            continue
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in types:
            raise UserError(f"unknown option --{key}; valid keys: {valid}")
        if not eq:  # "--resume" alone, or "--key value"
            if types[key] is bool and (not args or args[0].startswith("--") or args[0].lower() not in
                                       ("1", "0", "true", "false", "yes", "no", "on", "off")):
                text = "true"
            elif args:
                text = args.pop(0)
            else:
                raise UserError(f"--{key} needs a value")
        values[key] = _parse_value(key, text, types[key])
    try:
        config = cls(**values)
        config.explicit = frozenset(values)  # what the user set, as opposed to defaults
    except ValueError as e:
        raise UserError(f"bad config: {e}") from None
    return config
