"""Decoding (beam search, span-constrained, label scoring) and evaluate.py end to end."""
import dataclasses
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

import evaluate
import metrics
import scoring
import subsets
import tasks
from common import UserError, get_tokenizer
from generation import beam_search, constrained_span_decode, decode_text, label_logprobs
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(vocab_size=512, block_size=64, seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, **kw)).eval()


def sequence_logprob(model, prompt, new):
    logits, _ = model(torch.tensor([prompt + new]), all_logits=True)
    logp = F.log_softmax(logits[0].float(), -1)
    return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(new))


PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15], [1]]


def test_one_beam_is_greedy_decoding():
    model = tiny()
    for prompt in PROMPTS:
        greedy = model.generate([prompt], 20, stop_tokens=())[0]
        assert beam_search(model, prompt, 1, 20, stop_tokens=()) == greedy
        stop = greedy[7]  # a token greedy decoding really emits: both must stop there
        expected = model.generate([prompt], 20, stop_tokens=(stop,))[0]
        assert len(expected) < 20
        assert beam_search(model, prompt, 1, 20, stop_tokens=(stop,)) == expected


def test_more_beams_never_score_below_greedy():
    model = tiny()
    for prompt, beams in itertools.product(PROMPTS, (2, 4)):
        greedy = model.generate([prompt], 12, stop_tokens=())[0]
        best = beam_search(model, prompt, beams, 12, length_penalty=0.0, stop_tokens=())
        assert len(best) == 12
        assert sequence_logprob(model, prompt, best) >= sequence_logprob(model, prompt, greedy) - 1e-4


def test_wide_enough_beam_finds_the_exact_best_sequence():
    model = tiny(vocab_size=6)
    prompt = [1, 2, 3]
    scores = {seq: sequence_logprob(model, prompt, list(seq)) for seq in itertools.product(range(6), repeat=3)}
    best = beam_search(model, prompt, 36, 3, length_penalty=0.0, stop_tokens=())
    assert tuple(best) == max(scores, key=scores.get)


def test_no_repeat_ngram_blocks_repeated_bigrams():
    model = tiny(vocab_size=16)
    free = model.generate([[1, 2, 3]], 20, stop_tokens=())[0]
    bigrams = list(zip(free, free[1:]))
    assert len(set(bigrams)) < len(bigrams)  # a small vocabulary loops without blocking
    for beams in (1, 3):
        out = beam_search(model, [1, 2, 3], beams, 20, no_repeat_ngram_size=2, stop_tokens=())
        bigrams = list(zip(out, out[1:]))
        assert len(out) == 20 and len(set(bigrams)) == len(bigrams)


CONTEXTS = ["The Denver Broncos defeated the Carolina Panthers 24–10 at Levi's Stadium.",
            "Zürich's café scene grew in the 1990s; naïve critics called it \"überfüllt\".",
            "Beyoncé Giselle Knowles-Carter (born September 4, 1981) is an American singer.",
            "日本語のテキストと English mixed, with emoji 🎉 and numbers 3.14159."]


def test_constrained_decoding_returns_only_spans_of_the_context():
    enc = get_tokenizer()
    for seed in range(3):
        model = tiny(vocab_size=50304, seed=seed, block_size=128)
        contexts = [enc.encode_ordinary(" " + c) for c in CONTEXTS]
        prompts = [enc.encode_ordinary(f"Passage:{c}\n\nAnswer:")[-40:] for c in CONTEXTS]
        outs = constrained_span_decode(model, prompts, contexts, 12)
        for out, ctx, text in zip(outs, contexts, CONTEXTS):
            assert 1 <= len(out) <= 12
            assert any(ctx[s:s + len(out)] == out for s in range(len(ctx)))
            assert decode_text(enc, out) in text


