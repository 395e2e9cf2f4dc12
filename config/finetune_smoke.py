# A tiny finetune for tests: python finetune.py config/finetune_smoke.py
out_dir = "out/smoke/finetune"
init_from = "out/smoke/pretrain/ckpt.pt"
data_dir = "data/smoke"
finetune_dir = "data/finetune_256"
batch_size = 2
max_iters = 20
warmup_iters = 2
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 10
eval_iters = 2
log_interval = 5
