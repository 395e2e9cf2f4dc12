# A 16M-parameter GPT that learns real English in about 30 minutes on 2 CPU cores
# (~2M tokens). Blocks of 512 tokens leave room for finetuning prompts (a CNN article's
# lead, a SQuAD passage). Most parameters sit in the 50k-token embedding; the 4 blocks are what learns.
out_dir = "out/cpu/pretrain"
data_dir = "data/owt"
block_size = 512
n_layer = 4
n_head = 4
n_embd = 256
batch_size = 4
gradient_accumulation_steps = 1
max_iters = 1000
warmup_iters = 50
learning_rate = 2e-3
min_lr = 2e-4
weight_decay = 0.1
eval_interval = 100
eval_iters = 10
log_interval = 10