def test_label_logprobs_match_a_full_forward_and_pick_the_argmax(shared_data):
    model = tiny()
    labels = [[5], [7, 8, 9], [10, 11]]
    lp = label_logprobs(model, PROMPTS, labels)
    for i, j in itertools.product(range(len(PROMPTS)), range(len(labels))):
        assert lp[i, j].item() == pytest.approx(sequence_logprob(model, PROMPTS[i], labels[j]), abs=1e-4)
    # evaluate_task's SST-2 prediction is the more likely label word
    model = tiny(vocab_size=50304, block_size=128)
    rows = tasks.get_task("sst2").load_rows("validation", str(shared_data), limit=6)
    settings = scoring.EvalSettings(batch_size=4, data_root=str(shared_data), progress=False)
    result, preds = scoring.evaluate_task(model, get_tokenizer(), "sst2", rows, settings)
    for p in preds:
        assert p["prediction"] == max(p["label_logprobs"], key=p["label_logprobs"].get)
    correct = sum(p["prediction"] == p["references"][0] for p in preds)
    assert result["scores"]["accuracy"] == pytest.approx(100 * correct / 6)


def run_eval(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def save_checkpoint(path, **extra):
    torch.manual_seed(0)
    config = GPTConfig(block_size=512, n_layer=1, n_head=2, n_embd=32)
    torch.save({"model": GPT(config).state_dict(), "model_config": dataclasses.asdict(config), **extra}, path)
    return path


def error_line(proc):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_evaluate_end_to_end(tmp_path, shared_data):
    ckpt = save_checkpoint(tmp_path / "model.pt", tasks_version=tasks.TASKS_VERSION)
    proc = run_eval("--task", "all", "--ckpt", ckpt, "--data-root", shared_data, "--limit", 3,
                    "--out", tmp_path / "eval", "--owt-text", shared_data / "webtext" / "train-00000.jsonl.gz")
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr
    for name, split in (("squad", "validation"), ("cnn_dailymail", "test"), ("sst2", "validation")):
        preds = [json.loads(line) for line in open(tmp_path / "eval" / f"{name}_{split}_predictions.jsonl")]
        assert len(preds) == 3 and all({"id", "prediction", "references"} <= set(p) for p in preds)
        assert len({p["id"] for p in preds}) == 3
        result = json.load(open(tmp_path / "eval" / f"{name}_{split}_metrics.json"))
        assert result["count"] == 3 and result["tasks_version"] == tasks.TASKS_VERSION and result["split"] == split
        assert result["shots"] == {"requested": None, "format": "finetuning prompt"}
        assert len(result["checkpoint"]["sha256"]) == 64 and result["decoding"]["strategy"]
        assert set(result["baseline"]["scores"]) == set(result["scores"])
        assert result["data_source"].startswith(str(shared_data))
        assert result["batch_size"] == 16 and result["processes"] == 1  # auto on the CPU: 16 prompts
        sample = result["sample"]  # a seeded sample, named by the hash of its ids
        assert sample["rows"] == 3 and sample["seed"] == 0 and sample["method"].startswith("seeded random sample")
        assert sample["ids_blake2b"] == subsets.ids_digest(p["id"] for p in preds)
        assert result["prompts"]["block_size"] == 512 and 0 <= result["prompts"]["inputs_cut"] <= 3
    first = [r["id"] for r in tasks.get_task("squad").load_rows("validation", str(shared_data), limit=3)]
    squad_preds = [json.loads(line) for line in open(tmp_path / "eval" / "squad_validation_predictions.jsonl")]
    assert [p["id"] for p in squad_preds] != first  # not the first three rows
    assert all(p["title"] for p in squad_preds)  # the article, which the report's bootstrap resamples
    squad = json.load(open(tmp_path / "eval/squad_validation_metrics.json"))
    assert {"exact_match", "f1", "rougeL"} <= set(squad["scores"])
    cnn = json.load(open(tmp_path / "eval/cnn_dailymail_test_metrics.json"))
    assert {"bleu", "bleu_signature", "rouge2", "rougeLsum"} <= set(cnn["scores"])
    assert cnn["baseline"]["name"] == "lead-3"
    assert "label_logprobs" in json.loads(open(tmp_path / "eval/sst2_validation_predictions.jsonl").readline())
    owt = json.load(open(tmp_path / "eval/owt_text_metrics.json"))
    assert owt["scores"]["windows"] == 3 and 9 < owt["scores"]["loss"] < 12  # ~ln(50257) untrained
    assert owt["sample"]["rows"] == 3 and owt["sample"]["seed"] == 0
    assert "exact_match" in proc.stdout and "baseline" in proc.stdout


def test_evaluate_bad_input(tmp_path, shared_data):
    assert "not found" in error_line(run_eval("--task", "squad", "--ckpt", tmp_path / "nope.pt"))
    line = error_line(run_eval("--task", "mnli", "--ckpt", tmp_path / "nope.pt"))
    assert "squad" in line and "sst2" in line
    plain = save_checkpoint(tmp_path / "ckpt.pt")  # pretrained only: warns, still scores
    proc = run_eval("--task", "sst2", "--ckpt", plain, "--data-root", shared_data, "--limit", 2, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "not finetuned on the tasks" in proc.stderr
    (tmp_path / "empty" / "squad").mkdir(parents=True)
    (tmp_path / "empty" / "squad" / "validation.jsonl").write_text("")
    line = error_line(run_eval("--task", "squad", "--ckpt", plain, "--data-root", tmp_path / "empty"))
    assert "no rows" in line


def test_batch_size_is_fitted_to_memory_by_default_or_a_given_count():
    command = ["--task", "squad", "--ckpt", "model.pt"]
    assert evaluate.parse_args(command).batch_size == "auto"
    assert evaluate.parse_args(command + ["--batch-size", "8"]).batch_size == 8
    for bad in ("0", "-3", "many"):
        with pytest.raises(UserError, match=f"--batch-size must be auto or a number of prompts of at least 1, "
                                            f"got '{bad}'"):
            evaluate.parse_args(command + ["--batch-size", bad])


def test_decoding_is_compiled_on_cuda_by_default_where_torch_compile_runs(monkeypatch, capsys):
    """--compile auto: compiled decoding on CUDA only (on the CPU it gains nothing); where torch.compile
    cannot run, or the compiled step fails its probe, eager with one line. (Compiled and eager
    decoding give the same tokens: tests/test_decoding.py, which pays for the compile.)"""
    import runtime
    command = ["--task", "squad", "--ckpt", "model.pt"]
    cpu, gpu = runtime.Runtime(torch.device("cpu")), runtime.Runtime(torch.device("cpu"))
    gpu.device = torch.device("cuda:0")  # the decision only: the model stays on the CPU
    turned_on = []
    monkeypatch.setattr(evaluate, "compile_decoding", lambda model, cuda_graphs: turned_on.append(cuda_graphs))
    monkeypatch.setattr(evaluate, "compile_blocker", lambda device, dtype: None)
    for flags, rt, compiled in ((["--compile", "auto"], cpu, False), (["--compile", "auto"], gpu, True),
                                (["--compile", "true", "--cuda-graphs"], cpu, True), (["--compile", "false"], gpu, False)):
        assert evaluate.compiled_decoding(tiny(), evaluate.parse_args(command + flags), rt) is compiled
    assert turned_on == [False, True]

    class Broken:  # a compiled step that fails where this torch cannot build it
        def static_cache(self, *args):
            raise RuntimeError("InductorError: no valid Triton config")
    monkeypatch.setattr(evaluate, "compile_decoding", lambda model, cuda_graphs: setattr(model, "compiled_decoding",
                                                                                         Broken()))
    model = tiny()
    assert not evaluate.compiled_decoding(model, evaluate.parse_args(command + ["--compile", "true"]), cpu)
    assert model.compiled_decoding is None and model.generate([[1, 2]], 3) is not None  # eager again
    assert "--compile: decoding eager, the compiled step failed a probe (RuntimeError" in capsys.readouterr().out
    monkeypatch.setattr(evaluate, "compile_blocker", lambda device, dtype: "no C++ compiler")
    assert not evaluate.compiled_decoding(tiny(), evaluate.parse_args(command + ["--compile", "true"]), cpu)
    assert "--compile: decoding eager, no C++ compiler" in capsys.readouterr().out


def test_prompts_are_cut_at_the_block_size_of_the_finetuning_data(tmp_path, shared_data):
    model = tiny(block_size=512)
    assert evaluate.prompt_block_size({"data_block_size": 256}, model, "model.pt") == 256
    assert evaluate.prompt_block_size({}, model, "ckpt.pt") == 512  # not finetuned here: the model's context
    bad = save_checkpoint(tmp_path / "model.pt", tasks_version=tasks.TASKS_VERSION, data_block_size=1024)
    with pytest.raises(UserError, match="block size 1024, more than its context of 512: data and checkpoint disagree"):
        evaluate.main(["--task", "sst2", "--ckpt", str(bad), "--data-root", str(shared_data), "--limit", "1"])


def test_pretrained_model_is_scored_few_shot_with_the_examples_used_recorded(tmp_path, shared_data):
    plain = save_checkpoint(tmp_path / "ckpt.pt")  # block 512, no tasks_version: a pretrained model
    proc = run_eval("--task", "all", "--ckpt", plain, "--shots", 2, "--data-root", shared_data, "--limit", 2,
                    "--out", tmp_path / "eval")
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    for name, split in (("squad", "validation"), ("cnn_dailymail", "test"), ("sst2", "validation")):
        result = json.load(open(tmp_path / "eval" / f"{name}_{split}_metrics.json"))
        preds = [json.loads(line) for line in open(tmp_path / "eval" / f"{name}_{split}_predictions.jsonl")]
        used = [p["shots"] for p in preds]
        assert result["shots"]["requested"] == 2 and result["shots"]["used_mean"] == sum(used) / 2
        assert all(0 <= n <= 2 for n in used)
    assert used == [2, 2]  # SST-2's sentences are short: both examples fit


def test_without_ckpt_the_newest_finetuned_model_is_scored(tmp_path, shared_data):
    line = error_line(run_eval("--task", "squad", cwd=tmp_path))
    assert "no finetuned model.pt under out/" in line and "pipeline.py" in line
    for run in ("new", "old"):  # written in this order, then "old" dated back
        (tmp_path / "out" / run / "finetune").mkdir(parents=True)
        save_checkpoint(tmp_path / "out" / run / "finetune" / "model.pt", tasks_version=tasks.TASKS_VERSION)
    os.utime(tmp_path / "out/old/finetune/model.pt", (1, 1))
    proc = run_eval("--task", "sst2", "--data-root", shared_data, "--limit", 2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "using out/new/finetune/model.pt" in proc.stdout
    assert (tmp_path / "out/new/finetune/eval/sst2_validation_metrics.json").is_file()


def test_owt_bin_of_odd_length_is_a_one_line_error(tmp_path):
    ckpt = save_checkpoint(tmp_path / "model.pt", tasks_version=tasks.TASKS_VERSION)
    (tmp_path / "val.bin").write_bytes(b"\x01\x00" * 600 + b"\x01")  # cut mid-token
    line = error_line(run_eval("--task", "owt", "--ckpt", ckpt, "--owt-bin", tmp_path / "val.bin"))
    assert "val.bin has an odd number of bytes" in line


def test_owt_limit_scores_a_seeded_sample_of_windows():
    model, T = tiny(block_size=16), 16
    tokens = torch.randint(0, 512, (10 * T + 1,), generator=torch.Generator().manual_seed(0)).numpy()
    windows = scoring.owt_windows(len(tokens), T, 4)
    assert windows == scoring.owt_windows(len(tokens), T, 4) and windows != [0, 1, 2, 3] and len(set(windows)) == 4
    assert scoring.owt_windows(len(tokens), T) == list(range(10))
    result = scoring.evaluate_owt(model, tokens, 4, progress=False)
    expected = [model(torch.from_numpy(tokens[w * T:(w + 1) * T][None]).long(),
                      targets=torch.from_numpy(tokens[w * T + 1:(w + 1) * T + 1][None]).long())[1].item()
                for w in windows]
    assert result["scores"]["loss"] == pytest.approx(sum(expected) / 4, rel=1e-5)
    assert result["sample"]["rows"] == 4 and result["sample"]["of"] == 10 and result["sample"]["seed"] == 0


@pytest.fixture(scope="module")
def cnn_rows(shared_data):
    return tasks.get_task("cnn_dailymail").load_rows("test", str(shared_data), limit=3)


def gpt2_settings(seed=0):
    return scoring.EvalSettings(split="test", batch_size=2, shots=0, protocol="gpt2", decoding_seed=seed,
                                progress=False)


def test_gpt2_protocol_samples_top2_for_100_tokens_and_keeps_the_first_three_sentences(cnn_rows, monkeypatch):
    enc, model = get_tokenizer(), tiny(vocab_size=50304, block_size=512)
    text = " One fell. Two rose. Three ran. Four sat. Five slept."
    calls = []

    def generate(prompts, n, **kw):
        calls.append((n, kw))
        return [enc.encode_ordinary(text)] * len(prompts)

    monkeypatch.setattr(model, "generate", generate)
    result, preds = scoring.evaluate_task(model, enc, "cnn_dailymail", cnn_rows, gpt2_settings())
    assert [p["prediction"] for p in preds] == ["One fell.\nTwo rose.\nThree ran."] * 3
    assert preds[0]["generated"] == text.strip()
    n, kw = calls[0]
    assert n == 100 and kw["top_k"] == 2 and kw["temperature"] == 1.0 and isinstance(kw["generator"], torch.Generator)
    assert result["decoding"] == {"protocol": "gpt2", "strategy": "sampling", "top_k": 2, "temperature": 1.0,
                                  "max_new_tokens": 100, "keep_sentences": 3, "seed": 0, "stop_tokens": [50256]}


def test_gpt2_protocol_is_reproducible_under_its_seed(cnn_rows):
    enc, model = get_tokenizer(), tiny(vocab_size=50304, block_size=512)
    runs = [scoring.evaluate_task(model, enc, "cnn_dailymail", cnn_rows, gpt2_settings(seed)) for seed in (0, 0, 1)]
    generated = [[p["generated"] for p in preds] for _, preds in runs]
    assert generated[0] == generated[1] and generated[0] != generated[2]
    result, preds = runs[0]
    assert 0 < result["generated_tokens"] <= 3 * 100
    for p in preds:
        assert p["prediction"] == metrics.first_sentences(p["generated"], 3)


def test_gpt2_protocol_is_cnn_dailymail_zero_shot_with_its_own_decoding():
    base = ["--task", "cnn_dailymail", "--ckpt", "ckpt.pt", "--protocol", "gpt2"]
    assert evaluate.parse_args(base).shots == 0  # implied
    assert evaluate.parse_args(base + ["--shots", "0"]).shots == 0
    for extra, message in ((["--shots", "3"], "zero-shot; drop --shots 3"), (["--num-beams", "4"], "drop --num-beams"),
                           (["--max-new-tokens", "64"], "drop --max-new-tokens")):
        with pytest.raises(UserError, match=message):
            evaluate.parse_args(base + extra)
    with pytest.raises(UserError, match="use it with --task cnn_dailymail, not squad"):
        evaluate.parse_args(["--task", "squad", "--ckpt", "ckpt.pt", "--protocol", "gpt2"])

