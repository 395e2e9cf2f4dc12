# Minutes on a laptop CPU: proves the whole path (tiny model, a few hundred thousand tokens).
#   python pipeline.py --preset smoke --data-root ../shared/data
run = "smoke"
owt_name = "owt_smoke"
owt_max_tokens = 300_000
owt_val_fraction = 0.05  # a few documents, enough for a validation loss
pretrain_config = "config/pretrain_smoke.py"
finetune_config = "config/finetune_smoke.py"
finetune_limit = 64
eval_limit = 4
