# An overlay: the options that won the ablation at CPU-preset scale, on top of any preset:
#     python train.py config/pretrain_cpu.py config/modern.py
# The ablation:
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
out_dir = "out/cpu_modern/pretrain"  # beside the baseline preset's out/cpu/pretrain
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
