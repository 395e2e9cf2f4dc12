# The assignment's full run: GPT-2 small's shape (162M with the untied head) on 8 GPUs
# (torchrun) over a 13-15 GB OpenWebText subset (~3.3B tokens), finetuned on all three tasks,
# evaluated in full.
#   python pipeline.py --preset full
run = "full"
owt_name = "owt_14gb"
owt_max_tokens = 3_300_000_000
pretrain_config = "config/pretrain_gpt2_124m.py"
finetune_config = "config/finetune_gpu.py"
finetune_args = "--tokens_per_step=131072"  # 8 GPUs: twice the one-GPU preset's batch
eval_args = "--num-beams 4 --no-repeat-ngram-size 3"
nproc = 8
