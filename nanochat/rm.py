"""
Reward model: the SFT GPT with a scalar head, trained on preference pairs with the Bradley-Terry loss. Also the
preference-pair plumbing that DPO shares: rendering a reply, the validation split, global batches of pairs and
preference metrics.

Rendering. A (messages, reply) pair is the chat `messages + [{"role": "assistant", "content": reply}]` rendered by
`tok.render_conversation`: its ids end with <|assistant_end|>, and its mask is 1 on the reply's tokens and that
end token. A render longer than max_len keeps its last max_len - 1 tokens behind a fresh <|bos|>: the end of the
reply, and the question right before it, are what a reward or a log-prob is about, and the model has only ever
seen sequences that start with <|bos|>. A reply that alone is longer than max_len - 1 tokens loses its beginning.

Reward. The head reads the backbone's final normed hidden state at each row's last real token (the end token of
the reply). Rows are right-padded; attention is causal, so the pads after a row's end never reach it, and a row's
reward does not depend on what else is in its batch. The head starts at zero: every initial reward is 0 and the
initial loss exactly ln 2. It has no bias: the Bradley-Terry loss sees only differences of rewards, so a bias would
learn nothing but the centering term's offset. The backbone's LM head is dropped: a reward never reads the vocabulary.

Loss per pair: -log sigmoid(r_chosen - r_rejected) + center_coef * (r_chosen + r_rejected)^2. The second term is
reward centering (Eisenstein et al. 2023, "Helping or Herding?"): the Bradley-Terry loss leaves the level of the
rewards free, the term pins their mean near 0 so that rewards of different runs and prompts are comparable.

Accuracy counts a pair right when its margin r_chosen - r_rejected is > 0 and half right when it is exactly 0, so
a model that cannot tell the two replies apart (or two identical replies) scores exactly chance, 0.5.

GRPO scores the token ids it sampled, never a decoded and re-encoded text: `rewards_for_ids` takes rendered id
lists, each ending at its reply's end token.
"""

import hashlib
import os
from collections import defaultdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.checkpoint import CheckpointError, load_payload, load_weights
from nanochat.common import (InputError, add_common_flags, all_reduce_sum, autocast_ctx, fraction, get_rank,
                             get_world_size, nonnegative_float, nonnegative_int, positive_int, print0, str2bool)
from nanochat.density import density_rows, load_density, pair_weights, sample_indices
from nanochat.gpt import GPT, GPTConfig, remember_initial_lr
from nanochat.muon import Muon
from nanochat.pairs import read_pairs
from nanochat.training import optimizer_step

RM_KIND = "rm"
QUARTILES = ("q1 sparsest", "q2", "q3", "q4 densest")


# -----------------------------------------------------------------------------
# rendering and batching

def render_reply(tok, messages, reply, max_len=None):
    """(ids, mask) of the conversation `messages` answered by `reply`; cut from the left to max_len tokens."""
    ids, mask = tok.render_conversation(messages + [{"role": "assistant", "content": reply}], max_tokens=None)
    if max_len and len(ids) > max_len:
        ids = [tok.bos_token_id] + ids[len(ids) - max_len + 1:]
        mask = [0] + mask[len(mask) - max_len + 1:]
    return ids, mask


def render_pairs(tok, rows, max_len=None):
    """Renders of the chosen replies of `rows`, then of their rejected replies: 2 * len(rows) (ids, mask)."""
    return [render_reply(tok, row["messages"], row[side], max_len) for side in ("chosen", "rejected") for row in rows]


def micro_batches(tok, rows, pairs_per_batch, max_len=None):
    """
    Renders of pair rows cut into micro-batches of `pairs_per_batch` pairs, each laid out as its chosen renders then
    its rejected renders. Pairs are ordered by length first, so a micro-batch pads its rows to similar lengths; a
    step's summed loss does not depend on how its pairs are grouped.
    """
    pairs = [(render_reply(tok, row["messages"], row["chosen"], max_len),
              render_reply(tok, row["messages"], row["rejected"], max_len)) for row in rows]
    pairs.sort(key=lambda pair: max(len(pair[0][0]), len(pair[1][0])))
    chunks = [pairs[i:i + pairs_per_batch] for i in range(0, len(pairs), pairs_per_batch)]
    return [[chosen for chosen, _ in chunk] + [rejected for _, rejected in chunk] for chunk in chunks]


