# Multitask finetuning of the GPT-2-small-shaped model (162M with the untied head) on one GPU
# (or torchrun; keep the global gradient_accumulation_steps a multiple of the number of GPUs):
#   python prepare_finetune.py --block-size 1024
#   python finetune.py config/finetune_gpu.py
# 16 x 1024 x 4 = 65,536 tokens per step, 3,000 steps = 2 passes over the default mix.
out_dir = "out/gpu/finetune"
init_from = "out/gpu/pretrain/ckpt.pt"
data_dir = "data/owt"
finetune_dir = "data/finetune_1024"
batch_size = 16
gradient_accumulation_steps = 4
max_iters = 3000
warmup_iters = 100
learning_rate = 1e-4
min_lr = 1e-5
weight_decay = 0.0
replay_fraction = 0.1
eval_interval = 250
eval_iters = 50
log_interval = 10
dtype = "bfloat16"
compile = True
