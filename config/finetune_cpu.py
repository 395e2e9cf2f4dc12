# Multitask finetuning of the CPU-pretrained model (600 steps, ~1.2M tokens) on 2 CPU cores:
#   python prepare_finetune.py --block-size 512 --data-root ../shared/data
#   python finetune.py config/finetune_cpu.py
out_dir = "out/cpu/finetune"
init_from = "out/cpu/pretrain/ckpt.pt"
data_dir = "data/owt"  # replay text
finetune_dir = "data/finetune_512"
batch_size = 4
gradient_accumulation_steps = 1
max_iters = 600
warmup_iters = 30
learning_rate = 5e-4
min_lr = 5e-5
weight_decay = 0.0
replay_fraction = 0.1
eval_interval = 100
eval_iters = 10
log_interval = 10