def collate_right(id_lists, device="cpu", pad_id=0):
    """Right-padded (B, T) ids and each row's last real position (B,). The pad id is never read."""
    lengths = [len(ids) for ids in id_lists]
    if min(lengths) == 0:
        raise ValueError("cannot score an empty token list")
    idx = torch.full((len(id_lists), max(lengths)), pad_id, dtype=torch.long)
    for i, ids in enumerate(id_lists):
        idx[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return idx.to(device), (torch.tensor(lengths) - 1).to(device)


# -----------------------------------------------------------------------------
# the model

class RewardModel(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.backbone.lm_head = None
        self.config = backbone.config  # save_checkpoint stores the backbone's config
        self.head = nn.Linear(backbone.config.n_embd, 1, bias=False)
        nn.init.zeros_(self.head.weight)

    def forward(self, idx, last):
        """Rewards (B,) fp32 of right-padded rows idx (B, T) whose last real tokens sit at positions `last`."""
        h = self.backbone.hidden_states(idx)
        h_last = h[torch.arange(idx.size(0), device=idx.device), last]
        return self.head(h_last).squeeze(-1).float()


def load_reward_model(path, device="cpu"):
    """A reward model from its checkpoint (a directory or ckpt.pt). Returns (model in eval mode, payload)."""
    payload = load_payload(path, device)
    if payload.get("kind") != RM_KIND:
        raise CheckpointError(f"checkpoint {payload['path']} holds a '{payload.get('kind', 'gpt')}' model, not a "
                              f"reward model (write one with python -m scripts.kat_train_rm)")
    rm = RewardModel(GPT(GPTConfig(**payload["config"]))).to(device)
    load_weights(rm, payload)
    rm.eval()
    return rm, payload


def setup_rm_optimizers(rm, matrix_lr, embedding_lr, head_lr, matrix_optimizer="muon"):
    """
    AdamW for the token embedding and the head; Muon (default) or AdamW for the backbone's matrices. Each param
    group remembers its `initial_lr` for the LR schedule.
    """
    adam_groups = [{"params": [rm.backbone.wte.weight], "lr": embedding_lr},
                   {"params": [rm.head.weight], "lr": head_lr}]
    matrices = list(rm.backbone.blocks.parameters())
    if matrix_optimizer == "muon":
        optimizers = [torch.optim.AdamW(adam_groups, betas=(0.9, 0.95), weight_decay=0.0),
                      Muon(matrices, lr=matrix_lr, momentum=0.95)]
    elif matrix_optimizer == "adamw":
        optimizers = [torch.optim.AdamW(adam_groups + [{"params": matrices, "lr": matrix_lr}], betas=(0.9, 0.95),
                                        weight_decay=0.0)]
    else:
        raise ValueError(f"matrix_optimizer must be muon or adamw, got {matrix_optimizer!r}")
    return remember_initial_lr(optimizers)


def bt_losses(r_chosen, r_rejected, center_coef=0.0):
    """Per-pair Bradley-Terry loss, plus the reward-centering term when center_coef > 0."""
    losses = -F.logsigmoid(r_chosen - r_rejected)
    if center_coef:
        losses = losses + center_coef * (r_chosen + r_rejected) ** 2
    return losses


def pair_correct(margins):
    """1 per pair with margin > 0, 0.5 per tie, 0 otherwise."""
    return (margins > 0).float() + 0.5 * (margins == 0).float()


@torch.no_grad()
def rewards_for_ids(rm, id_lists, batch_size=32):
    """
    Rewards (N,) fp32 on the CPU of token id lists, each already rendered and ending at its reply's end token (cut
    them with `render_reply`'s rule first if they exceed the model's context). Batches hold similar lengths.
    """
    device = next(rm.parameters()).device
    out = torch.empty(len(id_lists), dtype=torch.float32)
    order = sorted(range(len(id_lists)), key=lambda i: -len(id_lists[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        idx, last = collate_right([id_lists[i] for i in rows], device)
        with autocast_ctx(device):
            out[torch.tensor(rows)] = rm(idx, last).cpu()
    return out


def score(rm, tok, conversations_and_replies, batch_size=32, max_len=None):
    """Rewards (N,) of (messages, reply) tuples."""
    rendered = [render_reply(tok, messages, reply, max_len)[0] for messages, reply in conversations_and_replies]
    return rewards_for_ids(rm, rendered, batch_size)


@torch.no_grad()
def pair_margins(rm, tok, rows, batch_size=32, max_len=None):
    """
    Margins r_chosen - r_rejected (N,) of pair rows. A pair's two replies are scored side by side in one batch, as
    in training, so identical replies get identical rewards to the bit. Under torchrun each rank scores every
    world_size-th pair and the margins are summed over ranks into place, so every rank returns all of them.
    """
    rank, world_size = get_rank(), get_world_size()
    device = next(rm.parameters()).device
    margins = torch.zeros(len(rows), dtype=torch.float32, device=device)
    local = list(range(rank, len(rows), world_size))
    rendered = {i: (render_reply(tok, rows[i]["messages"], rows[i]["chosen"], max_len)[0],
                    render_reply(tok, rows[i]["messages"], rows[i]["rejected"], max_len)[0]) for i in local}
    local.sort(key=lambda i: -max(map(len, rendered[i])))  # similar lengths together: little padding
    pairs_per_batch = max(1, batch_size // 2)
    for start in range(0, len(local), pairs_per_batch):
        batch = local[start:start + pairs_per_batch]
        idx, last = collate_right([rendered[i][0] for i in batch] + [rendered[i][1] for i in batch], device)
        with autocast_ctx(device):
            rewards = rm(idx, last)
        margins[batch] = rewards[:len(batch)] - rewards[len(batch):]
    return all_reduce_sum(margins).cpu()


def rm_train_step(rm, optimizers, micro_batches, global_pairs, center_coef=0.0, grad_clip=1.0):
    """
    One optimizer step over this rank's micro-batches [(idx, last)], each holding n chosen rows then their n
    rejected rows. Every loss is divided by the global number of pairs and gradients are summed over ranks, so N
    ranks compute the 1-rank gradient of the same global batch. Returns the global batch's loss, accuracy, mean
    margin and the gradient norm.
    """
    device = micro_batches[0][0].device
    sums = torch.zeros(3, device=device)  # loss, correct, margin
    for idx, last in micro_batches:
        with autocast_ctx(device):
            rewards = rm(idx, last)
        n = rewards.size(0) // 2
        losses = bt_losses(rewards[:n], rewards[n:], center_coef)
        (losses.sum() / global_pairs).backward()
        margins = (rewards[:n] - rewards[n:]).detach()
        sums += torch.stack([losses.detach().sum(), pair_correct(margins).sum(), margins.sum()])
    grad_norm = optimizer_step(rm, optimizers, grad_clip)
    loss, accuracy, margin = (all_reduce_sum(sums) / global_pairs).tolist()
    return {"loss": loss, "accuracy": accuracy, "margin": margin, "grad_norm": grad_norm}


# -----------------------------------------------------------------------------
# pairs: split, sampling, density

def split_by_prompt(rows, share, seed):
    """
    (train, val) rows: a seeded hash coin per prompt_id puts a `share` of the conversations, with all their pairs,
    into val, so no prompt is on both sides. The salt differs from the train/test split of nanochat/pairs.py,
    which has already removed its own held-out prompts from pairs_all.jsonl.
    """
    train, val = [], []
    for row in rows:
        h = int(hashlib.sha256(f"rm-val-{seed}-{row['prompt_id']}".encode()).hexdigest()[:15], 16)
        (val if h < share * 16 ** 15 else train).append(row)
    return train, val


def density_pair_weights(rows, density_path):
    """Per-row sampling weights: each prompt's density weight, shared evenly among the rows of the prompt."""
    return pair_weights([row["prompt_id"] for row in rows], load_density(density_path))


def pair_batch(step, num_rows, batch_size, seed, weights=None):
    """
    The global batch of row indices for optimizer step `step`, a pure function of (seed, step): every rank draws
    the same one, and --resume needs no sampler state. Uniform (weights None): walks seeded permutations of all
    rows, epoch after epoch, so every pair is seen once per epoch. Density-aware: `batch_size` draws with
    replacement, probability proportional to `weights`, from a generator seeded by (seed, step).
    """
    if weights is not None:
        stream_seed = int(np.random.SeedSequence([seed, step]).generate_state(1)[0])
        return sample_indices(weights, batch_size, torch.Generator().manual_seed(stream_seed)).tolist()
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos + len(out), num_rows)
        permutation = np.random.default_rng([seed, epoch]).permutation(num_rows)
        out += permutation[offset:offset + batch_size - len(out)].tolist()
    return out


def read_densities(path):
    """{prompt_id: density} of a density.jsonl (scripts.kat_density), its rows checked as load_density checks them."""
    densities = {}
    for lineno, row in density_rows(path):
        if not isinstance(row.get("density"), (int, float)):
            raise ValueError(f"{path} line {lineno}: field 'density' must be a number")
        densities[row["prompt_id"]] = float(row["density"])
    return densities


# -----------------------------------------------------------------------------
# what the preference stages (scripts/kat_train_rm.py, scripts/kat_train_dpo.py) share: flags and data

def add_pair_flags(parser):
    """Flags shared by the preference stages (RM and DPO)."""
    parser.add_argument("--sft_ckpt_path", type=str, default="outs/sft/ckpt.pt", help="the model to start from")
    parser.add_argument("--pairs_path", type=str, default=".cache/data/pairs_all.jsonl")
    parser.add_argument("--test_pairs_path", type=str, default=".cache/data/pairs_test.jsonl",
                        help="held-out pairs evaluated at the end (skipped with a note when missing)")
    parser.add_argument("--density_path", type=str, default=".cache/data/density.jsonl")
    parser.add_argument("--val_share", type=fraction, default=0.05, help="share of prompt ids held out for validation")
    parser.add_argument("--max_len", type=nonnegative_int, default=0,
                        help="tokens per reply render, cut from the left (0: the SFT model's context length)")
    parser.add_argument("--warmup_steps", type=nonnegative_int, default=10)
    parser.add_argument("--grad_clip", type=nonnegative_float, default=1.0, help="0 disables clipping")
    parser.add_argument("--eval_every", type=nonnegative_int, default=50,
                        help="validation every N steps (0: only at the end)")
    parser.add_argument("--eval_batch_size", type=positive_int, default=64, help="rows per evaluation forward")
    parser.add_argument("--save_every", type=nonnegative_int, default=100, help="resume state every N steps (0: never)")
    parser.add_argument("--log_every", type=positive_int, default=10)
    parser.add_argument("--resume", type=str2bool, default=False, help="continue from the output directory")
    add_common_flags(parser)
    return parser


def load_pair_data(args, world_size):
    """(train rows, val rows, test rows or None, per-row training weights or None), with checks and notes."""
    if args.batch_size_pairs % (args.device_batch_size * world_size):
        raise InputError(f"--batch_size_pairs={args.batch_size_pairs} must be a multiple of --device_batch_size x "
                         f"world size = {args.device_batch_size * world_size}")
    rows, log = read_pairs(args.pairs_path, "--pairs_path")
    if log.total():
        print0(log.note(args.pairs_path))
    train, val = split_by_prompt(rows, args.val_share, args.seed)
    if not train:
        raise InputError(f"{args.pairs_path}: no usable training pairs")
    test = None
    if args.test_pairs_path and os.path.exists(args.test_pairs_path) and os.path.getsize(args.test_pairs_path):
        test, test_log = read_pairs(args.test_pairs_path, "--test_pairs_path")
        if test_log.total():
            print0(test_log.note(args.test_pairs_path))
    elif args.test_pairs_path:
        print0(f"note: {args.test_pairs_path} is missing or empty; no test evaluation")
    weights = None
    if args.density_aware:
        try:
            weights = density_pair_weights(train, args.density_path)
        except InputError as e:
            raise InputError(f"--density_aware: {e} (write it with python -m scripts.kat_density, or pass "
                             f"--density_aware=False)") from e
    print0(f"{len(rows)} pairs: {len(train)} training, {len(val)} validation ({args.val_share:.0%} of prompt ids); "
           f"{len(test) if test is not None else 0} test; sampling "
           f"{'by density weight' if weights is not None else 'uniform'}")
    return train, val, test, weights


# -----------------------------------------------------------------------------
# metrics

def _summary(margins):
    return {"accuracy": pair_correct(margins).mean().item(), "mean_margin": margins.mean().item(),
            "n": len(margins)}


def preference_metrics(margins, rows, densities=None):
    """
    Accuracy and mean margin of pairs, overall and by src, cluster and rejected_kind (when rows carry them), and
    by quartile of their prompt's density (q1 sparsest .. q4 densest) over the rows whose prompt has a density.
    """
    margins = margins.float().cpu()
    metrics = _summary(margins)
    for field in ("src", "cluster", "rejected_kind"):
        groups = defaultdict(list)
        for i, row in enumerate(rows):
            if field in row:
                groups[row[field]].append(i)
        if groups:
            metrics[f"by_{field}"] = {k: _summary(margins[v]) for k, v in sorted(groups.items())}
    if densities:
        known = [i for i, row in enumerate(rows) if row["prompt_id"] in densities]
        metrics["density_coverage"] = len(known) / max(len(rows), 1)
        if len(known) >= 4:
            d = torch.tensor([densities[rows[i]["prompt_id"]] for i in known], dtype=torch.float64)
            edges = torch.quantile(d, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
            quartile = torch.bucketize(d, edges, right=True)
            known = torch.tensor(known)
            metrics["by_density_quartile"] = {label: _summary(margins[known[quartile == q]])
                                              for q, label in enumerate(QUARTILES) if (quartile == q).any()}
    return metrics


def metrics_table(metrics):
    """A plain-text table of preference_metrics: one line per group."""
    lines = [f"{'group':<36} {'n':>6} {'accuracy':>9} {'margin':>9}",
             f"{'all':<36} {metrics['n']:>6} {metrics['accuracy']:>9.4f} {metrics['mean_margin']:>9.4f}"]
    for key, groups in metrics.items():
        if key.startswith("by_"):
            for name, m in groups.items():
                label = f"{key[3:]}={name}"
                lines.append(f"{label:<36} {m['n']:>6} {m['accuracy']:>9.4f} {m['mean_margin']:>9.4f}")
    if "density_coverage" in metrics:
        lines.append(f"(density known for {metrics['density_coverage']:.1%} of the pairs)")
    return "\n".join(lines)


def flat_metrics(metrics, prefix):
    """preference_metrics flattened into scalar entries for meta.json and the report."""
    flat = {f"{prefix}/accuracy": metrics["accuracy"], f"{prefix}/mean_margin": metrics["mean_margin"],
            f"{prefix}/n": metrics["n"]}
    for key, groups in metrics.items():
        if key.startswith("by_"):
            for name, m in groups.items():
                flat[f"{prefix}/{key[3:]}={name}/accuracy"] = m["accuracy"]
    return flat
