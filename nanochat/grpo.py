"""
GRPO (Shao et al., 2024): group-relative policy optimisation with a learned reward model.

One step:
1. take P prompts (density-weighted or uniform; the caller samples them);
2. sample G completions per prompt with the KV-cache engine;
3. score each completion with the reward model on exactly the sampled ids (prompt + completion, no re-encoding);
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

import torch
import torch.nn.functional as F

from nanochat.common import all_reduce_grads, all_reduce_sum, autocast_ctx


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


def pack_sequences(prompts, completions, pad_id):
    """
    Right-pad prompt + completion rows. Returns (ids (B, L), completion positions (B, Tc) indexing the logits
    that predict each completion token, completion tokens (B, Tc), completion mask (B, Tc)).
    """
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    tc = max(max(len(c) for c in completions), 1)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    positions = torch.zeros(len(prompts), tc, dtype=torch.long)
    tokens = torch.zeros(len(prompts), tc, dtype=torch.long)
    mask = torch.zeros(len(prompts), tc, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        positions[i, :len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
        tokens[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, :len(c)] = True
    return ids, positions, tokens, mask


def completion_logprobs(model, ids, positions, tokens, with_entropy=False):
    """
    Log-probabilities (B, Tc) of the completion tokens under `model` (one full forward, right padding), and with
    `with_entropy` the policy's entropy (nats, detached) at each of those positions.
    """
    with autocast_ctx(ids.device):
        hidden = model.hidden_states(ids)
    hidden = hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.size(-1)))
    logp = F.log_softmax(model.logits_from_hidden(hidden).float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, :, None]).squeeze(-1)
    if not with_entropy:
        return chosen
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


def policy_update(model, optimizers, batch, ref_logprobs, advantages, args, num_sequences_global,
                  num_tokens_global):
    """
    The `num_iterations` optimisation passes over one batch, in micro-batches of `args.device_batch_size` rows.
    `batch` = (ids, positions, tokens, mask) for this rank. Returns statistics averaged over the passes, each a
    mean over all completion tokens of all ranks (loss, pg, kl, clipped share, entropy).
    """
    ids, positions, tokens, mask = batch
    denominator = num_tokens_global if args.loss_type == "token" else num_sequences_global
    rows = ids.size(0)
    old_logprobs = None
    totals = {k: torch.zeros((), device=ids.device) for k in ("loss", "pg", "kl", "clipped", "entropy")}
    for iteration in range(args.num_iterations):
        first_pass = []
        for start in range(0, rows, args.device_batch_size):
            sl = slice(start, start + args.device_batch_size)
            logprobs, entropy = completion_logprobs(model, ids[sl], positions[sl], tokens[sl], with_entropy=True)
            old = logprobs.detach() if old_logprobs is None else old_logprobs[sl]
            first_pass.append(logprobs.detach())
            loss, pg, kl, clipped = grpo_token_losses(logprobs, old, ref_logprobs[sl], advantages[sl],
                                                      args.clip_eps, args.beta)
            reduce_tokens(loss, mask[sl], args.loss_type, denominator).backward()
            with torch.no_grad():
                for name, values in (("loss", loss), ("pg", pg), ("kl", kl), ("clipped", clipped),
                                     ("entropy", entropy)):
                    totals[name] += reduce_tokens(values, mask[sl], "token", num_tokens_global)
        if old_logprobs is None:
            old_logprobs = torch.cat(first_pass)
        all_reduce_grads(model)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                   args.grad_clip if args.grad_clip > 0 else float("inf"))
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    return {name: all_reduce_sum(t).item() / args.num_iterations for name, t in totals.items()} | \
        {"grad_norm": grad_norm.item()}
