"""
AutoDeco (Wang et al. 2025, "The End of Manual Decoding"): two small heads on a frozen GPT's final normed hidden
state h_t (what the LM head reads) that predict the sampling temperature and the top-p of the next token.

Heads. temperature T_t = 2 sigmoid(MLP(h_t)), in (0, 2), clamped below at MIN_TEMPERATURE; top-p
P_t = sigmoid(MLP([h_t ; stop-grad T_t ; stats of softmax(z_t / T_t)])), the four statistics being the max
probability, the entropy, the variance across the vocabulary and the top-5 mass. Each MLP is
Linear(in, 256) -> ReLU -> Linear(256, 1) with the last layer zero-initialised, so a fresh head says T = 1 and
P = 0.5 exactly: sampling starts as plain temperature-1 sampling.

Analytic Min-P hinge (the default temperature objective). Min-p with ratio rho keeps token j at temperature T iff
p_j >= rho p_max, i.e. z_max - z_j <= T ln(1/rho). So the smallest temperature at which the ground truth y still
survives is T_req = relu(z_max - z_y) / ln(1/rho), from exactly the fp32 logits the sampler uses (softcap
included). Per selected token the loss is

    temp_hinge_weight * relu(T_req - T) + R,   R = temp_reg_weight * T                    (linear)
                                             R = temp_reg_weight * relu(T - T_req)^2      (overshoot_sq)

With `linear` the expected loss given the context is minimised where P(T_req > T) = w_r / w_h: the head learns the
(1 - w_r/w_h) quantile of T_req (the 90th percentile at 0.1 / 1.0), a temperature high enough that min-p keeps the
right token 90% of the time and no higher. `temp_target_cap` bounds T_req: `clamp` trains towards min(T_req, cap),
`drop` leaves tokens with T_req > cap out of the selection (they would only drag T up to where sampling is noise).

Goldilocks filter. The ground truth's rank r = 1 + #{j : z_j > z_y} (ties rank 1). Easy tokens (r = 1, T_req = 0)
say "lower T"; top-k tokens (2 <= r <= k) say "raise T enough"; tokens with r > k are never selected (the model
has no idea, and no temperature fixes that). The two buckets are balanced to a target easy fraction f by
subsampling the over-represented bucket, keeping the scarce one whole, with this rounding rule:

    n = min(floor(|E| / f), floor(|K| / (1 - f)))      the largest total the scarce bucket allows
    easy = floor(f n + 1/2),  top-k = n - easy          (e.g. |E| 800, |K| 150, f 0.1: n 166 -> 17 + 149)

f = 0 keeps only K, f = 1 only E, f = -1 all of E and K (the natural ratio), and when one bucket is empty the other
is kept whole (no fraction is reachable by subsampling, and dropping everything would waste the batch); the
realised easy fraction is logged. The draw is a torch.Generator seeded by (seed, step) over the *global* batch,
so N ranks select exactly the tokens one process would.

Legacy objective (`legacy_ce`, the paper's): the ground truth's cross-entropy under softmax(z / T), weighted by
stop-grad p(y) at temperature 1, with easy tokens (r = 1) dropped with probability 0.6 (unless the Goldilocks
filter already balances them). The top-p head's loss is the paper's soft top-p (Sec. 2.1, and its code): sort
softmax(z / T) descending, with c_j the cumulative mass up to and including token j the soft mask is
m_j = exp(-steepness * relu(c_j - P)) (steepness 30), a token inside the nucleus keeps weight 1 and one beyond it
decays with its overage; the loss is -log of the ground truth's probability in the renormalised masked
distribution, weighted by stop-grad p(y), over every supervised token. T is stop-grad there: each head has its own
objective.

Loss normalisation: the sum over a rank's selected tokens divided by the global number of selected tokens, then
gradients summed over ranks (nanochat/training.py's rule), so N ranks compute the 1-process gradient. An empty
selection gives a zero that still has a graph: backward runs and every rank joins the gradient all-reduce.

Checkpoints. A heads-only checkpoint of kind "autodeco" (checkpoint.py's layout) whose `extra` names its base:
the base ckpt.pt (relative to the heads' directory and absolute) and a fingerprint of its weights, so a base that
changed since is refused. `load_autodeco` gives (base, heads, payload); `decode_hook` plugs the heads into
`Engine.generate(..., decode_hook=hook, min_p=payload["min_p_ratio"])`.
"""

