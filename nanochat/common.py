"""
Shared plumbing: devices and dtypes, torchrun-aware distributed set-up (with the CPU allocator's setting), seeding,
atomic writes, and the flag conventions every script follows.

Flags: `--key=value` and `--key value` both work, booleans take true/false/1/0, and a bare `--` (as in
`torchrun -m scripts.x -- --max_steps=10`) is ignored.
"""

import argparse
import contextlib
import ctypes
import json
import os
import random
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist


# -----------------------------------------------------------------------------
# errors

class InputError(ValueError):
    """
    A user's mistake or a broken input (a file, a flag, a checkpoint, a full disk): the message names the path, line
    or flag and says what to do. Library code raises it; scripts print the message and exit 1 without a traceback.
    """


def check_completion_budget(flag, value, model, whose="model"):
    """A completion budget (--max_new_tokens and the like) may take at most half of the model's context, so that
    the prompt keeps the other half (Engine callers cut prompts to the rest): an InputError naming the flag."""
    context = model.config.sequence_len
    if value > context // 2:
        raise InputError(f"--{flag}={value} leaves too little of the {whose}'s {context}-token context for the "
                         f"prompt; use at most {context // 2}")


class DivergedError(RuntimeError):
    """A NaN or inf loss, gradient or weight: the run stops before anything non-finite is saved."""


def run_script(main):
    """
    The entry point of every script: an InputError, a DivergedError or an OSError (a missing file, a full disk,
    no permission) prints one line naming what went wrong and exits 1; everything else is a bug and keeps its
    traceback. NANOCHAT_TRACEBACK=1 shows the traceback of the user errors too.
    """
    try:
        main()
    except (InputError, DivergedError, OSError) as e:
        if os.environ.get("NANOCHAT_TRACEBACK"):
            raise
        if isinstance(e, OSError) and e.filename is not None:
            message = f"{e.strerror or e}: {e.filename}"
        else:
            message = str(e)
        prefix = f"[rank {get_rank()}] " if get_world_size() > 1 else ""
        print(f"{prefix}{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)


# -----------------------------------------------------------------------------
# devices and dtypes

def autodetect_device(override=None):
    """cuda > mps > cpu, unless `override` names one."""
    if override:
        return override
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# glibc's mallopt parameters (<malloc.h>)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory():
    """
    Have glibc's malloc keep the memory a step frees for the next step instead of returning it to the kernel. By
    default it serves large blocks (a training step's activations and logits: 8-34 MiB at the reference size) by
    mmap, or hands the top of its heap back once they are freed, so each step took them anew through page faults
    (20,000-40,000 a reward-model step at the reference size, none after this, at the same peak RSS; README, "The
    allocator", has the timings). The memory stays with the process until it exits, which a training run holds at
    its peak anyway. Returns whether it applied: glibc only (elsewhere a no-op). dist_init calls it for CPU runs.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library to load by name, or one without mallopt
        return False
    # blocks up to 32 MiB from the heap (the most glibc's own sliding threshold reaches; setting the trim threshold
    # alone would freeze that at 128 KiB; larger ones stay mmapped, so a repeated one cannot fragment the heap),
    # and no trimming below 2 GiB of free heap (the most an int holds)
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def autocast_ctx(device):
    """bf16 autocast on CUDA; fp32 everywhere else (CPU bf16 matmuls are slower than fp32 here)."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -----------------------------------------------------------------------------
# distributed

def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_master():
    return get_rank() == 0


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)


def dist_init(device_override=None):
    """
    Set up the process group when launched by torchrun (RANK/WORLD_SIZE in the environment): nccl on CUDA, gloo
    on CPU. Returns (rank, world_size, device). A plain `python -m` run is world size 1 with no process group.
    A CPU run also keeps the memory its steps free (`keep_freed_memory`).
    """
    device = autodetect_device(device_override)
    if device == "cpu":
        keep_freed_memory()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not is_distributed():
        return 0, 1, device
    if not is_distributed():
        _die_with_parent()
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        # torch._dynamo (imported by the first optimizer step) keeps references to a process group that exists when
        # it is first imported (10 in torch 2.13): the group then outlives destroy_process_group, and its gloo
        # threads ran on into interpreter shutdown, where a rank now and then aborted ("terminate called without
        # an active exception"). Imported before the group exists, it holds none; tests/test_ddp.py checks.
        from torch import _dynamo  # noqa: F401
        dist.init_process_group(backend=backend)
    return get_rank(), get_world_size(), device


@contextlib.contextmanager
def rank0_first():
    """
    Rank 0 runs the block first (a download, a cache it writes) while the other ranks wait at a barrier; then they
    run it and find rank 0's files in place. A no-op wrapper on one process.
    """
    if is_distributed() and not is_master():
        dist.barrier()
    yield
    if is_distributed() and is_master():
        dist.barrier()


def _die_with_parent():
    """
    A torchrun worker dies with its agent: killing the agent (kill -9, a closed terminal) must not leave workers
    training on, where a resume started meanwhile would become a second writer. Linux only (prctl); elsewhere the
    agent's own teardown is all there is.
    """
    try:
        import ctypes
        import signal
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the agent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def dist_barrier():
    if is_distributed():
        dist.barrier()


def dist_cleanup():
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor):
    """In-place sum over ranks (a no-op on one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_grads(model):
    """
    Sum gradients over ranks, in one flat buffer (one collective instead of one per parameter). Losses are
    normalised by the global token count before backward, so a sum here gives the exact gradient of the global
    batch: the same numbers a single process computes on the whole batch.
    """
    if not is_distributed():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# -----------------------------------------------------------------------------
# seeding and RNG state (for --resume)

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def random_state():
    """
    The Python, NumPy, torch (and CUDA) generators' states as tensors and plain values, so a resume file loads
    with torch.load(weights_only=True); set_random_state restores them.
    """
    version, python, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python_version": version, "python": torch.tensor(python, dtype=torch.int64), "python_gauss": gauss,
             "numpy_kind": kind, "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
             "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state):
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state((state["numpy_kind"], state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# atomic writes: a reader never sees a half-written file, an interrupted write leaves the old file intact

@contextlib.contextmanager
def atomic_path(path):
    """Yields a temp path in the same directory; renames it onto `path` only if the block succeeds."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)  # mkstemp makes 0600 files; give the result the permissions open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path, data):
    """Write str or bytes to `path` atomically."""
    mode = "wb" if isinstance(data, bytes) else "w"
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


# -----------------------------------------------------------------------------
# flags

def str2bool(value):
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "y", "t"):
        return True
    if lowered in ("false", "0", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false/1/0), got {value!r}")


def _number(kind, test, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (kind is float and not np.isfinite(value)) or not test(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = what
    return parse


# argparse types that validate when flags are parsed: a bad value exits 2 with "argument --flag: expected ..."
positive_int = _number(int, lambda v: v > 0, "an integer > 0")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
nonnegative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
finite_float = _number(float, lambda v: True, "a finite number")
fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
open_fraction = _number(float, lambda v: 0 < v < 1, "a number in (0, 1)")


def parse_flags(parser, argv=None):
    """Parse with the project's conventions: a bare `--` separator (torchrun passes it through) is dropped."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if a != "--"]
    return parser.parse_args(argv)


def add_common_flags(parser):
    parser.add_argument("--device", type=str, default=None, help="cuda | mps | cpu (default: autodetect)")
    parser.add_argument("--seed", type=int, default=42, help="fixes init, data order and sampling")
    parser.add_argument("--run", type=str, default=os.environ.get("WANDB_RUN"),
                        help="wandb run name; no logging to wandb when unset (default: $WANDB_RUN)")
    return parser
