"""
The stage skeleton's guarantees (nanochat/stage.py, nanochat/checkpoint.py), one test each, as a user meets them:
the CLI and its exit code where that is the unit (`python -m scripts.X` in a subprocess), `main([...])` or a
library call where that is enough. Every test names the plausible bug it would catch.

Tiny everything: depth-2 models, 64-128 token contexts, a 300-token tokenizer, a few steps.
"""

import errno
import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, Interrupted, kill_after_checkpoint, make_tiny_model

from nanochat import checkpoint
from nanochat.checkpoint import CheckpointError, save_checkpoint
from nanochat.common import DivergedError, InputError
from nanochat.rm import RewardModel
from nanochat.training import optimizer_step
from scripts import base_train, kat_train_dpo, kat_train_grpo, kat_train_rm, mid_train

ENV = {k: v for k, v in os.environ.items() if k not in ("NANOCHAT_TRACEBACK", "WANDB_RUN")}
ENV.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
# base_train at its smallest (a step takes ~0.1 s on one core)
BASE = ["--depth=2", "--seq_len=64", "--batch_rows=4", "--device_batch_size=2", "--num_docs=300",
        "--eval_every=0", "--eval_tokens=256", "--log_every=1", "--warmup_steps=0", "--device=cpu"]


# -----------------------------------------------------------------------------
# fixtures and helpers

