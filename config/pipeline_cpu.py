# The CPU reference run (2 cores): all of ../shared/data/webtext (51M tokens, of which the
# 29M-parameter model sees 2M), multitask finetuning, and an evaluation on the first 500
# validation examples of each task.
#   python pipeline.py --preset cpu --data-root ../shared/data
run = "cpu"
owt_name = "owt"
pretrain_config = "config/pretrain_cpu.py"
finetune_config = "config/finetune_cpu.py"
eval_limit = 500
