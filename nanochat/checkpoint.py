"""
Checkpoints: one directory per stage (`outs/<stage>/`).

- `ckpt.pt`: the finished model: weights, model config, step, kind ("gpt", or a method's own, e.g. "rm"), flags,
  lineage (the checkpoints it descends from), the synthetic world its data came from ({"seed", "size"}, or None
  for real data; later stages read it here, never from their own --seed) and the fingerprint of its tokenizer.
  Written once, at the end of a run: a directory without it holds no finished model, and a loader says so instead
  of loading a half-trained one.
- `tokenizer/`: a copy of the tokenizer the model was trained with, so a checkpoint carries its own ids (a tokenizer
  retrained later in outs/tokenizer cannot silently change them) and loads from any working directory.
- `optim.pt`: the state of an unfinished run, everything `--resume` needs (weights, optimizer, RNG, data-loader
  position, history) in one file, so a kill between two writes can never pair weights of one step with optimizer
  state of another. It carries the run's identity (stage, model config, flags, tokenizer); the final save removes
  it. A directory with an `optim.pt` is an interrupted run, even when an older `ckpt.pt` sits beside it.
- `meta.json`: the same facts, readable, plus metrics; `"complete": false` while a run is in progress.

Every file is written to a temp file and renamed, so a save interrupted at any point leaves the previous files
intact. Files are read with `torch.load(weights_only=True)`: tensors and plain values only, so opening a checkpoint
from elsewhere can never run code. Errors name the path and say what to do.
"""

import hashlib
import json
import os
import pickle
import shutil
import time

import torch

from nanochat.common import (DivergedError, InputError, atomic_path, atomic_write_json, random_state,
                             set_random_state)
from nanochat.gpt import GPT, GPTConfig

CKPT_NAME, META_NAME, OPTIM_NAME, TOKENIZER_NAME = "ckpt.pt", "meta.json", "optim.pt", "tokenizer"
FORMAT = 2  # the payload layout; a checkpoint of another format is refused with a clear message


class CheckpointError(InputError):
    pass


def resolve_path(path):
    """A stage directory or a ckpt.pt path -> the ckpt.pt path."""
    path = os.fspath(path)
    return os.path.join(path, CKPT_NAME) if os.path.isdir(path) or not path.endswith(".pt") else path


def stage_status(out_dir):
    """'complete' (a finished ckpt.pt, no run in progress), 'partial' (an interrupted run: optim.pt) or 'empty'."""
    if os.path.exists(os.path.join(out_dir, OPTIM_NAME)):
        return "partial"
    return "complete" if os.path.exists(os.path.join(out_dir, CKPT_NAME)) else "empty"


# -----------------------------------------------------------------------------
# writing

class _KeepWriteError:
    """
    The file torch.save writes to, keeping the OSError a write raised: torch's C++ writer turns it into a
    RuntimeError ("unexpected pos 2176 vs 2070") that has lost the errno (e.g. "No space left on device").
    """

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        return self.f.flush()


def _atomic_torch_save(obj, path):
    with atomic_path(path) as tmp:
        writer = None
        try:
            # a Python file object's failed write raises an OSError with its errno (e.g. "No space left on
            # device"), which torch's writer would reduce to "unexpected pos"; _KeepWriteError keeps it
            with open(tmp, "wb") as f:
                writer = _KeepWriteError(f)
                torch.save(obj, writer)
        except (OSError, RuntimeError) as e:
            error = writer.error if writer is not None and writer.error is not None else e
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20
            raise CheckpointError(f"could not write {path}: {reason} ({free:,.0f} MiB free on its disk)") from error


def _state_dict(model):
    # torch.compile wraps modules as `_orig_mod`; checkpoints always hold the plain names
    return {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}


def check_finite(model, step):
    """Refuse to save a model with a NaN or inf weight (naming the step and the first bad tensor)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise DivergedError(f"step {step}: weight {name.removeprefix('_orig_mod.')} is not finite; nothing saved")


def tokenizer_fingerprint(directory):
    """sha256 (first 16 hex digits) of a tokenizer directory's two files: equal iff the token ids are equal."""
    from nanochat.tokenizer import META_FILE, MODEL_FILE
    digest = hashlib.sha256()
    for name in (MODEL_FILE, META_FILE):
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                digest.update(f.read())
        except OSError as e:
            raise CheckpointError(f"cannot read tokenizer file {path}: {e.strerror or e}") from e
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _copy_tokenizer(tokenizer_dir, out_dir):
    """Copy the tokenizer into out_dir/tokenizer (atomically, file by file); returns its fingerprint."""
    from nanochat.tokenizer import META_FILE, MODEL_FILE
    target = os.path.join(out_dir, TOKENIZER_NAME)
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    if os.path.abspath(tokenizer_dir) != os.path.abspath(target):
        for name in (MODEL_FILE, META_FILE):
            with atomic_path(os.path.join(target, name)) as tmp:
                shutil.copyfile(os.path.join(tokenizer_dir, name), tmp)
    return fingerprint


