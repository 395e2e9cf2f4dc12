# A tiny model for tests and for proving the whole path in seconds.
out_dir = "out/smoke/pretrain"
data_dir = "data/smoke"
block_size = 256  # room for finetuning prompts in the smoke pipeline
n_layer = 2
n_head = 2
n_embd = 64
batch_size = 2
max_iters = 20
warmup_iters = 5
learning_rate = 3e-3
min_lr = 3e-4
eval_interval = 10
eval_iters = 2
log_interval = 5
