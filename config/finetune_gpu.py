# Multitask finetuning of the GPT-2-small-shaped model (162M with the untied head) on one GPU
# (or torchrun: the processes share the tokens per step):
#   python prepare_finetune.py --block-size 1024
#   python finetune.py config/finetune_gpu.py
# 65,536 tokens per step (64 packed rows of 1024), micro-batches fitted to the card's memory
# (batch_size=auto); 3,000 steps = 2 passes over the default mix.
out_dir = "out/gpu/finetune"
init_from = "out/gpu/pretrain/ckpt.pt"
data_dir = "data/owt"
finetune_dir = "data/finetune_1024"
batch_size = "auto"
tokens_per_step = 65536
max_iters = 3000
warmup_iters = 100
learning_rate = 1e-4
min_lr = 1e-5
weight_decay = 0.0
replay_fraction = 0.1
eval_interval = 250
eval_iters = 50
log_interval = 10
compile = True
