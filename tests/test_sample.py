"""sample.py: continues a prompt from a checkpoint, reproducibly, with clear errors."""
import pytest
import torch

import sample
from common import UserError
from model import GPT, GPTConfig


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
