"""
GRPO (Shao et al., 2024): group-relative policy optimisation with a learned reward model.

One step:
1. take P prompts (density-weighted or uniform; the caller samples them);
2. sample G completions per prompt with the KV-cache engine;
3. score each completion with the reward model on exactly the sampled ids (prompt + completion, no re-encoding;
   each prompt's keys/values are computed once for its group, `group_rewards`);
4. advantage of completion j of prompt i: A_ij = (r_ij - mean_i) / (std_i + eps)  (`scale_rewards="group"`),
   or r_ij - mean_i (`"none"`): a completion is judged only against its siblings, so no value network is needed;
5. for `num_iterations` passes over the batch, minimise per completion token t
       -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta * KL_t,
   with rho_t = pi(y_t) / pi_old(y_t) and KL_t the k3 estimator of KL(pi || pi_ref):
       exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (non-negative, zero when pi = pi_ref).
   `loss_type="token"` averages over all completion tokens of the batch (long answers weigh more);
   `"sequence"` averages within each completion first, then over completions (the paper's form).

pi_old is the policy that sampled the batch. On the first pass it is the current policy itself, so the ratio is
taken against the detached log-probs of the same forward: exactly 1, and the clipped objective reduces to the
plain policy gradient. Later passes compare against those first-pass log-probs.
"""

import functools

import torch
import torch.nn.functional as F

from nanochat.common import all_reduce_sum, autocast_ctx
from nanochat.gpt import PrefixKV
from nanochat.training import optimizer_step


def group_advantages(rewards, scale_rewards="group", eps=1e-4):
    """rewards (P, G) -> advantages (P, G), normalised within each prompt's group."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        return centered / (rewards.std(dim=1, keepdim=True) + eps)
    if scale_rewards == "none":
        return centered
    raise ValueError(f"scale_rewards must be 'group' or 'none', got {scale_rewards!r}")


def grpo_token_losses(logprobs, old_logprobs, ref_logprobs, advantages, clip_eps=0.2, beta=0.0):
    """
    Per-token losses (B, T) and statistics. logprobs carry gradients; old/ref are constants; advantages (B,).
    Returns (loss, pg, kl, clipped) tensors of shape (B, T).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    a = advantages[:, None]
    unclipped, clipped_obj = ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a
    pg = -torch.min(unclipped, clipped_obj)
    delta = ref_logprobs - logprobs
    kl = torch.exp(delta) - delta - 1
    clipped = (clipped_obj < unclipped).float()  # the clip bound is the active term
    return pg + beta * kl, pg, kl, clipped


