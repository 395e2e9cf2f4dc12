"""Typed run configuration: defaults in dataclasses, presets in config/*.py, overrides on the
command line:  python train.py config/pretrain_cpu.py --n_layer=4 --compile=true

A preset is a plain Python file that assigns some of the fields below. Unknown keys and
wrong types are errors that name the valid keys, never silently ignored.
"""
import dataclasses
import os
import runpy
from dataclasses import dataclass

from common import UserError


@dataclass
class TrainConfig:
    # run and data
    out_dir: str = "out/run"
    data_dir: str = "data/owt"  # holds train.bin / val.bin from prepare_owt.py
    resume: bool = False  # continue from out_dir/ckpt.pt when it exists
    seed: int = 1337
    # model (see model.GPTConfig)
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True
    pos_emb: str = "learned"
    norm: str = "layernorm"
    mlp: str = "gelu"
    qk_norm: bool = False
    tie_embeddings: bool = True
    # optimization
    batch_size: int = 8  # sequences per micro-batch, per process
    gradient_accumulation_steps: int = 1  # micro-batches per step, summed over all processes
    max_iters: int = 1000
    optimizer: str = "adamw"  # adamw | muon
    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0: decay until max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    # evaluation, logging, checkpoints
    eval_interval: int = 100
    eval_iters: int = 20
    log_interval: int = 10
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    backend: str = "auto"  # torchrun process group: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    peak_flops: float = 0.0  # for MFU; 0: look up the GPU, or measure a matmul on CPU
    num_threads: int = 0  # CPU threads for torch; 0 leaves torch's default

    def model_fields(self):
        from model import GPTConfig
        names = {f.name for f in dataclasses.fields(GPTConfig)}
        return {k: v for k, v in dataclasses.asdict(self).items() if k in names}


@dataclass
class FinetuneConfig(TrainConfig):
    out_dir: str = "out/finetune"
    init_from: str = "out/run/ckpt.pt"  # the pretrained checkpoint to start from
    finetune_dir: str = "data/finetune"  # from prepare_finetune.py
    tasks: str = "cnn_dailymail,squad,sst2"
    task_weights: str = ""  # e.g. "cnn_dailymail:2,squad:2,sst2:1"; empty: proportional to size, capped
    mix_cap: int = 20000  # with empty task_weights, a task counts at most this many examples
    replay_fraction: float = 0.1  # share of rows that are plain pretraining text, against forgetting
    learning_rate: float = 1e-4
    min_lr: float = 1e-5
    warmup_iters: int = 20
    weight_decay: float = 0.0


def _parse_value(key, text, kind):
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
        raise UserError(f"--{key} expects {kind.__name__}, got {text!r}") from None


def _check_type(key, value, kind, origin):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{origin}: {key} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def parse_config(cls, argv):
    """Build a cls from preset files (positional) and --key=value overrides, in order."""
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
        if hasattr(config, "model_fields"):
            from model import GPTConfig
            GPTConfig(**config.model_fields())  # validates the architecture choices early
    except ValueError as e:
        raise UserError(f"bad config: {e}") from None
    return config
