# GPT-2 small's shape (124M with a tied head; 162M untied) on 8 GPUs, nanoGPT's batch, schedule:
#   torchrun --standalone --nproc_per_node=8 train.py config/pretrain_gpt2_124m.py
# 491,520 tokens per step (nanoGPT's 12 sequences x 1024 tokens x 40 micro-steps), 60 sequences per GPU
# drawn in micro-batches fitted to the card's memory (batch_size=auto).
# 8,000 steps = 3.9B tokens, about one pass over a 13-15 GB OpenWebText subset (~3.3B tokens).
out_dir = "out/full/pretrain"
data_dir = "data/owt"
block_size = 1024
n_layer = 12
n_head = 12
n_embd = 768
# The recipe is TrainConfig's default, the CPU ablation's winner, with Muon at 0.02 and AdamW at
# nanoGPT's 6e-4, and the warmup-stable-decay schedule: config/pretrain_gpt2_124m_1gpu.py gives the
# published evidence for the rates and the schedule.
# config/gpt2_classic.py on top gives nanoGPT's GPT-2 recipe with nanoGPT's rates.
dropout = 0.0
batch_size = "auto"
tokens_per_step = 491520
max_iters = 8000
warmup_iters = 400
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1
beta2 = 0.95
grad_clip = 1.0
eval_interval = 500
eval_iters = 200
log_interval = 10
compile = True
