"""Run a script with a fault injected, for tests/test_faults.py:

    python tests/inject_fault.py FAULT SCRIPT [ARGS...]

FAULT is one of (N counts from 1):
    save:N     SIGKILL halfway through writing the N-th ckpt.pt (half its bytes are on disk)
    step:N     SIGKILL right after the N-th training step (between steps)
    encode:N   SIGKILL while tokenizing the N-th document (mid-chunk; use --num-proc 1)

SIGKILL is what the OOM killer or a lost machine does: no handler, no cleanup, no flush.
"""
import io
import os
import runpy
import signal
import sys


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def after_calls(n, on_nth):
    """A counter that calls on_nth() at its n-th tick."""
    calls = {"n": 0}

    def tick(*args):
        calls["n"] += 1
        if calls["n"] == n:
            on_nth(*args)
    return tick


def inject(kind, n):
    import torch
    if kind == "save":
        real_save = torch.save

        def half_written(obj, path):
            buf = io.BytesIO()
            real_save(obj, buf)
            with open(path, "wb") as f:
                f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            die()
        tick = after_calls(n, half_written)

        def save(obj, path, *args, **kw):
            if os.path.basename(str(path)).startswith("ckpt.pt."):
                tick(obj, path)
            real_save(obj, path, *args, **kw)
        torch.save = save
    elif kind == "step":
        tick = after_calls(n, lambda: die())
        from torch.optim.optimizer import register_optimizer_step_post_hook
        counted = []  # a step may run several optimizers (Muon + AdamW): count one of them

        def on_step(opt, args, kw):
            if not counted:
                counted.append(opt)
            if opt is counted[0]:
                tick()
        register_optimizer_step_post_hook(on_step)
    elif kind == "encode":
        import tiktoken
        real = tiktoken.Encoding.encode_ordinary
        tick = after_calls(n, lambda: die())

        def encode_ordinary(self, text):
            tick()
            return real(self, text)
        tiktoken.Encoding.encode_ordinary = encode_ordinary
    else:
        raise SystemExit(f"unknown fault {kind!r}")


if __name__ == "__main__":
    fault, script, *argv = sys.argv[1:]
    kind, _, count = fault.partition(":")
    inject(kind, int(count))
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
