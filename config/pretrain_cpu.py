# A 29M-parameter GPT that learns real English from 2M tokens: ~75 minutes on one core of the
# development machine, eager (bench/ablate.py); compile, below, and a second core are faster.
# 13M parameters in the token embedding, 13M in the untied head, 3M in the 4 blocks. Blocks of
# 512 tokens leave room for finetuning prompts (a CNN article's lead, a SQuAD passage).
# The recipe is TrainConfig's default, the one that won bench/ablate.py at this budget (README,
# "Which recipe"): RoPE, RMSNorm, SwiGLU, QK-norm, an untied head, no biases, and Muon (0.02,
# momentum 0.95) for the attention and MLP matrices, AdamW (learning_rate) for the embeddings,
# the head and the norms; both rates follow the same schedule down to 10%: warmup, the peak rate,
# then a linear decay over the last 40% (WSD, recipe v2's one confirmed win: docs/recipe.md).
# The GPT-2 recipe (learned positions, LayerNorm, GELU, tied head, biases, AdamW) is one overlay away:
#     python train.py config/pretrain_cpu.py config/gpt2_classic.py --out_dir=out/cpu_classic/pretrain
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
# the rate sweep's best AdamW rate for this budget (README, "Which recipe"); Muon keeps its 0.02
learning_rate = 2e-3
min_lr = 2e-4
eval_interval = 100
eval_iters = 10
log_interval = 10
# torch.compile (inductor): 1.23-1.37x the eager speed here at equal loss (README, "torch.compile
# on the CPU"), for ~1.5 min of compiling once; without a C++ compiler it trains eager and says so
compile = True
