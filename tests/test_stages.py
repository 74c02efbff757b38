"""
The pretraining stage as a user runs it, at tiny size: resume after SIGKILL, and torchrun on two CPU processes.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from scripts import base_train, tok_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth=2", "--seq_len=64", "--batch_rows=4", "--device_batch_size=2", "--num_docs=300",
        "--eval_every=4", "--eval_tokens=256", "--log_every=1", "--warmup_steps=2"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    tok_train.main([f"--out_dir={out}", "--vocab_size=300", "--max_chars=200000"])
    return str(out)


def run_script(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def final_loss(out_dir):
    return json.load(open(os.path.join(out_dir, "meta.json")))["metrics"]


def test_resume_after_sigkill_ends_like_an_uninterrupted_run(tmp_path, tokenizer_dir):
    flags = TINY + [f"--tokenizer_dir={tokenizer_dir}", "--max_steps=30", "--save_every=5"]
    base_train.main(flags + [f"--out_dir={tmp_path / 'straight'}"])
    reference = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)

    killed = tmp_path / "killed"
    proc = run_script(["-m", "scripts.base_train", *flags, f"--out_dir={killed}"])
    deadline = time.time() + 120
    while not (killed / "meta.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    interrupted_at = torch.load(killed / "optim.pt", weights_only=True)["step"]
    assert 0 < interrupted_at < 30

    base_train.main(flags + [f"--out_dir={killed}", "--resume=true"])
    resumed = torch.load(killed / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 30
    assert final_loss(killed)["final_train_loss"] == final_loss(tmp_path / "straight")["final_train_loss"]
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    # the validation history carries over the interruption
    assert final_loss(killed)["val_bpb_history"] == final_loss(tmp_path / "straight")["val_bpb_history"]


def test_torchrun_two_processes_match_one_process(tmp_path, tokenizer_dir):
    flags = TINY + [f"--tokenizer_dir={tokenizer_dir}", "--max_steps=4", "--save_every=0"]
    one = run_script(["-m", "scripts.base_train", *flags, f"--out_dir={tmp_path / 'one'}"])
    assert one.wait(timeout=300) == 0, one.stdout.read()[-3000:]
    two = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                      "scripts.base_train", "--", *flags, f"--out_dir={tmp_path / 'two'}"])
    assert two.wait(timeout=300) == 0, two.stdout.read()[-3000:]
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-4), (name, (a[name] - b[name]).abs().max())
    la, lb = final_loss(tmp_path / "one"), final_loss(tmp_path / "two")
    assert la["final_train_loss"] == pytest.approx(lb["final_train_loss"], abs=1e-5)
    assert la["val_bpb_final"] == pytest.approx(lb["val_bpb_final"], abs=1e-5)
