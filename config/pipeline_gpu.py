# One GPU, a few hours: GPT-2 small's shape (162M, untied head) on a 1.5B-token OpenWebText
# subset (streamed from the hub: only the documents needed are downloaded), finetuned at 1024
# tokens, evaluated in full.
#   python pipeline.py --preset gpu
run = "gpu"
owt_name = "owt_1500m"
owt_max_tokens = 1_500_000_000
pretrain_config = "config/pretrain_gpt2_124m_1gpu.py"
finetune_config = "config/finetune_gpu.py"
eval_args = "--num-beams 4 --no-repeat-ngram-size 3"
