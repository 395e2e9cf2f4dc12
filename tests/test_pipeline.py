"""The one command: the smoke preset goes from raw ../shared data to model.pt, scores and a
report; reruns skip finished steps; a killed pipeline resumes its training step."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

TASKS = (("squad", "validation"), ("cnn_dailymail", "test"), ("sst2", "validation"))  # default splits


def pipeline(cwd, shared_data, *extra, **kw):
    cmd = [sys.executable, str(ROOT / "pipeline.py"), "--preset", "smoke", "--data-root", str(shared_data), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, **kw)


def ran_steps(output):
    return [line.split("]")[0][1:] for line in output.splitlines() if line.startswith("[") and "] $ " in line]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shared_data):
    cwd = tmp_path_factory.mktemp("pipeline")
    result = pipeline(cwd, shared_data)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ran_steps(result.stdout) == ["prepare_owt", "pretrain", "prepare_finetune", "finetune", "evaluate",
                                        "evaluate_pretrained_0shot", "evaluate_pretrained_3shot",
                                        "evaluate_pretrained_gpt2", "report"]
    return cwd


def test_smoke_pipeline_produces_model_scores_and_report(finished_run):
    run = finished_run / "out" / "smoke"
    assert (run / "finetune" / "model.pt").is_file()
    for task, split in TASKS:
        metrics = json.loads((run / "eval" / f"{task}_{split}_metrics.json").read_text())
        assert metrics["count"] > 0 and metrics["scores"] and metrics["split"] == split
        for shots in (0, 3):  # the pretrained model too, zero- and few-shot
            metrics = json.loads((run / f"eval_pretrained_{shots}shot" / f"{task}_{split}_metrics.json").read_text())
            assert metrics["shots"]["requested"] == shots and metrics["checkpoint_tasks_version"] is None
    gpt2 = json.loads((run / "eval_pretrained_gpt2" / "cnn_dailymail_test_metrics.json").read_text())
    assert gpt2["decoding"]["strategy"] == "sampling" and gpt2["decoding"]["top_k"] == 2  # the anchor's protocol
    report = (run / "REPORT.md").read_text()
    assert "| **finetuned model** |" in report and "| pretrained model, zero-shot" in report
    assert "| pretrained model, 3-shot" in report and "top-k=2 sampling (seed 0), up to 100 tokens, first 3 sentences" in report
    images = [part.split(")")[0] for part in report.split("](")[1:] if part.split(")")[0].endswith(".png")]
    assert images and all((run / image).is_file() for image in images)


def test_rerun_skips_finished_steps_and_a_deleted_output_reruns_only_its_dependents(finished_run, shared_data):
    again = pipeline(finished_run, shared_data)
    assert again.returncode == 0 and ran_steps(again.stdout) == []
    (finished_run / "out" / "smoke" / "eval" / "squad_validation_metrics.json").unlink()
    partial = pipeline(finished_run, shared_data)
    assert partial.returncode == 0, partial.stderr[-2000:]
    assert ran_steps(partial.stdout) == ["evaluate", "report"]


@pytest.mark.parametrize("sig, pretrain_args", [
    (signal.SIGINT, "--max_iters=400 --eval_interval=5 --log_interval=1"),
    (signal.SIGKILL, "--max_iters=40 --eval_interval=10 --log_interval=10"),  # shorter: the ctrl-c run covers length
], ids=["ctrl-c", "sigkill"])
def test_killed_pipeline_resumes_pretraining_from_its_checkpoint(finished_run, shared_data, sig, pretrain_args):
    """Reuses the prepared data; a longer pretraining is stopped mid-way (Ctrl-C, or SIGKILL: no
    handler runs, maybe mid-checkpoint-write) and resumed; no temporary file is left behind."""
    run_name = f"killed_{sig.name}"
    extra = ["--", f"--run={run_name}", f"--pretrain_args={pretrain_args}"]
    cmd = [sys.executable, str(ROOT / "pipeline.py"), "--preset", "smoke", "--data-root", str(shared_data), *extra]
    proc = subprocess.Popen(cmd, cwd=finished_run, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run = finished_run / "out" / run_name
    ckpt = run / "pretrain" / "ckpt.pt"
    deadline = time.time() + 300
    while not ckpt.exists() or ckpt.stat().st_size == 0:
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    time.sleep(2)
    os.killpg(proc.pid, sig)  # the whole process group, as Ctrl-C does
    proc.wait(timeout=120)
    assert not (run / "pipeline" / "pretrain.json").exists()
    resumed = pipeline(finished_run, shared_data, *extra, "--pretrained_shots=", "--finetune_args=--max_iters=2")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from out/{run_name}/pretrain/ckpt.pt at iteration" in resumed.stdout
    assert ran_steps(resumed.stdout)[0] == "pretrain"  # prepare_owt was already done
    assert not list(finished_run.rglob("*.tmp"))


def test_offline_without_data_root_names_the_pipelines_own_flag(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "--preset", "smoke"], cwd=tmp_path,
                            env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    hub_error = [line for line in result.stderr.splitlines() if "from the hub" in line]
    assert hub_error and "pass --data-root" in hub_error[0] and "--source" not in result.stderr


def test_finetuning_data_takes_the_block_size_of_the_pretraining_config():
    import pipeline as pipeline_module
    from config import parse_config

    def block_size(*argv):
        cfg = parse_config(pipeline_module.PipelineConfig, [str(ROOT / "config" / "pipeline_cpu.py"), *argv])
        return pipeline_module.finetune_block_size(cfg)

    assert block_size() == 512  # config/pretrain_cpu.py's
    assert block_size("--pretrain_args=--block_size=256") == 256
    assert block_size("--finetune_block_size=384") == 384


def pretrain_step(pipeline_module, preset):
    from config import parse_config
    cfg = parse_config(pipeline_module.PipelineConfig, [str(ROOT / "config" / "pipeline_cpu.py"),
                                                        f"--pretrain_config={preset}"])
    return next(s for s in pipeline_module.build_steps(cfg, None) if s.name == "pretrain")


def test_a_training_step_reruns_when_its_settings_change_not_when_its_preset_is_touched(tmp_path, monkeypatch):
    """The stamp holds the resolved config: a comment or a fresh checkout of the preset keeps a
    finished pretraining; a changed value (in the preset or a default in config.py) does not."""
    import pipeline as pipeline_module
    preset = tmp_path / "pretrain.py"
    text = (ROOT / "config" / "pretrain_cpu.py").read_text()
    preset.write_text(text)
    before = pipeline_module.signature(pretrain_step(pipeline_module, preset))
    preset.write_text("# a new comment\n" + text)
    os.utime(preset, (0, 0))
    assert pipeline_module.signature(pretrain_step(pipeline_module, preset)) == before
    preset.write_text(text + "\nn_layer = 6\n")
    assert pipeline_module.signature(pretrain_step(pipeline_module, preset)) != before
    preset.write_text(text)

    @dataclasses.dataclass
    class NewDefault(pipeline_module.TrainConfig):  # config.py changes a default the preset does not set
        mlp: str = "gelu"
    monkeypatch.setattr(pipeline_module, "TrainConfig", NewDefault)
    assert pipeline_module.signature(pretrain_step(pipeline_module, preset)) != before


def test_a_finished_run_whose_settings_changed_is_moved_aside_not_deleted(tmp_path, monkeypatch):
    import pipeline as pipeline_module
    monkeypatch.chdir(tmp_path)
    run_dir, stamps = tmp_path / "pretrain", tmp_path / "stamps"
    run_dir.mkdir()
    (run_dir / "ckpt.pt").write_text("hours of training")
    step = pipeline_module.Step("pretrain", [sys.executable, "-c", "import os; os.makedirs('pretrain'); open('pretrain/ckpt.pt', 'w').write('new')"],
                                [], [str(run_dir / "ckpt.pt")], resumable_dir=str(run_dir), settings="n_layer=6")
    stamps.mkdir()
    (stamps / "pretrain.json").write_text(json.dumps({"signature": "the settings it finished with", "seconds": 1}))
    pipeline_module.run_step(step, str(stamps), dry_run=False)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("pretrain.outdated-")]
    assert len(kept) == 1 and (kept[0] / "ckpt.pt").read_text() == "hours of training"
    assert (run_dir / "ckpt.pt").read_text() == "new"


@pytest.mark.parametrize("how", ["max_minutes", "max_minutes under torchrun", "sigusr1"])
def test_a_training_step_stopped_before_its_end_stops_the_pipeline_with_a_rerun_hint(tmp_path, monkeypatch, capsys,
                                                                                   how):
    """A step that ran out of --max_minutes (exit 75; under torchrun, whose exit status is its own, the
    run's log says so), or a pipeline that got SIGUSR1 (SLURM's warning), passed on to its step: the
    pipeline stops too, says to rerun, and starts no further step."""
    import pipeline as pl
    monkeypatch.setattr(pl, "SIGUSR1_SEEN", [])
    previous = signal.signal(signal.SIGUSR1, pl.wait_for_the_step)
    (tmp_path / "run").mkdir()
    if how == "max_minutes under torchrun":
        (tmp_path / "run" / "metrics.jsonl").write_text('{"type": "train", "iter": 10}\n'
                                                       '{"type": "stop", "iter": 10, "reason": "time"}\n')
    code = {"max_minutes": "raise SystemExit(75)", "max_minutes under torchrun": "raise SystemExit(1)",
            # the step tells the pipeline, which passes the signal on to it (it then dies of it: no handler)
            "sigusr1": "import os, signal, time; os.kill(os.getppid(), signal.SIGUSR1); time.sleep(30)"}[how]
    step = pl.Step("pretrain", [sys.executable, "-c", code], [], [], resumable_dir=str(tmp_path / "run"))
    try:
        with pytest.raises(SystemExit) as stopped:
            pl.run_step(step, str(tmp_path / "stamps"), dry_run=False)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert stopped.value.code == (130 if how == "sigusr1" else 75)
    assert "stopped with a checkpoint before the end" in capsys.readouterr().out
    assert not (tmp_path / "stamps" / "pretrain.json").exists()  # not taken for finished
