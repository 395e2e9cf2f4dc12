"""Where a result came from: the code's git commit (and whether the tree had uncommitted
changes), and commands written the way a user types them (python, relative paths)."""
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))


def git_state():
    """{"commit": full hash, "dirty": bool} of the code, or None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode or status.returncode:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def machine():
    """The machine in words: its GPUs, else its CPU model and cores."""
    import torch
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    name = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    return f"{name}, {os.cpu_count()} cores"


def relative(arg):
    """An absolute path (or --key=absolute path) as a path relative to the current folder, when
    that is near (at most two folders up), as a user would type it; a far one stays absolute."""
    key, sep, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
    if os.path.isabs(value):
        near = os.path.relpath(value)
        value = value if near.startswith(os.path.join("..", "..", "..")) else near
    return key + sep + value


def user_command(command):
    """A command as the user would type it: `python` for this interpreter, `torchrun` for
    `python -m torch.distributed.run`, relative paths."""
    command = list(command)
    if command and (command[0] == sys.executable or os.path.basename(command[0]).startswith("python")):
        command[0] = "python"
    if command[:3] == ["python", "-m", "torch.distributed.run"]:
        command[:3] = ["torchrun"]
    return [command[0]] + [relative(a) for a in command[1:]]


def provenance_line(timings):
    """When the report was written and from which code; and the code the pipeline ran, if other."""
    code = git_state()
    state = (f"`{code['commit']}`" + (" with uncommitted changes" if code["dirty"] else ", clean tree")) if code \
        else "not a git checkout"
    out = f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from code at commit {state}."
    ran = (timings or {}).get("git")
    if ran and ran != code:
        out += (f" The pipeline started {timings.get('started', '?')} at commit `{ran['commit']}`"
                + (" with uncommitted changes" if ran["dirty"] else "") + ".")
    return out + "\n"
