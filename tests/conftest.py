"""
Shared fixtures: tiny models with every weight random (zero-initialised projections would hide bugs), and the
seed-0 synthetic world with a tokenizer trained on it (the preference-stage tests share both).
"""

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanochat.gpt import GPT, config_from_depth
from nanochat.synthetic import make_world
from nanochat.tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LN2 = math.log(2)


class Interrupted(Exception):
    """Stands for a kill: raised by kill_after_checkpoint."""


def kill_after_checkpoint(monkeypatch, step):
    """Make the stage skeleton raise Interrupted right after it has written the resume state of `step`."""
    from nanochat import checkpoint
    real_save = checkpoint.save_resume_state

    def save_then_die(out_dir, model, saved_step, *args, **kwargs):
        real_save(out_dir, model, saved_step, *args, **kwargs)
        if saved_step == step:
            raise Interrupted
    monkeypatch.setattr(checkpoint, "save_resume_state", save_then_die)


def subprocess_env():
    """One thread per process, this repo importable, the hub offline and no proxy: tests reach nothing but
    127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def torchrun(module, flags, nproc=2, timeout=300):
    """Run `torchrun --standalone --nproc_per_node=nproc -m module -- *flags` from the repo root, one thread per
    process; fails with its stderr unless it exits 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module,
           "--", *flags]
    result = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]


def sigkill_when(module, flags, ready, log_path, timeout=120):
    """
    Run `python -m module *flags` from the repo root on one thread and SIGKILL it (a real kill: no handler, no
    cleanup) as soon as the path `ready` exists; returns its exit code, -SIGKILL when the kill landed. Fails with
    the run's log when it ends or times out before.
    """
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", module, *flags], env=subprocess_env(), cwd=ROOT,
                                stdout=log, stderr=log, start_new_session=True)
        try:
            deadline = time.time() + timeout
            while not os.path.exists(ready):
                assert proc.poll() is None and time.time() < deadline, open(log_path).read()
                time.sleep(0.002)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
    return proc.returncode


# a chat whose history holds assistant turns: what a reply-only mask must not score
MULTI_TURN = [{"role": "system", "content": "Answer briefly."},
              {"role": "user", "content": "Where does Zavu live?"},
              {"role": "assistant", "content": "Zavu lives in Korlin, by the river."},
              {"role": "user", "content": "And what colour does Zavu like?"},
              {"role": "assistant", "content": "Zavu likes red, and also a little green."},
              {"role": "user", "content": "How old is Zavu?"}]


def render_pairs(tok, rows, max_len=None):
    """Whole renders of the chosen replies of `rows`, then of their rejected ones: each reply in full context, the
    reference that pair batches (a prompt run once, both replies after it) must reproduce."""
    from nanochat.preference import render_reply
    return [render_reply(tok, row["messages"], row[side], max_len) for side in ("chosen", "rejected") for row in rows]


def make_tiny_model(seed=0, vocab_size=97, sequence_len=64, n_kv_head=2, randomize=True):
    torch.manual_seed(seed)
    config = config_from_depth(2, vocab_size, sequence_len, n_embd=64, n_head=4, n_kv_head=n_kv_head,
                               verbose=False)
    model = GPT(config)
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture
def tiny_model():
    return make_tiny_model()


# session scope: no test changes the world or the tokenizer, and training the tokenizer once saves time.
# A test file that needs another world or tokenizer defines its own fixture of that name, which pytest prefers.
@pytest.fixture(scope="session")
def world():
    return make_world(seed=0)


@pytest.fixture(scope="session")
def tok(world):
    return train_tokenizer(world.pretrain_documents(300, seed=0), 300)
