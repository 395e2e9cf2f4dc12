# The CPU preset (config/pretrain_cpu.py: same size, data, schedule and budget) with the options
# that won the ablation at this scale:
#     python bench/ablate.py --iters 100 --evals 10 --eval-iters 8 --threads 1
#     (the last row: add --configs gpt2,rope,rmsnorm,swiglu,relu2,qk_norm,modern,modern_muon,modern_lr4e-3)
# (4 layers x 256, blocks of 256 x 8 = 2,048 tokens per step, 100 steps = 0.2M tokens per config,
# one seed; out/bench/ablate.md). Final validation loss, and the tokens needed to reach the
# GPT-2 baseline's final loss: gpt2 7.050 (205k); +RoPE 6.835 (119k, the largest single gain);
# +SwiGLU 6.948 (144k) ~ +ReLU^2 6.952 (150k); +QK-norm 7.028; +RMSNorm 7.048 (both within noise);
# modern = RoPE + RMSNorm + SwiGLU + QK-norm + untied head + no biases, AdamW: 6.891 (135k, 66%);
# modern + Muon for the hidden matrices: 6.605 (84k, 41% of the baseline's tokens), the best;
# modern at twice the AdamW rate (4e-3): 6.877 (128k), barely better than 2e-3, so 2e-3 stays.
# A short run: it shows which options learn faster early on, not where they end after 1,000 steps.
out_dir = "out/cpu_modern"
data_dir = "data/owt"
block_size = 512
n_layer = 4
n_head = 4
n_embd = 256
batch_size = 4
gradient_accumulation_steps = 1
max_iters = 1000
warmup_iters = 50
learning_rate = 2e-3  # AdamW: embeddings, output head, norm gains
min_lr = 2e-4
weight_decay = 0.1
eval_interval = 100
eval_iters = 10
log_interval = 10
# architecture
pos_emb = "rope"
norm = "rmsnorm"
mlp = "swiglu"
qk_norm = True
tie_embeddings = False
bias = False
# optimizer: Muon (orthogonalized momentum) for the attention and MLP matrices
optimizer = "muon"
muon_lr = 0.02
muon_momentum = 0.95
