"""
The stage skeleton: what every training stage shares, written once. The loop itself stays in each script:

    stage = Stage(args.out_dir, args, script="kat_train_rm", kind="rm")  # lock, writable, leftovers cleaned
    if stage.finished:                                                   # --resume of a finished run: nothing to do
        return dist_cleanup()
    ... load inputs, build the model and its optimizers ...
    start_step, extra_state = stage.resume(model, optimizers, num_steps, tokenizer_dir)
    for step in range(start_step, num_steps):
        if step % args.eval_every == 0:
            stage.log_eval(step, {"accuracy": ...})
        stats = rm_train_step(...)                      # ends in training.optimizer_step
        stage.log(step + 1, stats, f"loss {stats['loss']:.4f} | ...")   # refuses NaN, prints with an ETA
        stage.maybe_save(step + 1, model, optimizers, extra_state)      # every --save_every steps
    stage.finish(model, tokenizer_dir, metrics, timings)                # ckpt.pt, charts, report

What it guarantees:
- One writer per output directory: rank 0 holds an flock on `<out_dir>/.lock` (released by the kernel when the
  process dies, so a killed run never leaves a stale lock); a second run exits at once naming the holder's pid.
- The directory is writable before any work starts, and temp files a killed save left are removed.
- A half-finished stage never looks finished: periodic saves write only optim.pt (the resume state) and a
  meta.json marked incomplete; ckpt.pt appears at the end (checkpoint.py), and then optim.pt is removed.
- `--resume` continues an interrupted run bit for bit, refuses a state of another stage, model config, tokenizer or
  flags (naming the difference), and on a finished run says so and exits 0 without touching anything.
- A NaN or inf loss term, gradient norm or weight stops the run naming the step and the term; nothing non-finite
  is ever saved.
- A history of every logged metric, a progress line with an ETA, wandb when a run is named, and at the end PNG
  charts of the history in the stage's report.
"""

import fcntl
import glob
import math
import os
import time

from nanochat import checkpoint
from nanochat.charts import plot_history
from nanochat.common import DivergedError, InputError, dist_barrier, is_master, print0
from nanochat.data import host_unreachable
from nanochat.report import write_report

# flags that may change when a run is resumed: they do not change what the run computes
RESUME_FREE_FLAGS = {"resume", "run", "device", "compile", "log_every", "save_every", "eval_every", "out_dir",
                     "out_path"}
_HELD_LOCKS = {}  # out_dir -> fd: a process that restarts a stage in-process (tests do) keeps its own lock