def lineage_of(payload):
    """The chain of checkpoints a model descends from, oldest first, ending with `payload` itself."""
    return payload.get("lineage", []) + [{"path": payload["path"], "kind": payload["kind"], "step": payload["step"]}]


def save_checkpoint(out_dir, model, step, tokenizer_dir, kind="gpt", flags=None, metrics=None, extra=None,
                    parents=(), world=None):
    """
    Save a finished model: ckpt.pt (complete), a copy of its tokenizer and meta.json. `extra` is stored for the
    method that owns `kind` (e.g. a reward head's settings); `parents` are the payloads it was trained from, whose
    lineage it extends; `world` the synthetic world of its data. Does not touch optim.pt: the stage skeleton
    removes it once this has succeeded.
    """
    check_finite(model, step)
    os.makedirs(out_dir, exist_ok=True)
    fingerprint = _copy_tokenizer(tokenizer_dir, out_dir)
    lineage = lineage_of(parents[0]) if parents else []
    lineage += [{"path": p["path"], "kind": p["kind"], "step": p["step"]} for p in parents[1:]]
    config = model.config.to_dict()
    payload = {"format": FORMAT, "complete": True, "kind": kind, "step": step, "config": config,
               "model": _state_dict(model), "flags": flags or {}, "extra": extra or {},
               "tokenizer_fingerprint": fingerprint, "lineage": lineage, "world": world}
    _atomic_torch_save(payload, os.path.join(out_dir, CKPT_NAME))
    write_meta(out_dir, {"complete": True, "kind": kind, "step": step, "config": config,
                         "num_params": sum(p.numel() for p in model.parameters()), "flags": flags or {},
                         "metrics": metrics or {}, "extra": extra or {}, "tokenizer_fingerprint": fingerprint,
                         "lineage": lineage, "world": world})


def write_meta(out_dir, meta):
    atomic_write_json(os.path.join(out_dir, META_NAME), meta | {"saved_at": time.strftime("%Y-%m-%d %H:%M:%S")})


def save_resume_state(out_dir, model, step, optimizers, identity, extra_state=None):
    """optim.pt: everything `--resume` needs, with the run's `identity` (stage, config, flags, tokenizer)."""
    check_finite(model, step)
    rng = random_state()
    _atomic_torch_save({"format": FORMAT, "identity": identity, "step": step, "model": _state_dict(model),
                        "optimizers": [o.state_dict() for o in optimizers], "rng": rng, "extra_state": extra_state},
                       os.path.join(out_dir, OPTIM_NAME))


# -----------------------------------------------------------------------------
# reading

def _load_plain(file, device, what):
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{what} {file} holds objects other than tensors and plain values (not a nanochat-kat "
                              f"file, or one crafted to run code); refusing to open it") from e
    except Exception as e:
        raise CheckpointError(f"{what} {file} is truncated or corrupt ({type(e).__name__}: {e}); re-run the stage "
                              f"that writes it") from e


def load_payload(path, device="cpu"):
    """Read a finished ckpt.pt (given a directory or the file) with clear errors."""
    file = resolve_path(path)
    directory = os.path.dirname(file)
    if os.path.exists(os.path.join(directory, OPTIM_NAME)):
        step = _meta_step(directory)
        raise CheckpointError(f"{directory} holds an unfinished run (stopped at step {step}); finish it by running "
                              f"its stage again with --resume=True (or remove {OPTIM_NAME} to use the earlier "
                              f"{CKPT_NAME}, if any)")
    if not os.path.exists(file):
        raise CheckpointError(f"checkpoint not found: {file} (run the stage that writes it, or pass the right "
                              f"--*_path / --ckpt_path)")
    payload = _load_plain(file, device, "checkpoint")
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise CheckpointError(f"{file} is not a nanochat-kat checkpoint (no model/config entries)")
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{file} was written by another version of nanochat-kat (format "
                              f"{payload.get('format', 1)}, this one reads {FORMAT}); re-run the stage that writes it")
    if payload.get("complete") is not True:
        raise CheckpointError(f"{file} is not a finished checkpoint; re-run its stage with --resume=True")
    payload["path"] = file  # as given: reports and lineage show the path the user typed
    # resolved now, so the files beside the checkpoint (its tokenizer) are still found after a chdir
    payload["dir"] = os.path.dirname(os.path.abspath(file))
    return payload


