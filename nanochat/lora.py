"""
LoRA (Hu et al. 2021) in plain PyTorch: low-rank adapters on the GPT's block matrices, the rest frozen.

A wrapped layer computes y = x W^T (+ bias) + (dropout(x) A^T B^T) * alpha / r, with A (r, in) random and B (out, r)
zero, so a fresh adapter changes nothing and training starts exactly at the base model.

- `apply_lora(model, r, ...)` wraps the targeted Linear layers of every block in place, freezes every other
  parameter (the embedding and the LM head too) and returns the adapter parameters, the ones to optimise.
  r = 0 means full fine-tuning: the model is left as it is and all its parameters come back, so a stage can always
  write `params = apply_lora(model, args.lora_r)`.
- `adapters_disabled(model)`: inside it the wrapped layers compute the base model, which is DPO's reference ("the
  base with adapters disabled") without a second copy of the weights. It refuses a model without adapters (r = 0):
  there it would silently make the reference equal the policy; such a run needs its own reference copy.
- `merge_lora(model)` folds each adapter into its base weight and puts a plain nn.Linear back: the model is an
  ordinary GPT again (every parameter trainable), whose state_dict saves and loads like any other checkpoint.
- `lora_state_dict` / `load_lora_state_dict`: the adapter weights alone, for small resume states.

A wrapped layer keeps its base Linear's parameters under their own names (`weight`, `bias`), adding `lora_A` and
`lora_B` beside them: the full state_dict of an adapted model is the GPT's keys plus the adapters', so a base
checkpoint's weights keep their keys and a resume state of the whole adapted model loads with the same names.
"""

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import InputError

# every matrix of a block: attention's c_q, c_k, c_v, c_proj and the MLP's c_fc, c_proj ("c_proj" names both)
TARGETS = ("c_q", "c_k", "c_v", "c_proj", "c_fc")


class LoRALinear(nn.Module):
    """Wraps an nn.Linear: shares and freezes its weight and bias, adds a trainable update of rank r."""

    def __init__(self, linear, r, alpha=None, dropout=0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r} (r = 0 means no adapter: don't wrap)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight.requires_grad_(False)
        self.bias = linear.bias.requires_grad_(False) if linear.bias is not None else None
        self.r = r
        self.alpha = r if alpha is None else alpha
        self.scale = self.alpha / r
        w = self.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        # A as nn.Linear initialises its weight (as PEFT does); B = 0 makes the update start at exactly zero
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # set by adapters_disabled: compute the base layer alone
        self.train(linear.training)  # a module starts in training mode: wrapping an eval model must not turn dropout on

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def merged_linear(self):
        """A plain nn.Linear computing this layer (base + adapter) with its parameters trainable again."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            # in fp32, so a bf16 base weight takes the update with one rounding
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            linear.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}"


def _lora_layers(model):
    """(name, LoRALinear) of every wrapped layer, names as in a checkpoint (no torch.compile prefix)."""
    return [(name.removeprefix("_orig_mod."), m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model, r, alpha=None, dropout=0.0, targets=TARGETS):
    """
    Wrap the Linear layers of every block whose attribute name is in `targets` with LoRA adapters of rank `r` and
    scale alpha / r (alpha defaults to r: scale 1), in place; freeze everything else. Returns the trainable
    parameters: the adapters, or with r = 0 (full fine-tune) every parameter of the untouched model.
    """
    if r == 0:
        return list(model.parameters())
    if r < 0:
        raise ValueError(f"LoRA rank must be >= 0 (0 = full fine-tune), got {r}")
    if _lora_layers(model):
        raise ValueError("model already has LoRA adapters; merge_lora it before adding new ones")
    available = {name.rsplit(".", 1)[-1] for name, m in model.blocks.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(targets) - available)
    if unknown:  # a typo would otherwise silently train fewer matrices than asked for
        raise ValueError(f"unknown LoRA targets {unknown}; the blocks' Linear layers are {sorted(available)}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrap = [(parent, name, child) for parent in model.blocks.modules() for name, child in parent.named_children()
            if name in targets and isinstance(child, nn.Linear)]
    for parent, name, child in wrap:  # collected first: replacing children while iterating over them is unsafe
        setattr(parent, name, LoRALinear(child, r, alpha, dropout))
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def adapters_disabled(model):
    """Every LoRALinear of `model` computes its base layer alone inside this context (the frozen reference)."""
    layers = [m for _, m in _lora_layers(model)]
    if not layers:
        raise ValueError("adapters_disabled: the model has no LoRA adapters (r = 0?), so disabling them would make "
                         "the reference the policy itself; use a separate reference model")
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:  # restore what each was, so nested contexts and exceptions leave the adapters as they found them
        for m, was in zip(layers, before):
            m.disabled = was


def merge_lora(model):
    """
    Fold every adapter into its base weight and put plain nn.Linear layers back, in place; returns the model. The
    result is an ordinary GPT (its state_dict has exactly the GPT's keys), every parameter trainable again. A model
    without adapters (r = 0) is returned as it is.
    """
    wrapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, LoRALinear)]
    if not wrapped:
        return model
    for parent, name, child in wrapped:
        setattr(parent, name, child.merged_linear())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state_dict(model):
    """The adapter weights alone: {"blocks.0.attn.c_q.lora_A": tensor, ...} (detached, on their device)."""
    return {f"{name}.{key}": getattr(layer, key).detach() for name, layer in _lora_layers(model)
            for key in ("lora_A", "lora_B")}


def load_lora_state_dict(model, state):
    """Load adapter weights saved by lora_state_dict into a model wrapped the same way (same targets and rank)."""
    params = {f"{name}.{key}": getattr(layer, key) for name, layer in _lora_layers(model)
              for key in ("lora_A", "lora_B")}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise InputError(f"LoRA state does not match the model's adapters (were they applied with the same targets?): "
                         f"missing {missing}, unexpected {unexpected}")
    for key, p in params.items():
        if state[key].shape != p.shape:
            raise InputError(f"LoRA state {key} has shape {tuple(state[key].shape)}, the model's {tuple(p.shape)} "
                             f"(a different rank r?)")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(state[key])