def format_eta(seconds):
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _lock(out_dir):
    """Hold an exclusive flock on out_dir/.lock for the life of this process; InputError naming the holder."""
    key = os.path.realpath(out_dir)
    if key in _HELD_LOCKS:
        return
    path = os.path.join(out_dir, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise InputError(f"cannot write to the output directory {out_dir}: {e.strerror}; pass a writable "
                         f"--out_dir") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise InputError(f"{out_dir} is in use by another run (pid {holder}); wait for it to finish or choose "
                         f"another output directory") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD_LOCKS[key] = fd


def _check_writable(out_dir):
    probe = os.path.join(out_dir, f".write_test.{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
        os.remove(probe)
    except OSError as e:
        raise InputError(f"cannot write to the output directory {out_dir}: {e.strerror}; pass a writable "
                         f"--out_dir") from e


class WandbLogger:
    """wandb only when a run is named; offline when its server is unreachable; never fatal, never slow to start."""

    def __init__(self, run_name, group, config):
        self.run = None
        if not run_name or not is_master():
            return
        try:
            import wandb
            unreachable = "WANDB_MODE" not in os.environ and host_unreachable("https://api.wandb.ai")
            if unreachable:
                print0(f"wandb: {unreachable}; logging offline (wandb sync uploads it later)")
                os.environ["WANDB_MODE"] = "offline"
            self.run = wandb.init(project="nanochat-kat", group=run_name, name=f"{run_name}-{group}", config=config,
                                  settings=wandb.Settings(init_timeout=30))
        except Exception as e:  # a missing login or network must not stop training
            print0(f"wandb disabled ({type(e).__name__}: {e}); set WANDB_MODE=offline to log locally")

    def log(self, metrics, step):
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self):
        if self.run is not None:
            self.run.finish()


class Stage:
    """One training run of a stage: its output directory, resume state, history, progress lines and report."""

    def __init__(self, out_dir, args, script, kind="gpt"):
        self.out_dir, self.args, self.script, self.kind = os.fspath(out_dir), args, script, kind
        self.flags = vars(args)
        self.log_every = getattr(args, "log_every", 1)
        self.save_every = getattr(args, "save_every", 0)
        self.history = []  # one dict per logged step: {"step": steps done, "train/loss": ..., "val/...": ...}
        self.num_steps, self.start_step, self.t0 = None, 0, time.time()
        self.last_saved = 0
        status = checkpoint.stage_status(self.out_dir)  # every rank reads it before rank 0 changes anything
        self.finished = bool(args.resume) and status == "complete"
        if self.finished:
            print0(f"{self.out_dir} already holds a finished run (ckpt.pt, no optim.pt): nothing to resume")
        if is_master() and not self.finished:  # a finished run's directory is left exactly as it is
            try:
                os.makedirs(self.out_dir, exist_ok=True)
            except OSError as e:
                raise InputError(f"cannot create the output directory {self.out_dir}: {e.strerror}; pass a "
                                 f"writable --out_dir") from e
            _lock(self.out_dir)
            _check_writable(self.out_dir)
            for leftover in glob.glob(os.path.join(self.out_dir, ".*.tmp")):  # a killed atomic save's temp file
                os.remove(leftover)
            if not args.resume and status == "partial":
                print0(f"{self.out_dir}: discarding the state of an interrupted run (start fresh; --resume=True "
                       f"would have continued it)")
                os.remove(os.path.join(self.out_dir, checkpoint.OPTIM_NAME))
            elif args.resume and status == "empty":
                print0(f"{self.out_dir}: no interrupted run to resume; starting fresh")
        dist_barrier()
        self.wandb = None

    # -------------------------------------------------------------------------
    # start

    def identity(self, model, tokenizer_dir):
        """What a resumed run must share with the interrupted one."""
        return {"stage": self.script, "kind": self.kind, "config": model.config.to_dict(),
                "tokenizer": checkpoint.tokenizer_fingerprint(tokenizer_dir),
                "flags": {k: v for k, v in self.flags.items() if k not in RESUME_FREE_FLAGS}}

    def resume(self, model, optimizers, num_steps, tokenizer_dir, device="cpu"):
        """Restore an interrupted run with --resume. Returns (start step, the script's extra state or None)."""
        self.num_steps = num_steps
        self._identity = self.identity(model, tokenizer_dir)
        extra_state = None
        if self.args.resume:
            self.start_step, state = checkpoint.load_resume_state(self.out_dir, model, optimizers, self._identity,
                                                                  device)
            if state is not None:
                self.history, extra_state = state["history"], state["script"]
                self.last_saved = self.start_step
                print0(f"resumed {self.out_dir} at step {self.start_step}/{num_steps}")
        self.wandb = WandbLogger(self.args.run, os.path.basename(os.path.abspath(self.out_dir)), self.flags)
        self.t0 = time.time()
        return self.start_step, extra_state

    # -------------------------------------------------------------------------
    # the loop

    def eta(self, done):
        per_step = (time.time() - self.t0) / max(done - self.start_step, 1)
        return format_eta(per_step * (self.num_steps - done))

    def elapsed(self):
        return time.time() - self.t0

    def log(self, done, stats, text):
        """
        After a training step (`done` steps so far): refuse non-finite numbers, record them as train/<key>, and
        every --log_every steps (and the last) print `step done/N | text | ETA`.
        """
        bad = {k: v for k, v in stats.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            terms = ", ".join(f"{k} = {v}" for k, v in bad.items())
            raise DivergedError(f"step {done}: {terms}; the run stopped (last saved state: step {self.last_saved}, "
                                f"nothing non-finite was saved). Lower the learning rate or check the inputs")
        record = {f"train/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}
        self.history.append({"step": done, **record})
        if done % self.log_every == 0 or done == self.num_steps or done == self.start_step + 1:
            print0(f"step {done:5d}/{self.num_steps} | {text} | ETA {self.eta(done)}")
            self.wandb.log(record, done)

    def log_eval(self, done, metrics, prefix="val"):
        """An evaluation after `done` steps: recorded as <prefix>/<key>, printed, sent to wandb."""
        record = {f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.history.append({"step": done, **record})
        print0(f"step {done:5d}/{self.num_steps} | " + " | ".join(f"{k} {v:.4f}" for k, v in record.items()))
        self.wandb.log(record, done)

    def series(self, key):
        """[(step, value)] of one recorded metric, e.g. series('val/bpb')."""
        return [(h["step"], h[key]) for h in self.history if key in h]

    def maybe_save(self, done, model, optimizers, extra_state=None):
        """Every --save_every steps (not at the end: finish saves the model): the resume state, on rank 0."""
        if not (self.save_every > 0 and done % self.save_every == 0 and done < self.num_steps):
            return
        if is_master():
            checkpoint.save_resume_state(self.out_dir, model, done, optimizers, self._identity,
                                         {"history": self.history, "script": extra_state})
            checkpoint.write_meta(self.out_dir, {"complete": False, "kind": self.kind, "step": done,
                                                 "num_steps": self.num_steps, "flags": self.flags})
        self.last_saved = done

    # -------------------------------------------------------------------------
    # the end

    def finish(self, model, tokenizer_dir, metrics, timings=None, notes=None, extra=None, parents=(), world=None,
               device=None):
        """
        The final save (ckpt.pt, complete; `parents` and `world` as in checkpoint.save_checkpoint), removal of the
        resume state, charts and the report; on rank 0.
        """
        if is_master():
            checkpoint.save_checkpoint(self.out_dir, model, self.num_steps, tokenizer_dir, kind=self.kind,
                                       flags=self.flags, metrics=metrics, extra=extra, parents=parents, world=world)
            optim_file = os.path.join(self.out_dir, checkpoint.OPTIM_NAME)
            if os.path.exists(optim_file):
                os.remove(optim_file)
            name = os.path.basename(os.path.abspath(self.out_dir))
            chart = plot_history(self.history, os.path.join(self.out_dir, "history.png"), f"{name}: history")
            write_report(self.out_dir, metrics, timings or {"total_seconds": self.elapsed()}, self.flags, device,
                         notes=notes, charts=[os.path.basename(chart)] if chart else [])
        self.wandb.finish()
