"""sample.py: continues a prompt from a checkpoint, reproducibly, with clear errors; with --task,
answers text of one's own with evaluation's prompt and decoding, token by token with --stream."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import sample
import scoring
import tasks
from common import UserError, get_tokenizer
from generation import decode_text
from model import GPT, GPTConfig

from conftest import ROOT


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_config": vars(model.config)}, path)
    return path


def samples(capsys, *argv):
    sample.main(list(argv))
    text = capsys.readouterr().out
    return [part.split("\n", 1)[1] for part in text.split("--- sample ")[1:]]


def test_samples_continue_the_prompt_and_repeat_with_the_seed(ckpt, capsys):
    args = ["--ckpt", str(ckpt), "--prompt", "Hello there", "--num-samples", "3", "--max-new-tokens", "8"]
    first = samples(capsys, *args, "--seed", "1")
    assert len(first) == 3 and all(s.startswith("Hello there") for s in first)
    assert samples(capsys, *args, "--seed", "1") == first
    assert len(set(first)) > 1  # sampling, not greedy


def test_greedy_samples_are_identical(ckpt, capsys):
    out = samples(capsys, "--ckpt", str(ckpt), "--prompt", "A", "--num-samples", "2", "--max-new-tokens", "5",
                  "--temperature", "0")
    assert out[0] == out[1]


def test_long_prompt_file_is_cut_to_fit(ckpt, tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("word " * 200)
    sample.main(["--ckpt", str(ckpt), "--prompt-file", str(prompt), "--max-new-tokens", "10"])
    assert "note: prompt cut to its last 54 tokens" in capsys.readouterr().out


def test_bad_inputs_are_clear_errors(ckpt, tmp_path):
    binary = tmp_path / "p.bin"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="cannot read --prompt-file .*give a UTF-8 text file"):
        sample.main(["--ckpt", str(ckpt), "--prompt-file", str(binary)])
    with pytest.raises(UserError, match="leaves no room for a prompt"):
        sample.main(["--ckpt", str(ckpt), "--max-new-tokens", "64"])
    with pytest.raises(UserError, match="checkpoint .*nope.pt not found"):
        sample.main(["--ckpt", str(tmp_path / "nope.pt")])


@pytest.mark.parametrize("flag, value, message", [
    ("--num-samples", "0", "--num-samples must be at least 1, got 0"),
    ("--temperature", "-1", "--temperature must be 0 (greedy) or more, got -1.0"),
])
def test_out_of_range_settings_are_clear_errors(ckpt, flag, value, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sample.main(["--ckpt", str(ckpt), flag, value])


# --- a task, with text of one's own ------------------------------------------------------------

ARTICLE = " ".join(f"The council met on day {i} and voted on the new bridge over the river." for i in range(60))
PASSAGE = "The Denver Broncos defeated the Carolina Panthers 24-10 to win Super Bowl 50 at Levi's Stadium."
QUESTION = "Who won Super Bowl 50?"
SENTENCE = "a gorgeous, witty, seductive movie."
# rows as the data has them (with references, for evaluate_task to score), from the same texts
ROWS = {"cnn_dailymail": {"id": "a", "article": ARTICLE, "highlights": "The council voted."},
        "squad": {"id": "q", "context": PASSAGE, "question": QUESTION,
                  "answers": {"text": ["The Denver Broncos"], "answer_start": [0]}},
        "sst2": {"idx": 7, "sentence": SENTENCE, "label": 1}}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A random model.pt as finetune.py writes it: context 512, data prepared for block size 256."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=512, n_layer=1, n_head=2, n_embd=32)
    path = tmp_path_factory.mktemp("ft") / "model.pt"
    torch.save({"model": GPT(config).state_dict(), "model_config": dataclasses.asdict(config),
                "tasks_version": tasks.TASKS_VERSION, "data_block_size": 256}, path)
    return path


def task_argv(name, folder):
    if name == "cnn_dailymail":
        (folder / "article.txt").write_text(ARTICLE + "\n")
        return ["--task", name, "--input", str(folder / "article.txt")]
    if name == "squad":
        (folder / "passage.txt").write_text(PASSAGE + "\n")
        return ["--task", name, "--context", str(folder / "passage.txt"), "--question", QUESTION]
    return ["--task", name, "--text", SENTENCE]


def decoded(monkeypatch, module, run):
    """run(), and what it passed to scoring.decode_prompts (prompt ids, decoding) and got back."""
    calls, real = [], scoring.decode_prompts

    def spy(model, prompts, decoding, labels, on_token=None):
        outputs = real(model, prompts, decoding, labels, on_token)
        calls.append(([p.ids for p in prompts], decoding, outputs))
        return outputs
    monkeypatch.setattr(module, "decode_prompts", spy)
    result = run()
    (call,) = calls
    return call, result


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_task_answer_is_evaluations_prompt_and_decoding_for_the_same_text(name, finetuned, tmp_path, monkeypatch,
                                                                         capsys):
    (ids, decoding, outputs), _ = decoded(monkeypatch, sample, lambda: sample.main(
        ["--ckpt", str(finetuned), *task_argv(name, tmp_path)]))
    out, err = capsys.readouterr()
    ckpt = torch.load(finetuned, weights_only=False)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    settings = scoring.EvalSettings(batch_size=1, prompt_block_size=256, data_root=str(tmp_path), progress=False)
    (eval_ids, eval_decoding, eval_outputs), (_, predictions) = decoded(monkeypatch, scoring, lambda: scoring.evaluate_task(
        model.eval(), get_tokenizer(), name, [ROWS[name]], settings))
    assert ids == eval_ids and decoding == eval_decoding  # the same prompt tokens, decoded the same way
    assert outputs == eval_outputs and out == predictions[0]["prediction"] + "\n"
    assert decoding["strategy"] == ("label_likelihood" if name == "sst2" else "greedy")
    if name == "cnn_dailymail":  # cut, as evaluation cuts it, to leave the summary its room in block 256
        assert len(ids[0]) + tasks.get_task(name).max_target_tokens <= 256
        assert "note: the article was cut by" in err
    if name != "sst2":
        assert out.strip(), "a random model that writes nothing proves little: change the seed"


@pytest.mark.parametrize("name", ["cnn_dailymail", "squad", "sst2"])
def test_stream_prints_the_same_answer(name, finetuned, tmp_path, capsys):
    argv = ["--ckpt", str(finetuned), *task_argv(name, tmp_path)]
    sample.main(argv)
    whole = capsys.readouterr().out
    sample.main(argv + ["--stream"])
    assert capsys.readouterr().out.rstrip() == whole.rstrip()


def test_free_form_stream_prints_the_same_text(ckpt, capsys):
    argv = ["--ckpt", str(ckpt), "--prompt", "Hello there", "--max-new-tokens", "20", "--temperature", "0"]
    assert samples(capsys, *argv, "--stream") == samples(capsys, *argv)


def test_streamed_tokens_wait_for_the_rest_of_a_split_character(capsys):
    enc = get_tokenizer()
    ids = enc.encode_ordinary("  naïve 🎉 café 日本")
    assert any(len(enc.decode_single_token_bytes(t).decode("utf-8", errors="ignore")) == 0 for t in ids)  # split
    printer = sample.TokenPrinter(enc, stop_tokens=(ids[-1],), errors="ignore", strip=True)
    for t in ids:
        printer([t])
    printer([ids[0]])  # after the stop token: nothing more
    printer.close()
    assert capsys.readouterr().out == decode_text(enc, ids[:-1]) + "\n"


def test_without_ckpt_the_newest_finetuned_model_answers(finetuned, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no --ckpt given and no finetuned model.pt under out/"):
        sample.main(["--task", "sst2", "--text", SENTENCE])
    for run in ("new", "old"):  # written in this order, then "old" dated back
        (tmp_path / "out" / run).mkdir(parents=True)
        (tmp_path / "out" / run / "model.pt").write_bytes(finetuned.read_bytes())
    os.utime(tmp_path / "out/old/model.pt", (1, 1))
    sample.main(["--task", "sst2", "--text", SENTENCE])
    assert capsys.readouterr().out.startswith("using out/new/model.pt, the newest finetuned model.pt under out/")


@pytest.mark.parametrize("argv, message", [
    (["--task", "mnli", "--text", "x"], "unknown task 'mnli'; valid tasks: cnn_dailymail, squad, sst2"),
    (["--task", "cnn_dailymail", "--input", "missing.txt"], "cannot read --input missing.txt"),
    (["--task", "squad", "--question", "Who?"], "--task squad needs the passage: --input FILE"),
    (["--task", "squad", "--text", PASSAGE], "--task squad needs --question"),
    (["--task", "sst2", "--text", SENTENCE, "--question", "Why?"], "--question is for squad; --task sst2 takes only"),
    (["--task", "sst2", "--text", "   "], "the sentence given is empty"),
    (["--text", SENTENCE], "--text needs --task"),
    (["--task", "sst2", "--text", SENTENCE, "--temperature", "0.7"], "--temperature is for free-form sampling"),
    (["--prompt", "Hi", "--stream", "--num-samples", "2"], "--stream prints one sample"),
])
def test_bad_task_input_is_a_clear_error(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        sample.main(["--ckpt", "never_read.pt", *argv])


def test_a_bad_task_input_is_one_line_with_status_2(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--task", "squad", "--text", PASSAGE],
                         cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 2 and run.stderr.startswith("error: --task squad needs --question")
    assert run.stderr.count("\n") == 1
