"""Generate text from a checkpoint, or try it on a task with text of your own.

    python sample.py --prompt "The meaning of life is" --num-samples 3   # the newest out/**/model.pt
    python sample.py --ckpt out/cpu/ckpt.pt --prompt-file story.txt --temperature 0 --stream
    python sample.py --task cnn_dailymail --input article.txt
    python sample.py --task squad --context passage.txt --question "Who won the match?"
    python sample.py --task sst2 --text "A gorgeous, witty, seductive movie." --ckpt out/cpu/finetune/model.pt

Free-form: continues --prompt (or --prompt-file) by sampling (--temperature 0: greedy).
--task: builds the task's own prompt from your text with the code evaluation uses (tasks.py,
fewshot.py; the same prompt, cut to the same block size, as `evaluate.py` builds for a data row)
and decodes as `evaluate.py` does by default: greedy up to the task's max_new_tokens, stopping
where evaluation stops (SQuAD at a newline); SST-2 answers with the likelier label word, nothing
generated. Prints the answer. Without --ckpt, the newest model.pt under out/, as evaluate.py picks it.
"""
import argparse
import codecs
import sys

# common first: it sets OMP_WAIT_POLICY, which OpenMP reads once, as torch loads it
from common import EOT, UserError, get_tokenizer, run_main

import torch

import fewshot
import tasks
from checkpoint import load_checkpoint, model_from_checkpoint
from runtime import pick_dtype
from scoring import (EvalSettings, answer_text, decode_prompts, decoding_settings, default_checkpoint, label_ids,
                     prompt_block_size, warn_if_not_finetuned_here)

# free-form sampling's settings and their defaults; with --task they are an error, not ignored
SAMPLING = {"prompt": "\n", "prompt_file": None, "num_samples": 1, "temperature": 0.8, "top_k": 200,
            "top_p": 1.0, "seed": 1337}