def reduce_tokens(values, mask, loss_type, denominator):
    """Sum of a per-token quantity under the loss type's normalisation, divided by the global `denominator`."""
    mask = mask.float()
    if loss_type == "token":
        return (values * mask).sum() / denominator
    if loss_type == "sequence":
        return ((values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / denominator
    raise ValueError(f"loss_type must be 'token' or 'sequence', got {loss_type!r}")


def pack_groups(prompts, completions, pad_id):
    """
    One batch of P prompts and their G completions each (completion i belongs to prompt i // G). Returns
    (prompt ids (P, Tp) left-padded, prompt_valid (P, Tp) marking real prompt tokens, completion ids (P*G, Tc)
    right-padded, completion mask (P*G, Tc)). Left-padding puts every prompt's last token in the last column: its
    hidden state predicts the first completion token of all G rows.
    """
    if len(completions) % len(prompts):
        raise ValueError(f"{len(completions)} completions do not divide into groups of {len(prompts)} prompts")
    tp = max(len(p) for p in prompts)
    tc = max(max(len(c) for c in completions), 1)
    prompt_ids = torch.full((len(prompts), tp), pad_id, dtype=torch.long)
    prompt_valid = torch.zeros(len(prompts), tp, dtype=torch.bool)
    for i, p in enumerate(prompts):
        prompt_ids[i, tp - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_valid[i, tp - len(p):] = True
    completion_ids = torch.full((len(completions), tc), pad_id, dtype=torch.long)
    mask = torch.zeros(len(completions), tc, dtype=torch.bool)
    for i, c in enumerate(completions):
        completion_ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, :len(c)] = True
    return prompt_ids, prompt_valid, completion_ids, mask


def token_logprobs(model, hidden, tokens, with_entropy=False):
    """Log-probabilities of `tokens` (B, T) from the hidden states that predict them, and optionally the entropy."""
    logp = F.log_softmax(model.logits_from_hidden(hidden).float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, :, None]).squeeze(-1)
    if not with_entropy:
        return chosen
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


@functools.cache
def compiled_token_logprobs():
    """
    token_logprobs through torch.compile (dynamic shapes): the vocabulary-sized elementwise work (soft-cap,
    log-softmax, entropy) is about a third of a small model's GRPO training time on a CPU, and compiling fuses it.
    Built on first request, so importing this module does not pay for torch's compiler.
    """
    return torch.compile(token_logprobs, dynamic=True)


def completion_logprobs(model, prompt_ids, prompt_valid, completion_ids, with_entropy=False, compile=False):
    """
    Log-probabilities (P*G, Tc) of the completion tokens under `model`, and with `with_entropy` the policy's
    entropy (nats, detached) at each of those positions. Each prompt runs through the model once and its G
    completions attend to its keys/values (PrefixKV): the same numbers as a full forward of every prompt +
    completion row, for about half the tokens when prompts are as long as completions. Padding after a
    completion's end gives values that the mask drops. `compile` fuses the vocabulary-sized tail.
    """
    P, G = prompt_ids.size(0), completion_ids.size(0) // prompt_ids.size(0)
    cache = PrefixKV(model.config, P, prompt_ids.size(1) + completion_ids.size(1), prompt_ids.device)
    with autocast_ctx(prompt_ids.device):
        hidden = model.hidden_states(prompt_ids, kv_cache=cache, valid=prompt_valid)[:, -1:]
        hidden = hidden.repeat_interleave(G, dim=0)
        if completion_ids.size(1) > 1:  # the last completion token predicts nothing we score
            cache.repeat_rows(G)
            hidden = torch.cat([hidden, model.hidden_states(completion_ids[:, :-1], kv_cache=cache)], dim=1)
    tail = compiled_token_logprobs() if compile else token_logprobs
    return tail(model, hidden, completion_ids, with_entropy)


def micro_batches(batch, rows_per_batch):
    """
    Yield (row slice, sub-batch) of a pack_groups batch, whole groups at a time: max(1, rows_per_batch // G)
    prompts and their completions per micro-batch.
    """
    prompt_ids, prompt_valid, completion_ids, mask = batch
    G = completion_ids.size(0) // prompt_ids.size(0)
    prompts_per_batch = max(1, rows_per_batch // G)
    for p0 in range(0, prompt_ids.size(0), prompts_per_batch):
        ps, rows = slice(p0, p0 + prompts_per_batch), slice(p0 * G, (p0 + prompts_per_batch) * G)
        yield rows, (prompt_ids[ps], prompt_valid[ps], completion_ids[rows], mask[rows])


@torch.no_grad()
def batch_logprobs(model, batch, rows_per_batch, compile=False):
    """completion_logprobs of a whole pack_groups batch, without gradients (the frozen reference's)."""
    return torch.cat([completion_logprobs(model, *sub[:3], compile=compile)
                      for _, sub in micro_batches(batch, rows_per_batch)])


@torch.no_grad()
def group_rewards(rm, batch, rows_per_batch):
    """
    Rewards (P*G,) fp32 of a pack_groups batch, each read at its completion's last sampled token: the same numbers
    as nanochat.rm.rewards_for_ids of every prompt + completion row, with each prompt run once per group.
    """
    lengths = batch[3].sum(1)
    if (lengths == 0).any():
        raise ValueError("every completion needs at least one token to be scored")
    out = []
    for rows, (prompt_ids, prompt_valid, completion_ids, _) in micro_batches(batch, rows_per_batch):
        P, G = prompt_ids.size(0), completion_ids.size(0) // prompt_ids.size(0)
        cache = PrefixKV(rm.config, P, prompt_ids.size(1) + completion_ids.size(1), prompt_ids.device)
        with autocast_ctx(prompt_ids.device):
            rm.backbone.hidden_states(prompt_ids, kv_cache=cache, valid=prompt_valid)
            cache.repeat_rows(G)
            hidden = rm.backbone.hidden_states(completion_ids, kv_cache=cache)
        last = hidden[torch.arange(hidden.size(0), device=hidden.device), lengths[rows] - 1]
        out.append(rm.head(last).squeeze(-1).float())
    return torch.cat(out)


def policy_update(model, optimizers, batch, ref_logprobs, advantages, args, num_sequences_global,
                  num_tokens_global):
    """
    The `num_iterations` optimisation passes over one batch (this rank's pack_groups), in micro-batches of whole
    groups of about `args.device_batch_size` rows. Returns statistics averaged over the passes, each a mean over
    all completion tokens of all ranks (loss, pg, kl, clipped share, entropy).
    """
    denominator = num_tokens_global if args.loss_type == "token" else num_sequences_global
    device = batch[0].device
    old_logprobs = None
    totals = {k: torch.zeros((), device=device) for k in ("loss", "pg", "kl", "clipped", "entropy")}
    for iteration in range(args.num_iterations):
        first_pass = []
        for sl, sub in micro_batches(batch, args.device_batch_size):
            logprobs, entropy = completion_logprobs(model, *sub[:3], with_entropy=True, compile=args.compile)
            old = logprobs.detach() if old_logprobs is None else old_logprobs[sl]
            first_pass.append(logprobs.detach())
            loss, pg, kl, clipped = grpo_token_losses(logprobs, old, ref_logprobs[sl], advantages[sl],
                                                      args.clip_eps, args.beta)
            mask = sub[3]
            reduce_tokens(loss, mask, args.loss_type, denominator).backward()
            with torch.no_grad():
                for name, values in (("loss", loss), ("pg", pg), ("kl", kl), ("clipped", clipped),
                                     ("entropy", entropy)):
                    totals[name] += reduce_tokens(values, mask, "token", num_tokens_global)
        if old_logprobs is None:
            old_logprobs = torch.cat(first_pass)
        grad_norm = optimizer_step(model, optimizers, args.grad_clip)
    return {name: all_reduce_sum(t).item() / args.num_iterations for name, t in totals.items()} | \
        {"grad_norm": grad_norm}
