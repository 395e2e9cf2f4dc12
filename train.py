"""Pretrain a GPT on tokens prepared by prepare_owt.py.

    python train.py config/pretrain_cpu.py                      # one CPU
    python train.py config/pretrain_gpt2_124m_1gpu.py           # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/pretrain_gpt2_124m.py
    python train.py config/pretrain_cpu.py --resume             # continue an interrupted run
    python train.py --init_from=gpt2 --optimizer=adamw --out_dir=out/gpt2_owt   # continue OpenAI's GPT-2
                                                                # (or a HF folder) with AdamW, not Muon
"""
import os
import sys

# common first: it sets OMP_WAIT_POLICY, which OpenMP reads once, as torch loads it
from common import run_main

import torch

from checkpoint import pretrained_model
from config import TrainConfig, parse_config
from data import TokenWindows
from model import GPT, GPTConfig
from runtime import setup_runtime
from trainer import train


def main(argv=None):
    cfg = parse_config(TrainConfig, sys.argv[1:] if argv is None else argv)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.num_threads, cfg.backend)
    torch.manual_seed(cfg.seed)
    model = pretrained_model(cfg) if cfg.init_from else GPT(GPTConfig(**cfg.model_fields()))

    def sources(batch_size):  # the trainer settles the micro-batch (batch_size=auto fits it to memory)
        train_windows, val_windows = (TokenWindows(os.path.join(cfg.data_dir, f"{split}.bin"), cfg.block_size,
                                                   batch_size, cfg.seed, split_id=i)
                                      for i, split in enumerate(("train", "val")))
        return train_windows, {"val": val_windows}
    sources(1)  # missing or broken data fails now, before anything is trained
    losses = train(cfg, model, sources, rt)
    if rt.ddp:
        torch.distributed.destroy_process_group()
    return losses


if __name__ == "__main__":
    run_main(main)
