# GPT-2 small's shape (124M with a tied head; 162M untied) on one GPU:
#   python train.py config/pretrain_gpt2_124m_1gpu.py
# 131,072 tokens per step (128 sequences of 1024); 10,000 steps = 1.3B tokens (a few hours on an
# A100/H100 with bf16 + torch.compile). batch_size=auto fits the micro-batch to the card's memory
# (e.g. 8 or 16 sequences on a 16-24 GB card) and accumulates to the same tokens per step;
# --batch_size=N fixes it.
out_dir = "out/gpu/pretrain"
data_dir = "data/owt"
block_size = 1024
n_layer = 12
n_head = 12
n_embd = 768
# The recipe is TrainConfig's default, the CPU ablation's winner (README, "Which recipe");
# config/gpt2_classic.py on top gives nanoGPT's GPT-2 recipe with nanoGPT's rates. The rates, from
# the published 124M evidence (config/pretrain_gpt2_124m.py keeps them, for the same reasons):
# - muon_lr 0.02, momentum 0.95 (TrainConfig's defaults): modded-nanogpt's tuned Muon rate for GPT-2
#   small at 524,288 tokens per step (its 10/18/24 record's optimizer comparison: the best of ~20
#   tries, with Nesterov momentum 0.95 and the same quintic Newton-Schulz as muon.py), and the rate
#   the CPU preset trains with at 2,048 tokens per step. Muon's update has a fixed size whatever the
#   gradient's scale, so the rate is kept at our tokens per step; bench/gpu_check.py's side-by-side
#   is the check.
# - learning_rate 6e-4 (AdamW; here only the embeddings, the untied head and the norms): nanoGPT's
#   rate for GPT-2 small. The same comparison's best all-Adam rate was 0.0018, so 6e-4 errs on the
#   stable side for layers that no published Muon run tunes at our batch; the side-by-side checks it.
# - lr_schedule wsd, cooldown_frac 0.4 (TrainConfig's defaults): warmup, the peak rate, then a linear
#   decay over the last 40%. The CPU ablation's one confirmed win of recipe v2 (docs/recipe.md), and
#   what the published GPT-2-small runs train with: modded-nanogpt's records hold the rate flat and
#   decay it linearly over the last 40-45% of steps, nanochat decays linearly over a final
#   warmdown, and Hagele et al. 2024 (arXiv 2405.18392) find a constant rate with a cooldown
#   matches or beats cosine across model sizes that include 124M. It also lets a run be extended,
#   or cut to a budget, mid-way.
#   Recipe v2's other candidates stay off here as on the CPU: none beat the default there beyond
#   the seeds' spread (docs/recipe.md says where that differs from the published choice).
batch_size = "auto"
tokens_per_step = 131072
max_iters = 10000
warmup_iters = 500
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1
eval_interval = 500
eval_iters = 100
log_interval = 10
compile = True