import hashlib
import math
import os
import random
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.batching import IGNORE_INDEX
from nanochat.checkpoint import CheckpointError, load_model, load_payload, load_weights
from nanochat.common import InputError, all_reduce_sum, autocast_ctx, get_rank, get_world_size, rank0_first
from nanochat.data import hf_endpoint, hf_offline, host_unreachable, validate_messages
from nanochat.training import optimizer_step

AUTODECO_KIND = "autodeco"
HEAD_HIDDEN = 256
NUM_STATS = 4  # max probability, entropy, variance across the vocabulary, top-5 mass
MIN_TEMPERATURE = 0.01
SOFT_TOP_P_STEEPNESS = 30.0  # the paper's code
LEGACY_EASY_DROP = 0.6
# token codes of the selection grid: why each target position is (not) a candidate
IGNORED, EASY, TOPK, BEYOND_K, CAPPED = 0, 1, 2, 3, 4


# -----------------------------------------------------------------------------
# the heads

@dataclass
class HeadsConfig:
    n_embd: int
    hidden: int = HEAD_HIDDEN

    def to_dict(self):
        return asdict(self)


def _mlp(n_in, hidden):
    mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    nn.init.zeros_(mlp[2].weight)  # a fresh head outputs exactly sigmoid(0): T = 1, P = 0.5
    nn.init.zeros_(mlp[2].bias)
    return mlp


def prob_stats(scaled_logits):
    """(..., 4) max probability, entropy, variance across the vocabulary and top-5 mass of softmax(scaled_logits)."""
    logp = F.log_softmax(scaled_logits.float(), dim=-1)
    p = logp.exp()
    top5 = p.topk(min(5, p.size(-1)), dim=-1).values.sum(-1)
    return torch.stack([p.max(-1).values, -(p * logp).sum(-1), p.var(-1, correction=0), top5], dim=-1)


