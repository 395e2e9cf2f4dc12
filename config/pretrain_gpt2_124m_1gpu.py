# GPT-2 small (124M) on one GPU: python train.py config/pretrain_gpt2_124m_1gpu.py
# 32 x 1024 x 4 = 131,072 tokens per step; 10,000 steps = 1.3B tokens (a few hours on an
# A100/H100 with bf16 + torch.compile). Lower batch_size if memory runs out; raise
# gradient_accumulation_steps to keep the tokens per step.
out_dir = "out/gpu/pretrain"
data_dir = "data/owt"
block_size = 1024
n_layer = 12
n_head = 12
n_embd = 768
batch_size = 32
gradient_accumulation_steps = 4
max_iters = 10000
warmup_iters = 500
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1
eval_interval = 500
eval_iters = 100
log_interval = 10
dtype = "bfloat16"
compile = True
