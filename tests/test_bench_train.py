"""bench/bench_train.py --compare-compile: an eager and a compiled copy of one model, stepped in turn."""
import runpy

from conftest import ROOT


def test_compare_compile_steps_both_copies_through_the_same_batches_to_the_same_losses(corpus, tmp_path):
    bench = runpy.run_path(str(ROOT / "bench" / "bench_train.py"))
    result = bench["main"]([str(ROOT / "config" / "pretrain_smoke.py"), "--compare-compile", "--runs", "2",
                            "--iters", "1", "--warmup", "1", "--out", str(tmp_path / "compile.json"), "--device=cpu",
                            f"--data_dir={corpus}", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32",
                            "--batch_size=2"])
    assert [r["name"] for r in result["rows"]] == ["eager", "compiled"]
    assert all(r["ms_per_iter"] > 0 for r in result["rows"]) and result["compile_s"] > 0
    eager, compiled = result["losses"]["eager"], result["losses"]["compiled"]
    assert len(eager) == len(compiled) == 1 + 1 + 2 * 1  # the compiling step, warm-up, the timed runs
    assert len(set(eager)) > 1  # the steps went through different batches and updates
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-4 and result["max_loss_diff"] < 1e-4
