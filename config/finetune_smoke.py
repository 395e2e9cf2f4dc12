# A tiny finetune for tests: python finetune.py config/finetune_smoke.py
out_dir = "out/smoke_finetune"
init_from = "out/smoke/ckpt.pt"
data_dir = "data/smoke"
finetune_dir = "data/smoke_finetune"
batch_size = 4
max_iters = 20
warmup_iters = 2
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 10
eval_iters = 2
log_interval = 5
