"""
GRPO (Shao et al., 2024): group-relative policy optimisation with any reward function.

One step (`grpo_step`):
1. take P prompts (density-weighted or uniform; the caller samples them);
2. sample G completions per prompt with the KV-cache engine at `temperature`;
3. score each completion with `reward_fn(batch)` on exactly the sampled ids (a reward model reads prompt +
   completion with no re-encoding, each prompt's keys/values computed once for its group: `group_rewards`);
4. advantage of completion j of prompt i: A_ij = (r_ij - mean_i) / (std_i + eps)  (`scale_rewards="group"`),
   or r_ij - mean_i (`"none"`): a completion is judged only against its siblings, so no value network is needed;
5. for `num_iterations` passes over the batch, minimise per completion token t
       -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta * KL_t,
   with rho_t = pi(y_t) / pi_old(y_t) and KL_t the k3 estimator of KL(pi || pi_ref):
       exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (non-negative, zero when pi = pi_ref).
   eps_low is `clip_eps`; eps_high is `epsilon_high` (DAPO's "clip higher", e.g. 0.28), or `clip_eps` when unset.
   `loss_type="token"` averages over all completion tokens of the batch (long answers weigh more);
   `"sequence"` averages within each completion first, then over completions (the paper's form).

pi_old is the policy that sampled the batch. On the first pass it is the current policy itself, so the ratio is
taken against the detached log-probs of the same forward: exactly 1, and the clipped objective reduces to the
plain policy gradient. Later passes compare against those first-pass log-probs.

Temperature. The completions are sampled from softmax(logits / T), and pi, pi_old and pi_ref are all evaluated at
the same T (TRL's convention): the ratio is then a ratio of the sampling distributions, and the KL term estimates
KL(pi_T || ref_T). At T = 1 this is the plain model.

Truncated completions. A completion cut by `max_new_tokens` never reached its end token, so a reward model reads
it at a token it was never trained to score. With `mask_truncated_completions` (the default) such completions are
scored and take part in their group's mean and std, but none of their tokens enters the loss (TRL's option of the
same name).
"""

import functools
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nanochat.batching import pad_left, pad_right
from nanochat.common import all_reduce_sum, autocast_ctx, get_rank, get_world_size
from nanochat.gpt import PrefixKV
from nanochat.training import optimizer_step


