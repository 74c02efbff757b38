"""
The pieces every training loop shares, kept as plain functions so each script's loop stays readable:
the optimizer tail every step function ends in, one optimizer step over micro-batches with exact data-parallel
gradients, validation bits-per-byte and loss.

Data parallelism is an explicit all-reduce: each rank sums its micro-batch losses, divides by the *global* number
of supervised tokens, and the summed gradients are then exactly the single-process gradient of the global batch
(plain DDP averages per-rank means, which differs whenever ranks hold different numbers of real tokens).
"""

import math

import torch

from nanochat.batching import IGNORE_INDEX
from nanochat.common import all_reduce_grads, all_reduce_sum, autocast_ctx


def optimizer_step(model, optimizers, grad_clip):
    """
    The tail of every step function: sum gradients over ranks, clip their global norm (`grad_clip` 0: no clip),
    step, zero. A non-finite gradient norm skips the update, so the weights stay finite and the caller's
    Stage.log stops the run naming the step. Returns the norm before clipping.
    """
    all_reduce_grads(model)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = grad_norm.item()
    if math.isfinite(grad_norm):
        for opt in optimizers:
            opt.step()
    model.zero_grad(set_to_none=True)
    return grad_norm


def train_step(model, optimizers, micro_batches, grad_clip=1.0):
    """One optimizer step over this rank's `micro_batches` [(inputs, targets)]. Returns (loss, grad_norm)."""
    device = micro_batches[0][0].device
    local_tokens = sum((y != IGNORE_INDEX).sum() for _, y in micro_batches).float().to(device)
    global_tokens = all_reduce_sum(local_tokens.clone()).clamp(min=1)
    loss_sum = torch.zeros((), device=device)
    for inputs, targets in micro_batches:
        with autocast_ctx(device):
            loss = model(inputs, targets, loss_reduction="sum")
        (loss / global_tokens).backward()
        loss_sum += loss.detach()
    grad_norm = optimizer_step(model, optimizers, grad_clip)
    return (all_reduce_sum(loss_sum) / global_tokens).item(), grad_norm


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes):
    """
    Validation bits per byte: summed cross-entropy (nats) over tokens with a byte length, divided by ln 2 times
    their bytes. Unlike loss per token it does not depend on the tokenizer's vocabulary size.
    """
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device)
    nats = torch.zeros((), device=device)
    num_bytes = torch.zeros((), device=device)
    for inputs, targets in batches:
        with autocast_ctx(device):
            loss = model(inputs, targets, loss_reduction="none").float()
        # IGNORE_INDEX is no token: clamped to a valid index for the lookup, then zeroed
        nbytes = token_bytes[targets.clamp(min=0)] * (targets != IGNORE_INDEX)
        nats += (loss * (nbytes > 0)).sum()
        num_bytes += nbytes.sum()
    all_reduce_sum(nats)
    all_reduce_sum(num_bytes)
    return (nats / (math.log(2) * num_bytes.clamp(min=1))).item()


@torch.no_grad()
def evaluate_loss(model, batches):
    """Mean cross-entropy per supervised token over all ranks' batches."""
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for inputs, targets in batches:
        with autocast_ctx(device):
            total += model(inputs, targets, loss_reduction="sum").float()
        count += (targets != IGNORE_INDEX).sum()
    all_reduce_sum(total)
    all_reduce_sum(count)
    return (total / count.clamp(min=1)).item()
