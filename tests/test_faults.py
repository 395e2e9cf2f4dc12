"""Fault injection: scripts killed with SIGKILL (no handler runs) mid-chunk, mid-checkpoint-write
and between steps. The rerun finishes, training resumes bit-exact from the last complete
checkpoint, and no temporary file is left behind, taken for output or left to grow.
pipeline.py killed with SIGKILL is in tests/test_pipeline.py, which has a prepared run to reuse."""
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import prepare_finetune
import train
from conftest import ROOT, TINY

INJECT = str(ROOT / "tests" / "inject_fault.py")


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_killed(fault, script, *argv):
    """Run script under a fault; it must die by SIGKILL. Returns its output."""
    result = subprocess.run([sys.executable, INJECT, fault, str(ROOT / script), *map(str, argv)], cwd=ROOT,
                            env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def run(script, *argv, cwd=ROOT):
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], cwd=cwd, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def temporaries(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


def checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_run(full, cut):
    """Same final weights, bit for bit, and the same logged losses."""
    a, b = checkpoint(full / "ckpt.pt")["model"], checkpoint(cut / "ckpt.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda d: [(r["iter"], r.get("loss", r.get("val_loss")))
                        for r in map(json.loads, open(d / "metrics.jsonl")) if r["type"] in ("train", "eval")]
    assert losses(cut) == losses(full)


# --- prepare_owt -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def webtext(shared_data, tmp_path_factory):
    """The first 300 documents of the shared web text (a few chunks' worth)."""
    import gzip
    path = tmp_path_factory.mktemp("src") / "docs.jsonl"
    with gzip.open(shared_data / "webtext" / "train-00000.jsonl.gz", "rt") as f, open(path, "w") as out:
        for _, line in zip(range(300), f):
            out.write(line)
    return path


def test_prepare_killed_mid_chunk_reruns_to_the_same_bytes(webtext, tmp_path):
    args = ["--source", webtext, "--val-fraction", "0.1", "--num-proc", "1"]
    run("prepare_owt.py", *args, "--out-dir", tmp_path / "full")
    cut = tmp_path / "cut"
    run_killed("encode:100", "prepare_owt.py", *args, "--out-dir", cut)  # the second chunk of 64
    assert temporaries(cut) and not (cut / "owt" / "train.bin").exists()  # only temporaries, never output
    run("prepare_owt.py", *args, "--out-dir", cut)
    assert temporaries(cut) == []  # the rerun removed the killed run's temporaries
    for name in ("train.bin", "val.bin"):
        assert (cut / "owt" / name).read_bytes() == (tmp_path / "full" / "owt" / name).read_bytes()


def test_prepare_with_workers_killed_from_outside_leaves_nothing_growing(webtext, tmp_path):
    cmd = [sys.executable, str(ROOT / "prepare_owt.py"), "--source", str(webtext), "--num-proc", "2",
           "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 60
    while not temporaries(tmp_path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: parent and pool workers
    proc.wait(timeout=30)
    left = {p: os.path.getsize(tmp_path / p) for p in temporaries(tmp_path)}
    time.sleep(0.5)
    assert {p: os.path.getsize(tmp_path / p) for p in temporaries(tmp_path)} == left  # nothing still writing
    run("prepare_owt.py", *cmd[2:])
    assert temporaries(tmp_path) == [] and json.load(open(tmp_path / "owt" / "meta.json"))["splits"]


def fail_to_start():
    raise RuntimeError("no tokenizer here")


def test_a_worker_that_cannot_start_ends_the_command_with_its_error():
    """A Pool replaces a worker whose initializer raises, forever; guarded, the first task raises it."""
    with mp.get_context("spawn").Pool(2, common.guarded_init, (fail_to_start,)) as pool:
        with pytest.raises(common.UserError, match=r"a worker could not start \(RuntimeError: no tokenizer here\)"):
            pool.apply_async(common.check_worker).get(timeout=60)


@pytest.mark.parametrize("script, args", [
    ("prepare_owt.py", ["--source", "{src}", "--out-dir", "{tmp}"]),
    ("prepare_finetune.py", ["--data-root", "{data}", "--out-dir", "{tmp}", "--limit", "4", "--tasks", "sst2"]),
])
@pytest.mark.parametrize("num_proc", ["1", "2"])
def test_without_the_tokenizer_the_command_stops_with_one_line(script, args, num_proc, webtext, shared_data, tmp_path):
    (tmp_path / "empty").mkdir()
    argv = [a.format(src=webtext, tmp=tmp_path / "out", data=shared_data) for a in args]
    result = subprocess.run([sys.executable, script, *argv, "--num-proc", num_proc], cwd=ROOT,
                            env={**env(), "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty")},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot load the GPT-2 tokenizer")
    assert "Traceback" not in result.stderr and temporaries(tmp_path) == []


# --- training ------------------------------------------------------------------------------------

ARGS = TINY + ["--max_iters=12", "--eval_interval=4", "--dropout=0.1"]  # checkpoints at 0, 4, 8, 12


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A small learnable corpus and the uninterrupted reference run on it."""
    root = tmp_path_factory.mktemp("pretrain")
    rng = np.random.default_rng(0)
    data = np.tile(rng.integers(0, 300, size=37), 300).astype(np.uint16)
    data.tofile(root / "train.bin")
    data[:2000].tofile(root / "val.bin")
    train.main(ARGS + [f"--data_dir={root}", f"--out_dir={root}/full"])
    return root


@pytest.mark.parametrize("fault, resumes_at", [
    ("step:6", 4),  # between steps: the checkpoint of iteration 4 is the last one
    ("save:3", 4),  # halfway through writing iteration 8's checkpoint: iteration 4's stays whole
])
def test_killed_training_resumes_exactly_from_the_last_whole_checkpoint(pretrained, fault, resumes_at):
    cut = pretrained / fault.replace(":", "_")
    args = ARGS + [f"--data_dir={pretrained}", f"--out_dir={cut}"]
    run_killed(fault, "train.py", *args)
    assert checkpoint(cut / "ckpt.pt")["iter_num"] == resumes_at
    if fault.startswith("save"):
        assert [p for p in temporaries(cut) if p.startswith("ckpt.pt.")]  # the half-written one
    out = run("train.py", *args, "--resume")
    assert f"resuming from {cut}/ckpt.pt at iteration {resumes_at}" in out
    assert temporaries(cut) == []
    assert_same_run(pretrained / "full", cut)


@pytest.fixture(scope="module")
def finetune_data(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    prepare_finetune.main(["--data-root", str(shared_data), "--out-dir", str(root / "tasks"), "--block-size", "64",
                           "--limit", "16", "--num-proc", "1", "--tasks", "sst2"])
    torch.manual_seed(0)
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    common.torch_save({"model": model.state_dict(), "model_config": vars(model.config)}, root / "init.pt")
    return root


def test_finetune_killed_mid_checkpoint_write_resumes_exactly(finetune_data):
    def args(out):
        return ["config/finetune_smoke.py", f"--init_from={finetune_data}/init.pt", "--tasks=sst2",
                f"--finetune_dir={finetune_data}/tasks", f"--out_dir={finetune_data}/{out}", "--replay_fraction=0",
                "--block_size=64", "--max_iters=6", "--eval_interval=2", "--log_interval=1", "--dropout=0.1"]
    run("finetune.py", *args("full"))
    run_killed("save:3", "finetune.py", *args("cut"))  # writing iteration 4's checkpoint
    assert checkpoint(finetune_data / "cut" / "ckpt.pt")["iter_num"] == 2
    run("finetune.py", *args("cut"), "--resume")
    assert temporaries(finetune_data / "cut") == []
    assert_same_run(finetune_data / "full", finetune_data / "cut")
    assert checkpoint(finetune_data / "cut" / "model.pt")["iter_num"] == \
        checkpoint(finetune_data / "full" / "model.pt")["iter_num"]