class AutoDecoHeads(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config  # checkpoint.save_checkpoint and the stage's resume identity read it
        self.temp_head = _mlp(config.n_embd, config.hidden)
        self.top_p_head = _mlp(config.n_embd + 1 + NUM_STATS, config.hidden)

    def temperature(self, h):
        """(...,) temperatures in [MIN_TEMPERATURE, 2) from fp32 hidden states (..., n_embd)."""
        return (2 * torch.sigmoid(self.temp_head(h).squeeze(-1))).clamp(min=MIN_TEMPERATURE)

    def top_p(self, h, logits, temperature):
        """(...,) top-p in (0, 1) from hidden states, the logits they give and the (stop-grad) temperature."""
        t = temperature.detach()[..., None]
        features = torch.cat([h, t, prob_stats(logits.float() / t)], dim=-1)
        return torch.sigmoid(self.top_p_head(features).squeeze(-1))


def weights_fingerprint(state_dict):
    """sha256 (16 hex digits) of a state dict's names, dtypes, shapes and bytes: equal iff the weights are equal."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(state_dict[name].shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def base_reference(base_path, fingerprint, heads_dir):
    """What a heads checkpoint in `heads_dir` stores about its base: where it is and what its weights were."""
    path = os.path.abspath(base_path)
    return {"base_path": path, "base_relpath": os.path.relpath(path, os.path.abspath(heads_dir)),
            "base_fingerprint": fingerprint}


def load_base(payload, device="cpu"):
    """
    The base GPT a heads checkpoint names (relative to it first, so outs/ can move as a whole, then absolute),
    refused when its weights differ from those the heads were built on. Returns (model in eval mode, its payload
    without the weights).
    """
    extra = payload["extra"]
    relative = os.path.join(os.path.dirname(os.path.abspath(payload["path"])), extra["base_relpath"])
    path = relative if os.path.exists(relative) else extra["base_path"]
    base, base_payload = load_model(path, device)
    found = weights_fingerprint(base_payload.pop("model"))  # the model holds its own copy of the weights
    if found != extra["base_fingerprint"]:
        raise CheckpointError(f"{payload['path']} was built on the weights of {path} with fingerprint "
                              f"{extra['base_fingerprint']}, but that checkpoint now holds other weights ({found}); "
                              f"rebuild the heads with python -m scripts.kat_construct_autodeco and retrain them")
    base.requires_grad_(False)
    return base, base_payload


def load_autodeco(path, device="cpu"):
    """
    AutoDeco heads (a directory or its ckpt.pt) and the base they sit on. Returns (base GPT in eval mode, heads in
    eval mode, payload): the heads' checkpoint payload plus "min_p_ratio" (the min-p ratio the temperature head was
    trained for: pass it to Engine.generate's min_p), "train_top_p" (whether the top-p head was trained: use it at
    decode time only then) and "base_payload".
    """
    payload = load_payload(path, device)
    if payload.get("kind") != AUTODECO_KIND:
        raise CheckpointError(f"checkpoint {payload['path']} holds a '{payload.get('kind', 'gpt')}' model, not "
                              f"AutoDeco heads (write them with python -m scripts.kat_construct_autodeco)")
    base, base_payload = load_base(payload, device)
    heads = AutoDecoHeads(HeadsConfig(**payload["config"])).to(device)
    load_weights(heads, payload)
    heads.eval()
    extra = payload["extra"]
    payload = payload | {"min_p_ratio": extra["min_p_ratio"], "train_top_p": extra["train_top_p"],
                         "base_payload": base_payload}
    return base, heads, payload


def decode_hook(heads, use_top_p):
    """
    A decode hook for Engine.generate: hook(hidden (B, n_embd), logits (B, V)) -> (temperature (B,), top_p (B,) or
    None). Rows are independent, so the engine may call it with only the rows still decoding.
    """
    @torch.no_grad()
    def hook(hidden, logits):
        h = hidden.float()
        temperature = heads.temperature(h)
        return temperature, heads.top_p(h, logits, temperature) if use_top_p else None
    return hook


# -----------------------------------------------------------------------------
# targets and losses (fp32 logits (N, V), ground truths (N,))

def required_temperature(logits, targets, min_p_ratio):
    """T_req (N,): the smallest temperature at which min-p with this ratio keeps the ground truth."""
    logits = logits.float()
    gap = logits.max(dim=-1).values - logits.gather(-1, targets[:, None]).squeeze(-1)
    return gap.clamp(min=0) / math.log(1 / min_p_ratio)


def target_rank(logits, targets):
    """The ground truth's rank (N,): 1 + the number of tokens with a strictly larger logit (a tie is rank 1)."""
    return 1 + (logits > logits.gather(-1, targets[:, None])).sum(-1)


def temperature_losses(t_hat, t_req, hinge_weight, reg_weight, reg_type):
    """Per-token min-p hinge plus its regulariser (`linear` or `overshoot_sq`); t_req already capped if clamped."""
    hinge = hinge_weight * F.relu(t_req - t_hat)
    if reg_type == "linear":
        return hinge + reg_weight * t_hat
    if reg_type == "overshoot_sq":
        return hinge + reg_weight * F.relu(t_hat - t_req).square()
    raise ValueError(f"unknown temp_reg_type {reg_type!r} (expected linear or overshoot_sq)")


