"""Export a checkpoint as a Hugging Face transformers model folder (weights, config, GPT-2
tokenizer), for transformers, lm-evaluation-harness, vLLM or the hub.

    python export_hf.py --ckpt out/cpu/finetune/model.pt --out out/cpu/hf
    python export_hf.py --ckpt out/cpu/finetune/model.pt --out out/cpu/hf --overwrite   # replace that export
    lm_eval --model hf --model_args pretrained=out/cpu/hf --tasks hellaswag,lambada_openai
"""
import argparse

# common first: it sets OMP_WAIT_POLICY, which OpenMP reads once, as torch loads it
from common import run_main

from checkpoint import load_model
from hf import check_export_folder, export


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a ckpt.pt or model.pt of this toolkit")
    p.add_argument("--out", required=True, help="a new or empty folder, or an earlier export (with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the earlier export in --out")
    args = p.parse_args(argv)
    check_export_folder(args.out, args.overwrite)  # before the model is read: a wrong --out fails at once
    model, _ = load_model(args.ckpt)
    arch = export(model, args.out)
    print(f"wrote {args.out} ({arch}): load it with transformers.AutoModelForCausalLM.from_pretrained({args.out!r})")


if __name__ == "__main__":
    run_main(main)