FREE_FORM_NEW_TOKENS = 200
TASK_INPUTS = ("input", "text", "question", "shots", "data_root")  # the flags that need --task


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a ckpt.pt or model.pt (default: the newest model.pt under out/)")
    p.add_argument("--max-new-tokens", type=int,
                   help=f"default: {FREE_FORM_NEW_TOKENS}; with --task, the task's own")
    p.add_argument("--stream", action="store_true",
                   help="print the text token by token as it is generated (SST-2 generates nothing: its "
                        "label word is printed whole)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    free = p.add_argument_group("free-form sampling")
    source = free.add_mutually_exclusive_group()
    source.add_argument("--prompt", help=f"text to continue (default: {SAMPLING['prompt']!r})")
    source.add_argument("--prompt-file", help="read the prompt from this file")
    free.add_argument("--num-samples", type=int, help=f"default {SAMPLING['num_samples']}")
    free.add_argument("--temperature", type=float, help=f"0 is greedy (default {SAMPLING['temperature']})")
    free.add_argument("--top-k", type=int, help=f"default {SAMPLING['top_k']}")
    free.add_argument("--top-p", type=float, help=f"default {SAMPLING['top_p']}")
    free.add_argument("--seed", type=int, help=f"default {SAMPLING['seed']}")
    task = p.add_argument_group("a task, with text of your own")
    task.add_argument("--task", help=" | ".join(tasks.TASKS))
    text = task.add_mutually_exclusive_group()
    text.add_argument("--input", "--context", metavar="FILE",
                      help="the task's input from a file: the article (cnn_dailymail), the passage (squad), "
                           "the sentence (sst2)")
    text.add_argument("--text", help="the task's input given inline, instead of --input FILE")
    task.add_argument("--question", help=f"the question about the input ({', '.join(question_tasks())})")
    task.add_argument("--shots", type=int, help="K solved training examples before the prompt, as evaluate.py "
                                                "--shots (0: zero-shot); default: the finetuning prompt alone")
    task.add_argument("--data-root", help="where --shots finds the training examples, e.g. ../shared/data")
    args = p.parse_args(argv)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.task:
        check_task_args(args)
    else:
        check_free_form_args(args)
    return args


def question_tasks():
    return [t.name for t in tasks.TASKS.values() if t.question_label]


def flag(name):
    return "--" + name.replace("_", "-")


def check_free_form_args(args):
    for name in TASK_INPUTS:
        if getattr(args, name) is not None:
            raise UserError(f"{flag(name)} needs --task ({', '.join(tasks.TASKS)}); to continue text of your own, "
                            f"use --prompt or --prompt-file")
    for name, default in SAMPLING.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if args.stream and args.num_samples > 1:
        raise UserError("--stream prints one sample as it is made; drop --num-samples")


def check_task_args(args):
    task = tasks.get_task(args.task)
    given = [name for name in SAMPLING if getattr(args, name) is not None]
    if given:
        raise UserError(f"{flag(given[0])} is for free-form sampling; --task decodes as evaluation does "
                        f"(greedy), so drop {flag(given[0])}")
    what = task.input_label.lower()
    if args.input is None and args.text is None:
        raise UserError(f"--task {task.name} needs the {what}: --input FILE (or --context FILE) or --text \"...\"")
    if task.question_label and not args.question:
        raise UserError(f"--task {task.name} needs --question \"...\" about the {what}")
    if args.question is not None and not task.question_label:
        raise UserError(f"--question is for {', '.join(question_tasks())}; --task {task.name} takes only the {what}")
    if args.shots is not None and args.shots < 0:
        raise UserError(f"--shots must be 0 (zero-shot) or more, got {args.shots}")
    args.texts = task_texts(args, task)  # read now: a missing file fails before the model loads


def read_text(path, name):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {name} {path} ({e.__class__.__name__}); give a UTF-8 text file") from None


def task_texts(args, task):
    """The task's input texts (Task.inputs' order) from --input / --text and --question."""
    text = read_text(args.input, "--input") if args.input is not None else args.text
    if not text.strip():
        raise UserError(f"the {task.input_label.lower()} given is empty; give some text")
    return [text] + ([args.question] if task.question_label else [])


def task_prompt(task, texts, enc, block_size, shots=None, data_root=None):
    """The Prompt evaluation builds for a row with these inputs (fewshot.build_prompts, Task.prompt)."""
    prompts, _, _ = fewshot.build_prompts(task, [task.row_of(texts)], enc, block_size, shots, data_root)
    return prompts[0]


class TokenPrinter:
    """GPT.generate's on_token for one row: prints each token as it comes, as the whole output will
    be read (the bytes of a character split across tokens wait for the rest; `strip`: no leading
    whitespace, as decode_text reads an answer), and nothing from a stop token on."""

    def __init__(self, enc, stop_tokens, errors, strip):
        self.enc, self.stop_tokens, self.strip = enc, set(stop_tokens), strip
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
        self.stopped = False

    def __call__(self, tokens):
        (token,) = tokens
        self.stopped = self.stopped or token in self.stop_tokens
        if not self.stopped:
            self.show(self.decoder.decode(self.enc.decode_single_token_bytes(token)))

    def show(self, text):
        if self.strip:
            text = text.lstrip()
            self.strip = not text
        print(text, end="", flush=True)

    def close(self):
        self.show(self.decoder.decode(b"", final=True))
        print()


def answer_task(args, model, ckpt, enc):
    task = tasks.get_task(args.task)
    warn_if_not_finetuned_here(ckpt.get("tasks_version"), args.ckpt, args.shots)
    prompt = task_prompt(task, args.texts, enc, prompt_block_size(ckpt, model, args.ckpt), args.shots,
                         args.data_root)
    if prompt.cut:
        print(f"note: the {task.input_label.lower()} was cut by {prompt.cut} tokens to leave room for the answer, "
              f"as evaluation cuts it", file=sys.stderr)
    decoding = decoding_settings(task, EvalSettings(max_new_tokens=args.max_new_tokens))
    labels = label_ids(task, enc)
    printer = TokenPrinter(enc, decoding["stop_tokens"], "ignore", strip=True) if args.stream and not labels else None
    dtype = pick_dtype("auto", torch.device(args.device))  # evaluate.py's autocast: the same near-ties
    with torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype != torch.float32):
        output = decode_prompts(model, [prompt], decoding, labels, on_token=printer)[0]
    if printer:
        printer.close()
    else:
        print(answer_text(task, enc, output))


def sample_free_form(args, model, enc):
    prompt = read_text(args.prompt_file, "--prompt-file") if args.prompt_file else args.prompt
    new_tokens = args.max_new_tokens or FREE_FORM_NEW_TOKENS
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [EOT]
    room = model.config.block_size - new_tokens
    if room < 1:
        raise UserError(f"--max-new-tokens {new_tokens} leaves no room for a prompt in "
                        f"block_size {model.config.block_size}; ask for fewer tokens")
    if len(ids) > room:
        print(f"note: prompt cut to its last {room} tokens to fit block_size {model.config.block_size}")
        ids = ids[-room:]
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    printer = TokenPrinter(enc, (EOT,), "replace", strip=False) if args.stream else None
    if printer:
        print("--- sample 1 ---")
        print(prompt, end="", flush=True)
    outputs = model.generate([ids] * args.num_samples, new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, generator=generator, on_token=printer)
    if printer:
        return printer.close()
    for i, out in enumerate(outputs):
        print(f"--- sample {i + 1} ---")
        print(prompt + enc.decode(out))


def main(argv=None):
    args = parse_args(argv)
    args.ckpt = args.ckpt or default_checkpoint(master=True)
    ckpt = load_checkpoint(args.ckpt)
    model = model_from_checkpoint(ckpt, args.ckpt).to(args.device).eval()
    enc = get_tokenizer()
    if args.task:
        answer_task(args, model, ckpt, enc)
    else:
        sample_free_form(args, model, enc)


if __name__ == "__main__":
    run_main(main)