def hinge_target(t_req, cap, cap_mode):
    """What the hinge trains towards: T_req, or min(T_req, cap) with cap_mode clamp (drop removes tokens instead)."""
    return t_req.clamp(max=cap) if cap is not None and cap_mode == "clamp" else t_req


def legacy_ce_losses(logits, targets, t_hat):
    """Per-token cross-entropy at temperature t_hat, weighted by stop-grad p(y) at temperature 1."""
    ce = F.cross_entropy(logits / t_hat[:, None], targets, reduction="none")
    return ce * F.softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1).detach()


def soft_top_p_losses(logits, targets, temperature, top_p, steepness=SOFT_TOP_P_STEEPNESS):
    """Per-token soft top-p loss (module docstring), weighted by stop-grad p(y) at temperature 1."""
    probs = F.softmax(logits / temperature.detach()[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    decay = torch.exp(-steepness * F.relu(sorted_probs.cumsum(-1) - top_p[:, None]))
    masked = probs * torch.zeros_like(probs).scatter(-1, order, decay)
    p_target = masked.gather(-1, targets[:, None]).squeeze(-1) / masked.sum(-1).clamp(min=1e-30)
    weight = F.softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1).detach()
    return -torch.log(p_target + 1e-9) * weight


# -----------------------------------------------------------------------------
# which tokens the temperature loss reads

def goldilocks_counts(num_easy, num_topk, easy_frac):
    """(easy kept, top-k kept) for a target easy fraction (module docstring; -1 keeps both buckets whole)."""
    if easy_frac == 0:
        return 0, num_topk
    if easy_frac == 1:
        return num_easy, 0
    if easy_frac < 0 or num_easy == 0 or num_topk == 0:
        return num_easy, num_topk
    # 1e-9: 3 / 0.3 is 9.999999999999998 in floating point and must count as 10
    n = min(math.floor(num_easy / easy_frac + 1e-9), math.floor(num_topk / (1 - easy_frac) + 1e-9))
    easy = math.floor(easy_frac * n + 0.5)
    return easy, n - easy


def token_codes(rank, t_req, topk, cap, cap_mode):
    """Each supervised token's code (N,): EASY, TOPK (2 <= rank <= topk), BEYOND_K, or CAPPED (dropped by the cap)."""
    codes = torch.where(rank == 1, EASY, torch.where(rank <= topk, TOPK, BEYOND_K))
    if cap is not None and cap_mode == "drop":
        codes = torch.where(t_req > cap, CAPPED, codes)
    return codes


def select_tokens(codes, cfg, generator):
    """
    The selected positions (bool, codes' shape) of the global grid of codes: the Goldilocks balance of EASY and
    TOPK; without it every EASY, TOPK and BEYOND_K token, less (legacy_ce) easy ones dropped with probability 0.6.
    """
    if cfg.goldilocks_filter:
        flat = codes.reshape(-1)
        easy, topk = (flat == EASY).nonzero().squeeze(1), (flat == TOPK).nonzero().squeeze(1)
        keep_easy, keep_topk = goldilocks_counts(easy.numel(), topk.numel(), cfg.goldilocks_easy_frac)
        selected = torch.zeros_like(flat, dtype=torch.bool)
        selected[easy[torch.randperm(easy.numel(), generator=generator)[:keep_easy]]] = True
        selected[topk[torch.randperm(topk.numel(), generator=generator)[:keep_topk]]] = True
        return selected.view_as(codes)
    selected = (codes == EASY) | (codes == TOPK) | (codes == BEYOND_K)
    if cfg.temp_objective == "legacy_ce":
        selected &= ~((codes == EASY) & (torch.rand(codes.shape, generator=generator) < LEGACY_EASY_DROP))
    return selected


def global_grid(local, rank, world_size):
    """The (world_size * B, W) grid of every rank's (B, W) rows, on every rank (one all-reduce of disjoint rows)."""
    B = local.size(0)
    grid = torch.zeros(world_size * B, *local.shape[1:], dtype=local.dtype, device=local.device)
    grid[rank * B:(rank + 1) * B] = local
    return all_reduce_sum(grid)


# -----------------------------------------------------------------------------
# one training step

@dataclass
class AutoDecoConfig:
    """The loss knobs; the training script's flags of the same names fill it."""
    min_p_ratio: float = 0.1
    train_temp: bool = True
    train_top_p: bool = False
    temp_objective: str = "analytic_min_p_hinge"
    temp_hinge_weight: float = 1.0
    temp_reg_weight: float = 0.1
    temp_reg_type: str = "linear"
    temp_target_cap: float = None
    cap_mode: str = "clamp"
    goldilocks_filter: bool = False
    goldilocks_easy_frac: float = 0.1
    goldilocks_topk: int = 10
    seed: int = 42


def step_generator(seed, step):
    """The selection's random numbers: a function of (seed, step) only, so a resumed run draws the same ones."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@torch.no_grad()
def base_outputs(base, inputs, targets):
    """Hidden states (N, n_embd) fp32, the sampler's logits (N, V) fp32 and the targets (N,) of supervised positions."""
    valid = targets != IGNORE_INDEX
    with autocast_ctx(inputs.device):  # as the engine computes them, so T_req is about the logits it samples from
        h = base.hidden_states(inputs)[valid]
        logits = base.logits_from_hidden(h)
    return h.float(), logits.float(), targets[valid]


def autodeco_step(base, heads, optimizers, inputs, targets, cfg, step, grad_clip=1.0):
    """
    One optimizer step of the heads on this rank's rows (inputs, targets) of the global batch. Returns (stats of the
    global batch, batch: this rank's tensors, for diagnostics).
    """
    device = inputs.device
    rank, world_size = get_rank(), get_world_size()
    h, logits, y = base_outputs(base, inputs, targets)
    valid = targets != IGNORE_INDEX
    t_req = required_temperature(logits, y, cfg.min_p_ratio)
    ranks = target_rank(logits, y)
    local_codes = torch.zeros(valid.shape, dtype=torch.long, device=device)
    local_codes[valid] = token_codes(ranks, t_req, cfg.goldilocks_topk, cfg.temp_target_cap, cfg.cap_mode)
    codes = global_grid(local_codes, rank, world_size).cpu()  # every rank selects from the whole global batch
    selected_grid = select_tokens(codes, cfg, step_generator(cfg.seed, step))
    B = inputs.size(0)
    selected = selected_grid[rank * B:(rank + 1) * B].to(device)[valid]
    num_selected, num_valid = selected_grid.sum().item(), (codes != IGNORED).sum().item()
    num_easy = (selected_grid & (codes == EASY)).sum().item()

    t_hat = heads.temperature(h[selected])
    if cfg.temp_objective == "analytic_min_p_hinge":
        target = hinge_target(t_req[selected], cfg.temp_target_cap, cfg.cap_mode)
        per_token = temperature_losses(t_hat, target, cfg.temp_hinge_weight, cfg.temp_reg_weight, cfg.temp_reg_type)
    else:
        per_token = legacy_ce_losses(logits[selected], y[selected], t_hat)
    temp_loss = per_token.sum() / max(num_selected, 1)
    loss = temp_loss if cfg.train_temp else temp_loss.detach()
    # sums over this rank's tokens; all-reduced below into the global batch's means
    sums = [per_token.detach().sum(), t_hat.detach().sum(), t_req[selected].sum(),
            (t_hat.detach() >= t_req[selected]).sum()]
    if cfg.train_top_p:
        t_all = heads.temperature(h).detach()
        top_p = heads.top_p(h, logits, t_all)
        per_token_p = soft_top_p_losses(logits, y, t_all, top_p)
        loss = loss + per_token_p.sum() / max(num_valid, 1)
        sums += [per_token_p.detach().sum(), top_p.detach().sum()]
    loss.backward()
    grad_norm = optimizer_step(heads, optimizers, grad_clip)
    totals = all_reduce_sum(torch.stack([s.float() for s in sums])).tolist()
    per_selected, per_valid = 1 / max(num_selected, 1), 1 / max(num_valid, 1)
    stats = {"temp_loss": totals[0] * per_selected, "mean_temperature": totals[1] * per_selected,
             "mean_t_req": totals[2] * per_selected, "coverage": totals[3] * per_selected,
             "selected": num_selected, "valid": num_valid,
             "easy_frac": num_easy / num_selected if num_selected else 0.0, "grad_norm": grad_norm}
    stats["loss"] = stats["temp_loss"] if cfg.train_temp else 0.0
    if cfg.train_top_p:
        stats |= {"top_p_loss": totals[4] * per_valid, "mean_top_p": totals[5] * per_valid}
        stats["loss"] += stats["top_p_loss"]
    batch = {"inputs": inputs, "positions": valid.nonzero(), "logits": logits, "targets": y, "t_req": t_req,
             "ranks": ranks, "selected": selected, "t_hat": t_hat.detach()}
    return stats, batch


# -----------------------------------------------------------------------------
# evaluation and diagnostics

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def quantiles(values):
    """{"n", "mean", "p10", ..., "p99", "max", "zero_share"} of a 1-d tensor (empty: {"n": 0})."""
    values = values.detach().float().cpu()
    if values.numel() == 0:
        return {"n": 0}
    q = torch.quantile(values, torch.tensor(QUANTILES))
    return {"n": values.numel(), "mean": values.mean().item(),
            **{f"p{round(100 * p)}": v for p, v in zip(QUANTILES, q.tolist())},
            "max": values.max().item(), "zero_share": (values == 0).float().mean().item()}


@torch.no_grad()
def evaluate_heads(base, heads, batches, cfg):
    """
    The heads on held-out (inputs, targets) batches, every supervised token: mean predicted T (overall, on easy
    tokens, on top-k tokens), the hinge objective, min-p coverage at the predicted T (the share of tokens min-p
    keeps) and the T_req distribution.
    """
    t_hats, t_reqs, ranks = [], [], []
    for inputs, targets in batches:
        h, logits, y = base_outputs(base, inputs, targets)
        t_hats.append(heads.temperature(h))
        t_reqs.append(required_temperature(logits, y, cfg.min_p_ratio))
        ranks.append(target_rank(logits, y))
    t_hat, t_req, rank = torch.cat(t_hats), torch.cat(t_reqs), torch.cat(ranks)
    target = hinge_target(t_req, cfg.temp_target_cap, cfg.cap_mode)
    losses = temperature_losses(t_hat, target, cfg.temp_hinge_weight, cfg.temp_reg_weight, cfg.temp_reg_type)
    easy, topk = rank == 1, (rank > 1) & (rank <= cfg.goldilocks_topk)
    return {"tokens": t_hat.numel(), "mean_temperature": t_hat.mean().item(),
            "mean_temperature_easy": t_hat[easy].mean().item() if easy.any() else None,
            "mean_temperature_topk": t_hat[topk].mean().item() if topk.any() else None,
            "hinge_objective": losses.mean().item(), "coverage": (t_hat >= t_req).float().mean().item(),
            "easy_share": easy.float().mean().item(), "t_req": quantiles(t_req)}


def _top_tokens(probs, k, tok):
    values, ids = probs.topk(min(k, probs.numel()))
    return [{"id": i, "token": tok.decode([i]), "prob": p} for i, p in zip(ids.tolist(), values.tolist())]


def diagnostics(batch, stats, step, tok, num_examples, topk, knobs):
    """
    One step's diagnostics record: up to `num_examples` of the tokens the loss used (spread evenly over this rank's
    selected tokens), each with its context, ground truth, predicted and required temperature, the min-p condition
    at the predicted temperature and the top tokens before and after it; the run's knobs, the global batch's counts
    and this rank's T_req distribution.
    """
    ratio = knobs["min_p_ratio"]
    chosen = batch["selected"].nonzero().squeeze(1)
    picks = torch.linspace(0, chosen.numel() - 1, min(num_examples, chosen.numel())).round().long().unique()
    examples = []
    for j in picks.tolist():
        i = chosen[j].item()
        row, col = batch["positions"][i].tolist()
        context = batch["inputs"][row, :col + 1].tolist()
        z, y, t_hat, t_req = batch["logits"][i], batch["targets"][i].item(), batch["t_hat"][j].item(), \
            batch["t_req"][i].item()
        p1, pt = F.softmax(z, dim=-1), F.softmax(z / t_hat, dim=-1)
        max_prob = pt.max().item()
        examples.append({
            "row": row, "position": col, "context_ids": context, "context_text": tok.decode(context),
            "ground_truth": {"id": y, "token": tok.decode([y]), "rank_unscaled": batch["ranks"][i].item(),
                             "prob_unscaled": p1[y].item(), "prob_at_predicted_t": pt[y].item()},
            "predicted_temperature": t_hat, "required_temperature": t_req, "hinge_gap": t_req - t_hat,
            "min_p": {"ratio": ratio, "max_prob": max_prob, "threshold": ratio * max_prob,
                      "satisfied": pt[y].item() >= ratio * max_prob},
            "top_unscaled": _top_tokens(p1, topk, tok), "top_at_predicted_t": _top_tokens(pt, topk, tok)})
    selected = batch["selected"]
    return {"step": step, "knobs": knobs, "valid_tokens": stats["valid"], "selected_tokens": stats["selected"],
            "realised_easy_frac": stats["easy_frac"], "mean_predicted_temperature": stats["mean_temperature"],
            "temp_loss": stats["temp_loss"],
            "t_req": {"valid": quantiles(batch["t_req"]), "selected": quantiles(batch["t_req"][selected])},
            "t_req_scope": "rank 0's rows of the batch", "examples": examples}


# -----------------------------------------------------------------------------
# data: chat conversations from a file, a datasets directory or the hub

CHAT_COLUMNS = ("messages", "conversations")  # picked without asking, in this order
DEFAULT_SPLITS = ("train_sft", "train")  # ultrachat_200k's training split, then the usual name
CHECK_ROWS = 200  # a seeded sample of rows checked before any training
MAX_BAD_SHARE = 0.1  # more malformed rows than this share of the sample stop the run


def _choose(what, options, given, default, flag):
    """`given` if it is one of `options`; else asked on a terminal (never without one); else the default."""
    if given is not None:
        if given not in options:
            raise InputError(f"{flag}={given}: no such {what} (there are: {', '.join(options)})")
        return given
    if len(options) == 1 or not sys.stdin.isatty():
        return default
    while True:
        try:
            answer = input(f"{what} [{', '.join(options)}] (Enter for {default}): ").strip()
        except EOFError:
            return default
        if not answer or answer in options:
            return answer or default
        print(f"no {what} {answer!r}")


def _open_local(path):
    """A local file (json, jsonl, parquet) or directory (save_to_disk output, or files in a hub repo's layout)."""
    import datasets  # slow to import, and only this path needs it
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
            return datasets.load_from_disk(path)
        return datasets.load_dataset(path)
    kinds = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    kind = kinds.get(os.path.splitext(path)[1])
    if kind is None:
        raise InputError(f"{path}: unsupported data file (expected .json, .jsonl or .parquet, or a directory)")
    return datasets.load_dataset(kind, data_files=path)


def open_chat_dataset(name, split=None, column=None):
    """
    (rows, column, label) of a chat data set: `name` is a path, a path under data/, or a hub id read through
    `datasets` (the hub's schema: ultrachat_200k has train_sft/test_sft and a `messages` column). The split and
    the column come from `split`/`column`, else a terminal prompt (stdin a tty only), else the defaults: train_sft
    or train, and a messages or conversations column. An unreachable hub fails within seconds.
    """
    import datasets
    local = next((p for p in (name, os.path.join("data", name)) if os.path.exists(p)), None)
    if local is not None:
        loaded = _open_local(local)
        splits = list(loaded) if isinstance(loaded, datasets.DatasetDict) else [None]
    elif name.count("/") == 1 and not name.startswith((".", "/")):
        reason = hf_offline() or host_unreachable(hf_endpoint())
        if reason is not None:
            raise InputError(f"--dataset_name={name}: not a local file or directory (nor data/{name}), and the "
                             f"hub is out of reach ({reason}); pass a local .jsonl/.json/.parquet file or a "
                             f"datasets directory (save_to_disk), or leave --dataset_name out for the synthetic chats")
        with rank0_first():
            splits = datasets.get_dataset_split_names(name)
    else:
        raise InputError(f"--dataset_name={name}: no such file or directory (nor data/{name}), and not a hub id "
                         f"(owner/name)")
    default_split = next((s for s in DEFAULT_SPLITS if s in splits), splits[0])
    split = _choose("split", splits, split, default_split, "--dataset_split") if splits != [None] else None
    if local is None:
        with rank0_first():  # rank 0 downloads into the datasets cache, then the others read it there
            rows = datasets.load_dataset(name, split=split)
    else:
        rows = loaded if split is None else loaded[split]
    columns = rows.column_names
    default_column = next((c for c in CHAT_COLUMNS if c in columns), None)
    if default_column is None and (column is None and not sys.stdin.isatty()):
        raise InputError(f"{name}: no messages or conversations column (columns: {', '.join(columns)}); pass "
                         f"--dataset_column")
    if column is not None or default_column is None:  # a messages or conversations column needs no question
        default_column = _choose("column", columns, column, columns[0], "--dataset_column")
    single_file = local is not None and os.path.isfile(local)  # its one split, "train", is datasets' naming
    return rows, default_column, f"{name}[{split}]" if split and not single_file else name


def check_chat_rows(rows, column, label, seed):
    """A seeded sample of rows must be conversations; too many malformed ones stop the run naming the first."""
    sample = sorted(random.Random(seed).sample(range(len(rows)), min(CHECK_ROWS, len(rows))))
    bad = []
    for i, messages in zip(sample, rows.select(sample)[column]):
        try:
            validate_messages(messages, f"{label} row {i}")
        except InputError as e:
            bad.append(str(e))
    if len(bad) > MAX_BAD_SHARE * len(sample):
        raise InputError(f"{len(bad)} of {len(sample)} sampled rows of {label} are not conversations (lists of "
                         f"{{role, content}} strings, user and assistant alternating; rows counted from 0); the "
                         f"first: {bad[0]}")


def chat_rows(rows, column, label, num, seed, skip=0):
    """
    Conversations from a seeded shuffle of the rows: those at shuffled positions skip .. skip + num (training
    takes the first, evaluation the next ones). Malformed rows are skipped; returns (conversations, skipped
    messages).
    """
    order = random.Random(seed).sample(range(len(rows)), len(rows))[skip:skip + num]
    conversations, skipped = [], []
    for i, messages in zip(order, rows.select(order)[column]):
        try:
            conversations.append(validate_messages(messages, f"{label} row {i}"))
        except InputError as e:
            skipped.append(str(e))
    return conversations, skipped


class AllTokens:
    """The tokenizer as SFTLoader sees it with --completion_only_loss false: every next token is trained."""

    def __init__(self, tok):
        self.tok, self.bos_token_id = tok, tok.bos_token_id

    def render_conversation(self, messages, max_tokens):
        ids, _ = self.tok.render_conversation(messages, max_tokens)
        return ids, [1] * len(ids)