def _meta_step(directory):
    try:
        with open(os.path.join(directory, META_NAME), encoding="utf-8") as f:
            return json.load(f).get("step", "?")
    except (OSError, ValueError):
        return "?"


def load_weights(model, payload):
    """Load a payload's weights into `model`, naming the checkpoint and the mismatching keys on failure."""
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as e:  # torch's message spans several lines; scripts print an error as one line
        raise CheckpointError(f"checkpoint {payload['path']} does not match the model: "
                              f"{' '.join(str(e).split())}") from e


def load_model(path, device="cpu", kind="gpt"):
    """Build a GPT from a checkpoint's config and load its weights. Returns (model in eval mode, payload)."""
    payload = load_payload(path, device)
    if payload.get("kind", "gpt") != kind:
        raise CheckpointError(f"checkpoint {payload['path']} holds a '{payload.get('kind')}' model, "
                              f"expected '{kind}'")
    try:
        config = GPTConfig(**payload["config"])
    except TypeError as e:
        raise CheckpointError(f"checkpoint {payload['path']} has an unknown model config: {e}") from e
    model = GPT(config).to(device)
    load_weights(model, payload)
    model.eval()
    return model, payload


def tokenizer_dir(payload):
    """The directory of the tokenizer copy that travels with a checkpoint (absolute: independent of the cwd)."""
    return os.path.join(payload["dir"], TOKENIZER_NAME)


def load_tokenizer(payload):
    """The tokenizer a checkpoint was trained with (its own copy, checked against the stored fingerprint)."""
    from nanochat.tokenizer import Tokenizer
    directory = tokenizer_dir(payload)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint {payload['path']} has no tokenizer beside it ({directory} is missing); "
                              f"re-run the stage that wrote it")
    found = tokenizer_fingerprint(directory)
    if found != payload["tokenizer_fingerprint"]:
        raise CheckpointError(f"the tokenizer in {directory} (fingerprint {found}) is not the one "
                              f"{payload['path']} was trained with ({payload['tokenizer_fingerprint']})")
    try:
        return Tokenizer.load(directory)
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e)) from e


def check_same_tokenizer(a, b):
    """Two checkpoints used together (a policy and its reward model, say) must share their token ids."""
    if a["tokenizer_fingerprint"] != b["tokenizer_fingerprint"]:
        raise CheckpointError(f"{a['path']} (tokenizer {a['tokenizer_fingerprint']}) and {b['path']} (tokenizer "
                              f"{b['tokenizer_fingerprint']}) were trained with different tokenizers; train both from "
                              f"the same tokenizer")


def identity_differences(saved, current):
    """Readable differences between two run identities (nested dicts), e.g. ['flags.seq_len: 256 -> 512']."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in identity_differences(a, b)]
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def load_resume_state(out_dir, model, optimizers, identity, device="cpu"):
    """
    Restore weights, optimizer and RNG state from `out_dir/optim.pt` for `--resume`. Returns (step, extra_state),
    or (0, None) when there is nothing to resume from. Refuses a state of another stage, model config, tokenizer or
    flags (`identity`), naming the differences.
    """
    optim_file = os.path.join(out_dir, OPTIM_NAME)
    if not os.path.exists(optim_file):
        return 0, None
    state = _load_plain(optim_file, device, "--resume: the run state")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"--resume: {optim_file} was written by another version of nanochat-kat; rerun "
                              f"without --resume to start over")
    differences = identity_differences(state["identity"], identity)
    if differences:
        raise CheckpointError(f"--resume: {optim_file} belongs to another run: " + "; ".join(differences) +
                              ". Resume with the same flags, or rerun without --resume to start over")
    load_weights(model, {"model": state["model"], "path": optim_file})
    for opt, opt_state in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(opt_state)
    set_random_state(state["rng"])
    return state["step"], state["extra_state"]
