"""
Checkpoints: one directory per stage (`outs/<stage>/`).

- `ckpt.pt`: model weights, model config, step, tokenizer location, kind ("gpt", or a method's own, e.g. "rm")
- `meta.json`: the same facts, readable, plus the stage's flags and metrics
- `optim.pt`: everything `--resume` needs (weights again, optimizer, RNG and data-loader state) in one file, so
  a kill between two writes can never pair weights of one step with optimizer state of another

Every file is written to a temp file and renamed, so a save interrupted at any point leaves the previous
checkpoint loadable. Loading takes a directory (`outs/sft/`) or a file (`outs/sft/ckpt.pt`) and fails with a
message naming the path when the checkpoint is missing, truncated or does not fit the model.
"""

import os
import time

import torch

from nanochat.common import atomic_path, atomic_write_json, get_rng_state, set_rng_state
from nanochat.gpt import GPT, GPTConfig

CKPT_NAME, META_NAME, OPTIM_NAME = "ckpt.pt", "meta.json", "optim.pt"


class CheckpointError(RuntimeError):
    pass


def resolve_path(path):
    """A stage directory or a ckpt.pt path -> the ckpt.pt path."""
    path = os.fspath(path)
    return os.path.join(path, CKPT_NAME) if os.path.isdir(path) or not path.endswith(".pt") else path


def _atomic_torch_save(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _state_dict(model):
    # torch.compile wraps modules as `_orig_mod`; checkpoints always hold the plain names
    return {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}


def save_checkpoint(out_dir, model, step, tokenizer_dir, kind="gpt", flags=None, metrics=None, optimizers=None,
                    extra_state=None, extra=None):
    """
    Save a model (and, with `optimizers`, everything `--resume` needs). `extra` is stored in ckpt.pt for the
    method that owns `kind` (e.g. a reward head's settings); `extra_state` (e.g. a data loader's position) goes
    with the optimizer state.
    """
    os.makedirs(out_dir, exist_ok=True)
    config = model.config.to_dict()
    if optimizers is not None:
        _atomic_torch_save({"step": step, "model": _state_dict(model),
                            "optimizers": [o.state_dict() for o in optimizers],
                            "rng": get_rng_state(), "extra_state": extra_state}, os.path.join(out_dir, OPTIM_NAME))
    payload = {"kind": kind, "step": step, "config": config, "tokenizer_dir": tokenizer_dir,
               "model": _state_dict(model), "flags": flags or {}, "extra": extra or {}}
    _atomic_torch_save(payload, os.path.join(out_dir, CKPT_NAME))
    meta = {"kind": kind, "step": step, "config": config, "tokenizer_dir": tokenizer_dir,
            "num_params": sum(p.numel() for p in model.parameters()), "flags": flags or {},
            "metrics": metrics or {}, "extra": extra or {}, "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_json(os.path.join(out_dir, META_NAME), meta)


def load_payload(path, device="cpu"):
    """Read ckpt.pt (given a directory or the file) with clear errors."""
    file = resolve_path(path)
    if not os.path.exists(file):
        raise CheckpointError(f"checkpoint not found: {file} (run the stage that writes it, or pass the right "
                              f"--*_path / --ckpt_path)")
    try:
        payload = torch.load(file, map_location=device, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {file} is truncated or corrupt ({type(e).__name__}: {e}); "
                              f"re-run the stage that writes it") from e
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise CheckpointError(f"{file} is not a nanochat-kat checkpoint (no model/config entries)")
    payload["path"] = file
    return payload


def load_weights(model, payload):
    """Load a payload's weights into `model`, naming the checkpoint and the mismatching keys on failure."""
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {payload['path']} does not match the model: {e}") from e


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


def load_tokenizer(payload):
    """The tokenizer a checkpoint was trained with."""
    from nanochat.tokenizer import Tokenizer
    directory = payload.get("tokenizer_dir")
    if not directory or not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint {payload['path']} names tokenizer directory {directory!r}, which does "
                              f"not exist (run scripts.tok_train, or run from the repository root)")
    return Tokenizer.load(directory)


def load_resume_state(out_dir, model, optimizers, device="cpu"):
    """
    Restore weights, optimizer and RNG state from `out_dir/optim.pt` for `--resume`. Returns (step,
    extra_state), or (0, None) when there is nothing to resume from.
    """
    optim_file = os.path.join(out_dir, OPTIM_NAME)
    if not os.path.exists(optim_file):
        if os.path.exists(os.path.join(out_dir, CKPT_NAME)):
            raise CheckpointError(f"--resume: {out_dir} has a {CKPT_NAME} but no {OPTIM_NAME} (it was saved "
                                  f"without optimizer state); rerun without --resume to start over")
        return 0, None
    try:
        state = torch.load(optim_file, map_location=device, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"--resume: {optim_file} is truncated or corrupt ({type(e).__name__}: {e})") from e
    load_weights(model, {"model": state["model"], "path": optim_file})
    if len(state["optimizers"]) != len(optimizers):
        raise CheckpointError(f"--resume: {optim_file} holds {len(state['optimizers'])} optimizers, "
                              f"this run has {len(optimizers)} (was --matrix_optimizer changed?)")
    for opt, opt_state in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(opt_state)
    set_rng_state(state["rng"])
    return state["step"], state["extra_state"]
