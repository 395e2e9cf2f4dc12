"""Run a script with a fault injected, for tests/test_faults.py:

    python tests/inject_fault.py FAULT SCRIPT [ARGS...]

FAULT is one of (N counts from 1), optionally followed by @R to act only on the torchrun process of
rank R:
    save:N     SIGKILL halfway through writing the N-th ckpt.pt (half its bytes are on disk)
    step:N     SIGKILL right after the N-th training step (between steps)
    encode:N   SIGKILL while tokenizing the N-th document (mid-chunk; use --num-proc 1)
    oom:N      the N-th forward pass in training mode runs out of memory (torch.OutOfMemoryError)
    memory:N   a GPU of N rows: every forward pass in training mode of more rows runs out of memory
    hide:N     ckpt.pt does not exist for this process (a node without the storage rank 0 wrote to;
               N is unused)

SIGKILL is what the OOM killer or a lost machine does: no handler, no cleanup, no flush. The
memory faults stand in for a GPU's allocator: the error is raised where a real one would be.
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


def out_of_memory(rows):
    import torch
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {rows} rows (injected)")


def memory_limit(forward, max_rows):
    """GPT.forward on a device whose memory holds max_rows rows of training activations."""
    def limited(self, idx, *args, **kw):
        if self.training and idx.size(0) > max_rows:
            raise out_of_memory(idx.size(0))
        return forward(self, idx, *args, **kw)
    return limited


def out_of_memory_at(forward, n):
    """GPT.forward whose n-th call in training mode runs out of memory, once."""
    tick = after_calls(n, lambda idx: (_ for _ in ()).throw(out_of_memory(idx.size(0))))

    def failing(self, idx, *args, **kw):
        if self.training:
            tick(idx)
        return forward(self, idx, *args, **kw)
    return failing


def inject(kind, n):
    import torch
    if kind in ("oom", "memory"):
        from model import GPT
        GPT.forward = (out_of_memory_at if kind == "oom" else memory_limit)(GPT.forward, n)
    elif kind == "hide":
        real_exists, real_isfile = os.path.exists, os.path.isfile
        os.path.exists = lambda p: os.path.basename(str(p)) != "ckpt.pt" and real_exists(p)
        os.path.isfile = lambda p: os.path.basename(str(p)) != "ckpt.pt" and real_isfile(p)
    elif kind == "save":
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
    fault, _, rank = fault.partition("@")
    kind, _, count = fault.partition(":")
    if not rank or rank == os.environ.get("RANK", "0"):
        inject(kind, int(count))
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
