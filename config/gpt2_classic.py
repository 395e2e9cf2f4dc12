# An overlay: the GPT-2 recipe (as in nanoGPT) on top of any preset, for an assignment that asks
# for it or to compare against the default. Learned positions, LayerNorm, GELU, a head tied to the
# token embedding, biases, AdamW for every parameter at the preset's learning_rate, and nanoGPT's
# warmup + cosine schedule:
#     python train.py config/pretrain_cpu.py config/gpt2_classic.py --out_dir=out/cpu_classic/pretrain
#     python train.py config/pretrain_gpt2_124m_1gpu.py config/gpt2_classic.py \
#         --out_dir=out/gpu_classic/pretrain
# At the CPU preset's budget it ends ~0.5 nats above the default recipe (README, "Which recipe").
# It sets no out_dir: pass one, or train.py refuses to overwrite the default recipe's run.
pos_emb = "learned"
norm = "layernorm"
mlp = "gelu"
qk_norm = False
tie_embeddings = True
bias = True
optimizer = "adamw"
lr_schedule = "cosine"
