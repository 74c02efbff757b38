"""
Shared plumbing: devices and dtypes, torchrun-aware distributed set-up, seeding, atomic writes, and the flag
conventions every script follows.

Flags: `--key=value` and `--key value` both work, booleans take true/false/1/0, and a bare `--` (as in
`torchrun -m scripts.x -- --max_steps=10`) is ignored.
"""

import argparse
import contextlib
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
    """
    device = autodetect_device(device_override)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not is_distributed():
        return 0, 1, device
    if not is_distributed():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
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


def get_rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


class WandbLogger:
    """wandb only when a run is named; offline when there is no network; never fatal."""

    def __init__(self, run_name, project, config):
        self.run = None
        if not run_name or not is_master():
            return
        try:
            import wandb
            self.run = wandb.init(project=project, name=run_name, config=config)
        except Exception as e:  # a missing login or network must not stop training
            print0(f"wandb disabled ({type(e).__name__}: {e}); set WANDB_MODE=offline to log locally")

    def log(self, metrics, step):
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self):
        if self.run is not None:
            self.run.finish()


def format_eta(seconds):
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
