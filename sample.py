"""Generate text from a checkpoint.

    python sample.py --ckpt out/cpu/ckpt.pt --prompt "The meaning of life is" --num-samples 3
    python sample.py --ckpt out/cpu_finetune/model.pt --prompt-file article.txt --temperature 0
"""
import argparse

# common first: it sets OMP_WAIT_POLICY, which OpenMP reads once, as torch loads it
from common import EOT, UserError, get_tokenizer, run_main

import torch

from checkpoint import load_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a ckpt.pt or model.pt")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", default="\n", help="text to continue")
    source.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    return args


def main(argv=None):
    args = parse_args(argv)
    prompt = args.prompt
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompt-file {args.prompt_file} ({e.__class__.__name__}); "
                            f"give a UTF-8 text file") from None
    model, _ = load_model(args.ckpt, args.device)
    enc = get_tokenizer()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [EOT]
    room = model.config.block_size - args.max_new_tokens
    if room < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in "
                        f"block_size {model.config.block_size}; ask for fewer tokens")
    if len(ids) > room:
        print(f"note: prompt cut to its last {room} tokens to fit block_size {model.config.block_size}")
        ids = ids[-room:]
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    outputs = model.generate([ids] * args.num_samples, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, generator=generator)
    for i, out in enumerate(outputs):
        print(f"--- sample {i + 1} ---")
        print(prompt + enc.decode(out))


if __name__ == "__main__":
    run_main(main)
