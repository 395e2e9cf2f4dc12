"""Checkpoints: written atomically with a checksum of their weights, verified on load, and the
one way to build a model from one.

A checkpoint is a dict: "model" (state dict), "model_config" (GPTConfig fields), "config" (the
run's settings), "weights_sha256" (of the model tensors), and for ckpt.pt also the optimizer,
scaler, iteration and every process's RNG state, so that --resume continues exactly.
"""
import dataclasses
import glob
import hashlib
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from common import UserError, torch_save
from model import GPT, GPTConfig


def weights_digest(state):
    """sha256 over the names, dtypes, shapes and bytes of a state dict's tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(record, path):
    """Write record (with "model") to path atomically, adding the weights' checksum."""
    torch_save({**record, "weights_sha256": weights_digest(record["model"])}, path)


def load_checkpoint(path):
    """The checkpoint dict at path; a missing, unreadable or damaged file is a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found; train one first or fix the path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}); the file is damaged "
                        f"or not a checkpoint") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this toolkit (no model / model_config)")
    expected = ckpt.get("weights_sha256")
    if expected is not None and weights_digest(ckpt["model"]) != expected:
        raise UserError(f"checkpoint {path} is damaged (its weights do not match their checksum); "
                        f"restore it or retrain")
    return ckpt


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
                        f"n_head, n_embd, block_size and architecture options as the run that wrote it (a GPT-2-recipe "
                        f"run: add config/gpt2_classic.py)")
    model.load_state_dict(state)


def changed_model_fields(saved_config, config):
    """[(field, saved value)] where a model config differs from a checkpoint's saved one, beyond
    GPTConfig.CHANGEABLE; fields newer than the checkpoint count at their defaults (what it ran)."""
    saved = {**dataclasses.asdict(GPTConfig()), **saved_config}
    return [(key, saved[key]) for key, value in config.items()
            if key not in GPTConfig.CHANGEABLE and saved.get(key) != value]


def model_from_checkpoint(ckpt, path, overrides=None):
    """The GPT a loaded checkpoint describes, with its weights. overrides: GPTConfig fields to
    change (e.g. dropout for finetuning); one that changes a shape is a one-line error."""
    try:
        config = GPTConfig(**{**ckpt["model_config"], **(overrides or {})})
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} has a model_config this code cannot build ({e})") from None
    model = GPT(config)
    load_weights(model, ckpt["model"], path)
    return model


def pretrained_model(cfg):
    """The GPT a run starts from: cfg.init_from is a .pt checkpoint, a Hugging Face model folder
    or a GPT-2 size on the hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl). Its architecture becomes
    the run's (cfg is updated); fields set explicitly must agree (a shape mismatch is a clear
    error), except dropout, which a run may change."""
    import hf  # light: it imports transformers only when it reads a Hugging Face model
    source = cfg.init_from
    if os.path.isfile(source) or source.endswith(".pt"):
        ckpt = load_checkpoint(source)
    elif os.path.isdir(source) or source in hf.GPT2_NAMES:
        ckpt = hf.import_checkpoint(source)
    else:
        raise UserError(f"init_from={source!r} is not a .pt checkpoint, a Hugging Face model folder nor one of "
                        f"{', '.join(hf.GPT2_NAMES)}; fix the path")
    overrides = {k: v for k, v in cfg.model_fields().items() if k in cfg.explicit}
    conflicts = changed_model_fields(ckpt["model_config"], overrides)  # e.g. another activation: same shapes
    if conflicts:
        key, trained = conflicts[0]
        raise UserError(f"{source} does not fit the configured model: it was trained with {key}={trained}, "
                        f"not {overrides[key]}; drop {key} from the command line and config (a run keeps the "
                        f"architecture it starts from)")
    model = model_from_checkpoint(ckpt, source, overrides)
    for key, value in dataclasses.asdict(model.config).items():
        setattr(cfg, key, value)
    return model


def model_record(model, cfg, **extra):
    """What every checkpoint holds: weights, architecture and the run's settings."""
    return {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
            "config": dataclasses.asdict(cfg), **extra}


def rng_state(device):
    """This process's RNG states; on a GPU only its own device's (a resumed run may see other GPUs)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and isinstance(state.get("cuda"), torch.Tensor):
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng(rt):
    """Every process's RNG state (dropout draws differ per process), gathered to rank 0.
    Collective: every process must call it."""
    state = rng_state(rt.device)
    if not rt.ddp:
        return [state]
    states = [None] * rt.world_size
    dist.all_gather_object(states, state)
    return states


def load_model(path, device="cpu"):
    """The GPT of a ckpt.pt or model.pt, on device, in eval mode, and the checkpoint dict."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, path).to(device).eval(), ckpt


def newest_finetuned(root="out"):
    """The most recently written model.pt (finetune.py's deliverable) under root, or None."""
    paths = glob.glob(os.path.join(root, "**", "model.pt"), recursive=True)
    return max(paths, key=os.path.getmtime) if paths else None