@pytest.fixture(scope="module")
def files(tmp_path_factory, tok, world):
    """A tokenizer, a tiny random 'SFT' GPT (128-token context), a tiny reward model and pairs files."""
    root = tmp_path_factory.mktemp("stage")
    tok.save(root / "tok")
    save_checkpoint(root / "sft", make_tiny_model(vocab_size=300, sequence_len=128), 0, str(root / "tok"),
                    world={"seed": 0, "size": 1})
    rm = RewardModel(make_tiny_model(seed=1, vocab_size=300, sequence_len=128))
    with torch.no_grad():
        rm.head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    save_checkpoint(root / "rm", rm, 0, str(root / "tok"), kind="rm")
    pairs = world.preference_pairs(40, seed=0)
    for name, rows in (("pairs_all.jsonl", pairs[:30]), ("pairs_test.jsonl", pairs[30:])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def base_flags(files, out_dir, *extra):
    return BASE + [f"--tokenizer_dir={files / 'tok'}", f"--out_dir={out_dir}", *extra]


def pair_flags(files):
    """RM / DPO inputs."""
    return [f"--sft_ckpt_path={files / 'sft'}", f"--pairs_path={files / 'pairs_all.jsonl'}",
            f"--test_pairs_path={files / 'pairs_test.jsonl'}", f"--density_path={files / 'none.jsonl'}",
            "--density_aware=False", "--max_steps=2", "--batch_size_pairs=4", "--device_batch_size=2",
            "--max_len=40", "--warmup_steps=0", "--val_share=0.2", "--eval_every=0", "--save_every=0",
            "--device=cpu"]


def grpo_flags(files, out_dir, *extra):
    return [f"--sft_ckpt_path={files / 'sft'}", f"--rm_ckpt_path={files / 'rm'}",
            f"--pairs_path={files / 'pairs_all.jsonl'}", f"--test_pairs_path={files / 'pairs_test.jsonl'}",
            f"--density_path={files / 'none.jsonl'}", "--density_aware=False", "--prompts_per_step=2",
            "--num_generations=3",
            "--max_new_tokens=6", "--max_steps=2", "--save_every=0", "--eval_every=0", "--eval_prompts=4",
            "--eval_samples=2", "--device_batch_size=3", "--learning_rate=1e-3", "--warmup_steps=0",
            "--device=cpu", f"--out_dir={out_dir}", *extra]


def start(args, log):
    """`python <args>` from the repository root, stdout and stderr into files (a long run never fills a pipe)."""
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen([sys.executable, *args], env=ENV, cwd=ROOT, stdout=out, stderr=err,
                                start_new_session=True)


def run_all(commands, tmp_path, timeout=180):
    """Run several CLIs at once (start-up dominates: two cores import torch twice as fast as one).
    Returns [(returncode, stdout, stderr)]."""
    procs = [start(args, tmp_path / f"run{i}") for i, args in enumerate(commands)]
    out = []
    for i, p in enumerate(procs):
        try:
            p.wait(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
        out.append((p.returncode, (tmp_path / f"run{i}.out").read_text(), (tmp_path / f"run{i}.err").read_text()))
    return out


def wait_for(condition, proc, timeout=120, what="the condition"):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def kill(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def one_line_error(rc, err):
    lines = err.strip().splitlines()
    assert rc == 1 and "Traceback" not in err and len(lines) == 1, (rc, err[-3000:])
    return lines[0]


def alive(pid):
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


# -----------------------------------------------------------------------------
# 1. a half-finished stage never looks finished

def test_a_killed_stage_is_refused_downstream_until_resumed(files, tmp_path):
    # catches: periodic saves writing ckpt.pt (a half-trained model a later stage would load), a loader that takes
    # an interrupted directory for a finished one, a final save that leaves optim.pt behind
    base = tmp_path / "base"
    proc = start(["-m", "scripts.base_train", *base_flags(files, base, "--max_steps=12", "--save_every=2")],
                 tmp_path / "base")
    try:
        wait_for((base / "meta.json").exists, proc, what="the first periodic save")
    finally:
        kill(proc)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert (base / "optim.pt").exists() and not (base / "ckpt.pt").exists()
    assert json.loads((base / "meta.json").read_text())["complete"] is False

    mid = ["-m", "scripts.mid_train", f"--ckpt_path={base}", "--max_len=64", "--batch_rows=2",
           "--device_batch_size=2", "--num_conversations=20", "--val_conversations=4", "--max_steps=2",
           "--eval_every=0", "--save_every=0", "--device=cpu"]
    [(rc, _, err)] = run_all([mid + [f"--out_dir={tmp_path / 'mid_refused'}"]], tmp_path)
    line = one_line_error(rc, err)
    assert str(base) in line and "--resume" in line

    base_train.main(base_flags(files, base, "--max_steps=12", "--save_every=2", "--resume=True"))
    assert not (base / "optim.pt").exists() and (base / "ckpt.pt").exists()
    assert json.loads((base / "meta.json").read_text())["complete"] is True
    mid_train.main(mid[2:] + [f"--out_dir={tmp_path / 'mid'}"])
    assert (tmp_path / "mid" / "ckpt.pt").exists()


# -----------------------------------------------------------------------------
# 2. no non-finite model is ever saved

@pytest.mark.parametrize("script, flag", [
    # catches: a float flag type that lets nan through (nan > 0 is False, but so is nan <= 0: a `not v <= 0` test)
    ("base_train", "--embedding_lr=nan"),
    ("kat_train_dpo", "--learning_rate=nan"),
    ("kat_train_grpo", "--learning_rate=inf"),
    # catches: G = 1, whose advantage (r - mean) / std is 0 / 0 = nan
    ("kat_train_grpo", "--num_generations=1"),
])
def test_non_finite_or_degenerate_flags_exit_2_naming_the_flag(script, flag, tmp_path, capsys):
    check_flag_refused(script, flag, tmp_path, capsys)


def check_flag_refused(script, flag, tmp_path, capsys):
    # inputs that do not exist, so that a flag let through fails differently (and fast) instead of training
    missing = tmp_path / "missing"
    safe = {"base_train": [f"--tokenizer_dir={missing}", f"--out_dir={tmp_path / 'out'}"],
            "kat_train_rm": [f"--sft_ckpt_path={missing}", f"--out_path={tmp_path / 'out'}"],
            "kat_train_dpo": [f"--sft_ckpt_path={missing}", f"--out_dir={tmp_path / 'out'}"],
            "kat_train_grpo": [f"--sft_ckpt_path={missing}", f"--out_dir={tmp_path / 'out'}"]}[script]
    main = {"base_train": base_train, "kat_train_rm": kat_train_rm, "kat_train_dpo": kat_train_dpo,
            "kat_train_grpo": kat_train_grpo}[script].main
    with pytest.raises(SystemExit) as e:
        main(safe + [flag])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert f"argument {flag.split('=')[0]}:" in err, err
    assert not (tmp_path / "out").exists()  # refused before anything was created


def test_a_diverging_run_stops_naming_step_and_term_and_saves_nothing_non_finite(files, tmp_path):
    # catches: Stage.log not checking its stats (the NaN-gradient steps are skipped, the weights stay finite but
    # useless, and the run would "finish" with a ckpt.pt), a save of the resume state after the bad step
    out = tmp_path / "diverged"
    with pytest.raises(DivergedError) as e:  # scripts print it and exit 1 (run_script)
        base_train.main(base_flags(files, out, "--max_steps=6", "--save_every=1", "--matrix_lr=1e30",
                                   "--embedding_lr=1e30", "--unembedding_lr=1e30"))
    message = str(e.value)
    step = int(message.split(":")[0].removeprefix("step "))
    assert 1 <= step < 6 and any(f"{term} = " in message for term in ("loss", "grad_norm")), message
    assert not (out / "ckpt.pt").exists()
    if step > 1:
        state = torch.load(out / "optim.pt", weights_only=True)
        assert state["step"] == step - 1 and f"last saved state: step {step - 1}" in message
        assert all(torch.isfinite(t).all() for t in state["model"].values())
    else:
        assert not (out / "optim.pt").exists()


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_optimizer_step_with_a_nan_gradient_leaves_the_weights_unchanged(grad_clip):
    # catches: stepping on a NaN gradient (clipping scales every gradient by nan, then AdamW writes nan weights)
    model = make_tiny_model()
    optimizers = model.setup_optimizers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    norm = optimizer_step(model, optimizers, grad_clip)
    assert math.isnan(norm)  # for Stage.log to stop the run on
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


# -----------------------------------------------------------------------------
# 3. one writer per output directory

def test_a_second_run_into_a_busy_directory_exits_naming_the_holder(files, tmp_path):
    # catches: no lock (two runs interleaving their saves), a lock file checked by existence (a killed run would
    # leave it stale and block the directory forever), a lock released before the run ends
    out = tmp_path / "busy"
    first = start(["-m", "scripts.base_train", *base_flags(files, out, "--max_steps=100000", "--save_every=0",
                                                           "--log_every=100")], tmp_path / "first")
    try:
        wait_for(lambda: (out / ".lock").exists() and (out / ".lock").read_text().strip(), first,
                 what="the lock")
        assert (out / ".lock").read_text().strip() == str(first.pid)
        t0 = time.time()
        [(rc, _, err)] = run_all([["-m", "scripts.base_train", *base_flags(files, out, "--max_steps=2")]],
                                 tmp_path, timeout=60)
        assert time.time() - t0 < 20
        line = one_line_error(rc, err)
        assert f"pid {first.pid}" in line and str(out) in line
        assert first.poll() is None
    finally:
        kill(first)
    base_train.main(base_flags(files, out, "--max_steps=1"))  # the kernel released the dead run's flock
    assert (out / "ckpt.pt").exists()


def test_killing_the_torchrun_agent_stops_its_workers(files, tmp_path):
    # catches: workers without PR_SET_PDEATHSIG, which train on (and keep writing the directory) after the agent
    # was killed, so that a --resume started meanwhile becomes a second writer
    out = tmp_path / "ddp"
    agent = start(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scripts.base_train",
                   "--", *base_flags(files, out, "--max_steps=100000", "--save_every=2", "--log_every=100")],
                  tmp_path / "agent")
    workers = []
    try:
        wait_for((out / "meta.json").exists, agent, timeout=180, what="training under torchrun")
        workers = descendants(agent.pid)
        assert len(workers) >= 2, workers
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        deadline = time.time() + 10
        while any(alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in workers), [p for p in workers if alive(p)]
    finally:
        kill(agent)
        for p in workers:
            if alive(p):
                os.kill(p, signal.SIGKILL)


# -----------------------------------------------------------------------------
# 4. flags are validated when parsed

@pytest.mark.parametrize("script, flag", [
    ("kat_train_rm", "--max_len=-1"),         # catches: a plain int type (a negative cut length slices from the end)
    ("kat_train_dpo", "--max_len=-1"),        # catches: the same in the DPO stage, which shares the pair flags
    ("base_train", "--max_steps=0"),          # catches: 0 steps, which "finishes" with an untrained ckpt.pt
    ("kat_train_grpo", "--eval_samples=0"),   # catches: an evaluation over zero answers (0 / 0 rewards)
    ("kat_train_dpo", "--beta=0"),            # catches: beta = 0, where DPO's loss has no gradient
    ("kat_train_grpo", "--temperature=0"),    # catches: greedy groups, G identical completions and no signal
])
def test_bad_flags_exit_2_naming_the_flag_before_any_work(script, flag, tmp_path, capsys):
    check_flag_refused(script, flag, tmp_path, capsys)


def test_grpo_completion_budget_above_half_the_context_is_refused(files, tmp_path):
    # catches: no budget check, so that long prompts are cut to nothing (or the engine fails mid-run)
    with pytest.raises(InputError, match="--max_new_tokens=65") as e:
        kat_train_grpo.main(grpo_flags(files, tmp_path / "grpo", "--max_new_tokens=65"))
    assert "64" in str(e.value)
    assert not (tmp_path / "grpo" / "ckpt.pt").exists()


# -----------------------------------------------------------------------------
# 5. start-up checks before any work

def unwritable_dirs(tmp_path):
    """Output directories that cannot be written. chmod does not stop root (tests often run as root), so the one
    that always works is a path under a regular file."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    dirs = [a_file / "out"]
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").write_text("")
    except OSError:  # chmod works here (not root): the directory itself and a directory to be made inside it
        dirs += [ro, ro / "out"]
    return dirs


def test_an_unwritable_output_directory_fails_at_once_naming_it(files, tmp_path):
    # catches: the directory checked only at the first save, after the whole run's compute
    dirs = unwritable_dirs(tmp_path)
    t0 = time.time()
    results = run_all([["-m", "scripts.base_train", *base_flags(files, d, "--max_steps=100000")] for d in dirs],
                      tmp_path, timeout=60)
    assert time.time() - t0 < 30
    for d, (rc, out, err) in zip(dirs, results):
        line = one_line_error(rc, err)
        assert str(d) in line and "--out_dir" in line
        assert "model:" not in out  # before the model was even built


@pytest.fixture(scope="module")
def finished_base(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "base"
    base_train.main(base_flags(files, out, "--max_steps=2", "--save_every=1"))
    return out


def test_resume_of_a_finished_run_says_so_and_touches_nothing(files, finished_base, capsys):
    # catches: --resume of a finished run training again from scratch (or from the last optim.pt) and overwriting
    # the finished model and its report
    names = ["ckpt.pt", "meta.json", "report.md"]
    before = {n: ((finished_base / n).read_bytes(), os.stat(finished_base / n).st_mtime_ns) for n in names}
    capsys.readouterr()
    assert base_train.main(base_flags(files, finished_base, "--max_steps=2", "--save_every=1",
                                      "--resume=True")) is None  # exit 0
    log = capsys.readouterr().out
    assert "already holds a finished run" in log and "model:" not in log
    for n in names:
        assert ((finished_base / n).read_bytes(), os.stat(finished_base / n).st_mtime_ns) == before[n], n
    assert not (finished_base / "optim.pt").exists()


def test_resume_of_another_run_is_refused_naming_the_difference(files, tmp_path, monkeypatch):
    # catches: an identity check that misses the model config or the stage, so that a resume with another
    # --seq_len, or another stage's state, loads (or half-loads) weights and optimizer state that do not belong
    out = tmp_path / "base"
    kill_after_checkpoint(monkeypatch, step=1)
    with pytest.raises(Interrupted):
        base_train.main(base_flags(files, out, "--max_steps=3", "--save_every=1"))
    monkeypatch.undo()
    state = (out / "optim.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"seq_len: 64 -> 32") as e:
        base_train.main(base_flags(files, out, "--max_steps=3", "--save_every=1", "--resume=True", "--seq_len=32"))
    assert str(out / "optim.pt") in str(e.value)
    with pytest.raises(CheckpointError, match=r"stage: 'base_train' -> 'kat_train_rm'"):
        kat_train_rm.main(pair_flags(files) + [f"--out_path={out}", "--resume=True"])
    assert (out / "optim.pt").read_bytes() == state  # a refused resume leaves the state for the right command
    assert not (out / "ckpt.pt").exists()


# -----------------------------------------------------------------------------
# 6. fewer eval prompts than ranks

@pytest.fixture(scope="module")
def grpo_runs(files, tmp_path_factory):
    """GRPO with one held-out prompt, on 1 process and under torchrun on 2 (rank 1 evaluates nothing)."""
    root = tmp_path_factory.mktemp("grpo_ranks")
    flags = ["--eval_prompts=1", "--eval_temperature=0"]
    results = run_all([["-m", "scripts.kat_train_grpo", *grpo_flags(files, root / "one", *flags)],
                       ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "scripts.kat_train_grpo", "--", *grpo_flags(files, root / "two", *flags)]], root, timeout=150)
    for rc, out, err in results:
        assert rc == 0, (out[-2000:], err[-3000:])
    return root


def metrics(out_dir):
    return json.loads((out_dir / "meta.json").read_text())["metrics"]


def test_grpo_with_fewer_eval_prompts_than_ranks_evaluates_like_one_process(grpo_runs):
    # catches: a rank with no eval prompt crashing (Engine.generate([]) raises) or skipping the metrics'
    # all-reduce (a hang, up to the fixture's timeout), and eval samples that differ from one process's
    one, two = metrics(grpo_runs / "one"), metrics(grpo_runs / "two")
    for key in ("reward_start", "gold_score_start", "gold_correct_start", "artifact_rate_start"):
        assert one[key] == pytest.approx(two[key], abs=1e-5), key


def test_grpo_on_two_processes_ends_with_the_weights_of_one_process(grpo_runs):
    # catches: gradients averaged instead of summed over ranks, a prompt batch not sliced by rank, per-rank
    # sampling that differs from one process's
    a = torch.load(grpo_runs / "one" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(grpo_runs / "two" / "ckpt.pt", weights_only=True)["model"]
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), (name, (a[name] - b[name]).abs().max())
    one, two = metrics(grpo_runs / "one"), metrics(grpo_runs / "two")
    for key in ("reward_final", "gold_score_final", "gold_correct_final", "artifact_rate_final"):
        assert one[key] == pytest.approx(two[key], abs=1e-5), key


# -----------------------------------------------------------------------------
# 7. plain-language errors

def test_missing_wrong_kind_and_truncated_checkpoints_exit_1_with_one_line_naming_the_path(files, tmp_path):
    # catches: a raw FileNotFoundError / KeyError / unpickling traceback, an RM loaded as a policy (its head
    # silently dropped by a non-strict load), a GPT loaded as a reward model, torch's multi-line state_dict error
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = (files / "sft" / "ckpt.pt").read_bytes()
    (truncated / "ckpt.pt").write_bytes(data[:len(data) // 2])
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    payload = torch.load(files / "sft" / "ckpt.pt", weights_only=True)
    payload["config"]["n_layer"] = 3  # weights that do not fit the config
    torch.save(payload, mismatched / "ckpt.pt")
    dpo = ["-m", "scripts.kat_train_dpo", *pair_flags(files)]
    cases = [  # (command, the path its error must name, a word of the reason)
        (dpo + [f"--sft_ckpt_path={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / 'o1'}"],
         tmp_path / "nowhere" / "ckpt.pt", "not found"),
        (dpo + [f"--sft_ckpt_path={files / 'rm'}", f"--out_dir={tmp_path / 'o2'}"], files / "rm" / "ckpt.pt", "'rm'"),
        (["-m", "scripts.kat_train_grpo", *grpo_flags(files, tmp_path / "o3", f"--rm_ckpt_path={files / 'sft'}")],
         files / "sft" / "ckpt.pt", "not a reward model"),
        (dpo + [f"--sft_ckpt_path={truncated}", f"--out_dir={tmp_path / 'o4'}"], truncated / "ckpt.pt",
         "truncated or corrupt"),
        (dpo + [f"--sft_ckpt_path={mismatched}", f"--out_dir={tmp_path / 'o5'}"], mismatched / "ckpt.pt",
         "does not match the model"),
    ]
    results = run_all([c for c, _, _ in cases], tmp_path)
    for (_, path, reason), (rc, _, err) in zip(cases, results):
        line = one_line_error(rc, err)
        assert str(path) in line and reason in line, line


def test_a_full_disk_names_the_path_and_keeps_the_previous_checkpoint(files, tmp_path, monkeypatch):
    # catches: torch's C++ writer swallowing the OSError ("unexpected pos 2176 vs 2070" instead of "No space left
    # on device"), a save that truncates ckpt.pt in place, a temp file left behind
    out = tmp_path / "full"
    save_checkpoint(out, make_tiny_model(vocab_size=300), 1, str(files / "tok"))
    good = (out / "ckpt.pt").read_bytes()

    class FullDisk(io.FileIO):
        """A file whose writes fail with ENOSPC after its first 4 KiB."""
        written = 0

        def write(self, data):
            if self.written + len(data) > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return super().write(data)

    real_open = open

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        return FullDisk(path, "w") if mode == "wb" else real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", open_on_a_full_disk, raising=False)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(out, make_tiny_model(seed=5, vocab_size=300), 2, str(files / "tok"))
    assert "No space left on device" in str(e.value) and str(out / "ckpt.pt") in str(e.value), str(e.value)
    monkeypatch.undo()
    assert (out / "ckpt.pt").read_bytes() == good
    assert checkpoint.load_payload(out)["step"] == 1
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_wandb_goes_offline_at_once_when_its_server_is_unreachable(monkeypatch):
    # catches: wandb.init blocking on its network retries (about 100 s per stage offline), or a failure being fatal
    import wandb

    from nanochat import stage as stage_module
    seen = {}
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(stage_module, "host_unreachable", lambda url: f"cannot reach {url}")
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(mode=os.environ.get("WANDB_MODE"), **kw) or None)
    stage_module.WandbLogger("myrun", "rm", {"lr": 1.0})
    assert seen["mode"] == "offline" and seen["settings"].init_timeout <= 30 and seen["group"] == "myrun"

    def broken(**kw):
        raise RuntimeError("no login")
    monkeypatch.setattr(wandb, "init", broken)
    logger = stage_module.WandbLogger("myrun", "rm", {})
    logger.log({"train/loss": 1.0}, 1)  # a logger that could not start is a no-op, not a crash
    logger.finish()


def test_the_whole_report_opens_with_one_summary_row_per_stage(tmp_path):
    # catches: a summary appended again on every write (two tables), a rerun stage listed twice or with its old
    # numbers, and a summary that is not at the top
    from nanochat.report import write_report

    write_report(tmp_path / "base", {"val_bpb_final": 0.5, "steps": 10})
    write_report(tmp_path / "rm", {"test/accuracy": 0.9, "train_pairs": 3})
    write_report(tmp_path / "base", {"val_bpb_final": 0.25, "steps": 10})  # a rerun replaces its section
    whole = (tmp_path / "report.md").read_text()
    assert whole.count("## Summary") == 1 and whole.index("## Summary") < whole.index("## base")
    assert "| [base](#base) | val_bpb_final 0.25 |" in whole and "val_bpb_final 0.5 " not in whole
    assert "| [rm](#rm) | test/accuracy 0.9 |" in whole and whole.count("| [base](#base)") == 1
    assert whole.index("[base](#base)") < whole.index("[rm](#rm)")