@dataclass
class GRPOConfig:
    """The knobs of one GRPO step; `GRPOConfig.from_flags(args)` takes those a script's flags name."""
    num_generations: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = None
    top_p: float = None  # nucleus sampling; the ratio and KL are still of softmax(logits / T), as in TRL
    scale_rewards: str = "group"
    clip_eps: float = 0.2
    epsilon_high: float = None
    beta: float = 0.04
    loss_type: str = "token"
    num_iterations: int = 1
    mask_truncated_completions: bool = True
    grad_clip: float = 1.0
    device_batch_size: int = 32
    compile: bool = False

    @classmethod
    def from_flags(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


class GroupBatch(NamedTuple):
    """P prompts and their G completions each; completion row i belongs to prompt i // G."""
    prompt_ids: torch.Tensor       # (P, Tp) left-padded
    prompt_valid: torch.Tensor     # (P, Tp) bool, real prompt tokens
    completion_ids: torch.Tensor   # (P*G, Tc) right-padded
    completion_mask: torch.Tensor  # (P*G, Tc) bool, real completion tokens

    def to(self, device):
        return GroupBatch(*(t.to(device) for t in self))


def group_advantages(rewards, scale_rewards="group", eps=1e-4):
    """rewards (P, G) -> advantages (P, G), normalised within each prompt's group."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        return centered / (rewards.std(dim=1, keepdim=True) + eps)
    if scale_rewards == "none":
        return centered
    raise ValueError(f"scale_rewards must be 'group' or 'none', got {scale_rewards!r}")


def grpo_token_losses(logprobs, old_logprobs, ref_logprobs, advantages, clip_eps=0.2, beta=0.0, epsilon_high=None):
    """
    Per-token losses (B, T) and statistics. logprobs carry gradients; old/ref are constants; advantages (B,).
    Returns (loss, pg, kl, clipped) tensors of shape (B, T).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    a = advantages[:, None]
    high = clip_eps if epsilon_high is None else epsilon_high
    unclipped, clipped_obj = ratio * a, ratio.clamp(1 - clip_eps, 1 + high) * a
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
    One GroupBatch of P prompts (token id lists) and their G completions each. Left-padding puts every prompt's
    last token in the last column: its hidden state predicts the first completion token of all G rows.
    """
    if len(completions) % len(prompts):
        raise ValueError(f"{len(completions)} completions do not divide into groups of {len(prompts)} prompts")
    prompt_ids, prompt_valid = pad_left(prompts, pad_id)
    completion_ids, completion_mask = pad_right(completions, pad_id, width=max(max(len(c) for c in completions), 1))
    return GroupBatch(prompt_ids, prompt_valid, completion_ids, completion_mask)


@functools.cache
def compiled_token_logprobs():
    """
    GPT.token_logprobs through torch.compile (dynamic shapes), where inductor fuses the plain vocabulary-sized tail
    (soft-cap, log-softmax, entropy). Built on first request, so importing this module does not pay for torch's
    compiler.
    """
    return torch.compile(lambda model, *args: model.token_logprobs(*args), dynamic=True)


def used_lengths(mask):
    """Per row of a (B, T) mask: one past its last masked-in column (0 for a row with none)."""
    columns = torch.arange(1, mask.size(1) + 1, device=mask.device)
    return (mask.long() * columns).amax(dim=1)


# what one more chunk costs, in completion tokens: a chunk's fixed work (the dispatch of its ops, matmuls of few rows
# running below the machine's peak). Measured at depth 4 on 2 CPU cores (forward and backward of 32 rows of 64
# tokens in chunks of 1 to 32 rows, vocab 1,024 and 4,096): a chunk cost as much as 75 more tokens. Set a little
# lower, toward less padding: overheads of 64 and 128 timed alike on skewed lengths, 32 and 256 slower
CHUNK_OVERHEAD = 64


def length_chunks(lengths, overhead):
    """
    Sizes of the consecutive chunks that rows of `lengths` (a list in descending order) are cut into, at the least
    total cost: each chunk costs its rows times its longest length (the tokens it runs, padding included) plus
    `overhead`. Rows of one length share a chunk; a long row gets a chunk of its own only where padding the rows
    after it would cost more than the overhead saved.
    """
    best, start = [0] + [float("inf")] * len(lengths), [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        for first in range(end):  # the last chunk is rows first..end-1, as long as row `first`
            cost = best[first] + (end - first) * lengths[first] + overhead
            if cost < best[end]:
                best[end], start[end] = cost, first
    sizes, end = [], len(lengths)
    while end:
        sizes.append(end - start[end])
        end = start[end]
    return sizes[::-1]


def completion_states(model, batch, predict, at=None):
    """
    The final hidden states of a GroupBatch's completions, each prompt run through `model` once: yields
    (rows, hidden (n, w, n_embd)) for chunks of rows of similar length that together cover every row whose
    completion mask is not all 0, and w = the longest used length in the chunk (`used_lengths`). With `predict`
    hidden[:, t] predicts completion token t (the prompt's last state, then the completion's own up to w - 1);
    otherwise hidden[:, t] has read completion token t. Without `predict`, `at` (B,) asks for one state per row,
    the one that has read completion token at[i]: hidden is then (n, n_embd) (GPT.hidden_states' `at`).

    Why chunks: completions are as long as the longest in their chunk, and sampled lengths are skewed (most answers
    end after a few tokens, some run to max_new_tokens), so one chunk of every row would be mostly padding, and a
    chunk per row pays a chunk's fixed work many times. The rows, taken in order of length, are cut into the chunks
    of `length_chunks` at CHUNK_OVERHEAD; each attends to its rows' prompt keys/values (`PrefixKV.rows`) and runs only
    to its own longest row. The numbers are those of a full forward of every prompt + completion row.
    """
    P, G = batch.prompt_ids.size(0), batch.completion_ids.size(0) // batch.prompt_ids.size(0)
    device = batch.prompt_ids.device
    cache = PrefixKV(model.config, P, batch.prompt_ids.size(1) + batch.completion_ids.size(1), device)
    lengths = used_lengths(batch.completion_mask)
    order = torch.sort(lengths, descending=True, stable=True).indices[:int((lengths > 0).sum())]
    if not len(order):  # every row masked out (all truncated): nothing to run
        return
    with autocast_ctx(device):
        prompt_last = model.hidden_states(batch.prompt_ids, kv_cache=cache, valid=batch.prompt_valid)[:, -1:]
    for rows in order.split(length_chunks(lengths[order].tolist(), CHUNK_OVERHEAD)):
        width = int(lengths[rows[0]])
        prompt_of = torch.div(rows, G, rounding_mode="floor")
        tokens = batch.completion_ids[rows, :width - 1 if predict else width]
        parts = [prompt_last[prompt_of]] if predict else []
        if at is not None:
            with autocast_ctx(device):
                yield rows, model.hidden_states(tokens, kv_cache=cache.rows(prompt_of), at=at[rows])
            continue
        if tokens.size(1):
            with autocast_ctx(device):
                parts.append(model.hidden_states(tokens, kv_cache=cache.rows(prompt_of)))
        yield rows, torch.cat(parts, dim=1)


def completion_logprobs(model, batch, temperature=1.0, with_entropy=False, compile=False):
    """
    Log-probabilities (P*G, Tc) of a GroupBatch's completion tokens under `model` at `temperature`, and with
    `with_entropy` the entropy (nats, detached) at each of those positions: the same numbers as a full forward of
    every prompt + completion row (`completion_states`), 0 past each row's last masked-in token and on rows whose
    mask is all 0. `compile` runs the vocabulary-sized tail through torch.compile (GPT.token_logprobs' plain one).
    """
    tail = functools.partial(compiled_token_logprobs(), model) if compile else model.token_logprobs
    B, width = batch.completion_ids.shape
    rows, logprobs, entropies = [], [], []
    for sub, hidden in completion_states(model, batch, predict=True):
        out = tail(hidden, batch.completion_ids[sub, :hidden.size(1)], temperature, with_entropy)
        chosen, entropy = out if with_entropy else (out, None)
        chosen = chosen * batch.completion_mask[sub, :chosen.size(1)]  # a shorter row's pads in its chunk: 0
        rows.append(sub)
        logprobs.append(F.pad(chosen, (0, width - chosen.size(1))))
        if with_entropy:
            entropy = entropy * batch.completion_mask[sub, :entropy.size(1)]
            entropies.append(F.pad(entropy, (0, width - entropy.size(1))))

    def scatter(chunks):  # the chunks' rows back in batch order; rows in no chunk stay 0
        zeros = torch.zeros(B, width, device=batch.completion_ids.device)
        return zeros.index_copy(0, torch.cat(rows), torch.cat(chunks)) if rows else zeros

    return (scatter(logprobs), scatter(entropies)) if with_entropy else scatter(logprobs)


def micro_batches(batch, rows_per_batch):
    """
    Yield (row slice, GroupBatch) of a GroupBatch, whole groups at a time: max(1, rows_per_batch // G) prompts and
    their completions per micro-batch. Each micro-batch's completions are cut to its last column with a masked-in
    token: columns after it only hold padding, and a completion whose mask is all 0 (a truncated one kept out of the
    loss) would otherwise make every row of its micro-batch run to --max_new_tokens.
    """
    G = batch.completion_ids.size(0) // batch.prompt_ids.size(0)
    prompts_per_batch = max(1, rows_per_batch // G)
    for p0 in range(0, batch.prompt_ids.size(0), prompts_per_batch):
        ps, rows = slice(p0, p0 + prompts_per_batch), slice(p0 * G, (p0 + prompts_per_batch) * G)
        used = batch.completion_mask[rows].any(dim=0).nonzero()
        width = int(used.max()) + 1 if len(used) else 1
        yield rows, GroupBatch(batch.prompt_ids[ps], batch.prompt_valid[ps], batch.completion_ids[rows, :width],
                               batch.completion_mask[rows, :width])


def full_width(chunks, width):
    """Per-micro-batch (rows, width_i) tensors side by side as one (rows, width), zero in the cut-off columns."""
    return torch.cat([F.pad(c, (0, width - c.size(1))) for c in chunks])


@torch.no_grad()
def batch_logprobs(model, batch, rows_per_batch, temperature=1.0, compile=False):
    """completion_logprobs of a whole GroupBatch, without gradients (the frozen reference's); 0 past each mask."""
    return full_width([completion_logprobs(model, sub, temperature, compile=compile)
                       for _, sub in micro_batches(batch, rows_per_batch)], batch.completion_ids.size(1))


def completion_rewards(rm, batch):
    """
    Rewards (P*G,) fp32 of a GroupBatch under a reward model, each read at its completion's last token (the
    completion mask's length), with gradients when enabled: the same numbers as nanochat.rm.rewards_for_ids of every
    prompt + completion row, each prompt run once.
    """
    lengths = batch.completion_mask.sum(1)
    if (lengths == 0).any():
        raise ValueError("every completion needs at least one token to be scored")
    chunks, rewards = [], []
    for chunk, last in completion_states(rm.backbone, batch, predict=False, at=lengths - 1):
        chunks.append(chunk)
        rewards.append(rm.head(last).squeeze(-1).float())
    return torch.cat(rewards)[torch.argsort(torch.cat(chunks))]  # chunks come in order of length: back to row order


@torch.no_grad()
def group_rewards(rm, batch, rows_per_batch):
    """Rewards (P*G,) fp32 of a GroupBatch (`completion_rewards`), in micro-batches of whole groups."""
    return torch.cat([completion_rewards(rm, sub) for _, sub in micro_batches(batch, rows_per_batch)])


def policy_update(model, optimizers, batch, ref_logprobs, advantages, config, num_sequences_global,
                  num_tokens_global):
    """
    The `config.num_iterations` optimisation passes over one batch (this rank's GroupBatch; its completion mask
    says which tokens enter the loss), in micro-batches of whole groups of about `config.device_batch_size` rows.
    Returns statistics averaged over the passes, each a mean over all loss tokens of all ranks (loss, pg_loss, kl,
    clip_ratio: the share of tokens where the clip was active, entropy), and the last pass's gradient norm.
    """
    denominator = num_tokens_global if config.loss_type == "token" else num_sequences_global
    device = batch.prompt_ids.device
    old_logprobs = None
    totals = {k: torch.zeros((), device=device) for k in ("loss", "pg_loss", "kl", "clip_ratio", "entropy")}
    for iteration in range(config.num_iterations):
        first_pass = []
        for sl, sub in micro_batches(batch, config.device_batch_size):
            logprobs, entropy = completion_logprobs(model, sub, config.temperature, with_entropy=True,
                                                    compile=config.compile)
            width = logprobs.size(1)
            old = logprobs.detach() if old_logprobs is None else old_logprobs[sl, :width]
            first_pass.append(logprobs.detach())
            loss, pg, kl, clipped = grpo_token_losses(logprobs, old, ref_logprobs[sl, :width], advantages[sl],
                                                      config.clip_eps, config.beta, config.epsilon_high)
            mask = sub.completion_mask
            if mask.any():  # a micro-batch of masked-out (truncated) rows only ran nothing and has no graph
                reduce_tokens(loss, mask, config.loss_type, denominator).backward()
            with torch.no_grad():
                for name, values in (("loss", loss), ("pg_loss", pg), ("kl", kl), ("clip_ratio", clipped),
                                     ("entropy", entropy)):
                    totals[name] += reduce_tokens(values, mask, "token", num_tokens_global)
        if old_logprobs is None:
            old_logprobs = full_width(first_pass, batch.completion_ids.size(1))
        for p in model.parameters():  # what no loss token reached gets a zero gradient, so every rank sums the
            if p.requires_grad and p.grad is None:  # same buffer and the optimizer steps as on any other batch
                p.grad = torch.zeros_like(p)
        grad_norm = optimizer_step(model, optimizers, config.grad_clip)
    return {name: all_reduce_sum(t).item() / config.num_iterations for name, t in totals.items()} | \
        {"grad_norm": grad_norm}


def grpo_step(policy, reference, optimizers, engine, prompts, reward_fn, config, stop_tokens, seed, pad_id=0):
    """
    One GRPO step on this rank's `prompts` (token id lists; every rank holds the same number): sample, score with
    `reward_fn(batch) -> (P*G,)` rewards, advantages, reference log-probs, the update. Under torchrun each rank
    samples its slice of the global batch with the global random stream (Engine's `global_rows`), so N ranks do
    exactly what one process does with all the prompts. Returns (statistics over all ranks, the GroupBatch, rewards).
    """
    rank, world_size = get_rank(), get_world_size()
    rows = len(prompts) * config.num_generations
    policy.eval()
    gen = engine.generate(prompts, num_samples=config.num_generations, max_new_tokens=config.max_new_tokens,
                          temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                          stop_tokens=stop_tokens, seed=seed,
                          global_rows=(rank * rows, world_size * rows))
    policy.train()
    completions = gen.completions()
    if any(len(c) == 0 for c in completions):
        raise RuntimeError("the engine returned an empty completion")
    device = next(policy.parameters()).device
    batch = pack_groups(prompts, completions, pad_id).to(device)
    rewards = reward_fn(batch).float().to(device)
    advantages = group_advantages(rewards.view(len(prompts), config.num_generations), config.scale_rewards).view(-1)
    truncated = torch.tensor([reason == "length" for reason in gen.finish_reasons], device=device)
    train_batch = batch
    if config.mask_truncated_completions:
        train_batch = batch._replace(completion_mask=batch.completion_mask & ~truncated[:, None])
    # only where the loss reads them: a truncated completion's tokens cost nothing here
    ref_logprobs = batch_logprobs(reference, train_batch, config.device_batch_size, config.temperature,
                                  config.compile)
    num_tokens = all_reduce_sum(train_batch.completion_mask.sum().float()).clamp(min=1)
    stats = policy_update(policy, optimizers, train_batch, ref_logprobs, advantages, config,
                          num_sequences_global=world_size * rows, num_tokens_global=num_tokens)
    local = {"reward": rewards.double().sum(), "reward_sq": (rewards.double() ** 2).sum(),
             "completion_length": batch.completion_mask.sum().double(), "truncated": truncated.double().sum()}
    means = dict(zip(local, (all_reduce_sum(torch.stack(list(local.values()))) / (world_size * rows)).tolist()))
    stats |= {"reward": means["reward"], "reward_std": max(means["reward_sq"] - means["reward"] ** 2, 0.0) ** 0.5,
              "completion_length": means["completion_length"], "truncated": means["truncated"]}
    return stats, batch, rewards
