"""
Reward model: the SFT GPT with a scalar head, trained on preference pairs with the Bradley-Terry loss, and the
numbers it reports. Pairs are rendered and batched by nanochat/preference.py, which DPO shares.

Reward. The head reads the backbone's final normed hidden state at each row's last real token, the
<|assistant_end|> of the final reply (earlier turns are context only). Rows are right-padded; attention is causal,
so the pads after a row's end never reach it, and a row's reward does not depend on what else is in its batch.
Training and the pair evaluation run each pair's prompt once and both replies from its keys/values (pair batches,
nanochat/preference.py), and the last block runs only the query the head reads (GPT.hidden_states' `at`). The
head starts at zero: every initial reward is 0 and the initial loss exactly ln 2. It has no bias: the Bradley-Terry
loss sees only differences of rewards, so a bias would learn nothing but the centering term's offset. The
backbone's LM head is dropped: a reward never reads the vocabulary.

Loss per pair: -log sigmoid(r_chosen - r_rejected) + center_coef * (r_chosen + r_rejected)^2. The second term is
reward centering (Eisenstein et al. 2023, "Helping or Herding?"): the Bradley-Terry loss leaves the level of the
rewards free, the term pins their mean near 0 so that rewards of different runs and prompts are comparable.

Accuracy and mean margin are reported overall and by source, cluster, rejected kind and density quartile
(`preference_metrics`); a tie counts 0, as TRL (`nanochat.preference.pair_correct`). Length control: accuracy on
the pairs whose chosen reply is shorter (in characters) than the rejected one, on those where it is longer, and
their mean, the length-balanced accuracy. A reward that only prefers short replies scores ~1 and ~0 on the two
splits, 0.5 balanced, however much of the overall accuracy it wins; pairs of equal length are in neither split.

GRPO scores the token ids it sampled, never a decoded and re-encoded text: `rewards_for_ids` takes rendered id
lists, each ending at its reply's end token.
"""

from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.batching import collate_right
from nanochat.checkpoint import CheckpointError, load_payload, load_weights
from nanochat.common import all_reduce_sum, autocast_ctx, get_rank, get_world_size
from nanochat.gpt import GPT, GPTConfig, remember_initial_lr
from nanochat.muon import Muon
from nanochat.grpo import completion_rewards
from nanochat.preference import pack_pairs, pair_correct, render_reply, split_pair
from nanochat.training import optimizer_step

RM_KIND = "rm"
QUARTILES = ("q1 sparsest", "q2", "q3", "q4 densest")
LENGTH_SPLITS = ("chosen_shorter", "chosen_longer")


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
        return self.head(self.backbone.hidden_states(idx, at=last)).squeeze(-1).float()


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


def freeze_lower_blocks(rm, train_layers):
    """
    Train only the top `train_layers` blocks and the head (0: every parameter): the token embedding and the blocks
    below keep the SFT model's weights. Nothing below the lowest trained block needs a gradient, so backward stops
    there. Returns the number of trained parameters.
    """
    n_layer = len(rm.backbone.blocks)
    if not 0 <= train_layers <= n_layer:
        raise ValueError(f"train_layers={train_layers}: the model has {n_layer} blocks (0 trains them all)")
    if train_layers:
        rm.backbone.wte.requires_grad_(False)
        for block in rm.backbone.blocks[:n_layer - train_layers]:
            block.requires_grad_(False)
    return sum(p.numel() for p in rm.parameters() if p.requires_grad)


def setup_rm_optimizers(rm, matrix_lr, embedding_lr, head_lr, matrix_optimizer="muon"):
    """
    AdamW for the token embedding and the head; Muon (default) or AdamW for the backbone's matrices; frozen
    parameters (`freeze_lower_blocks`) in none. Each param group remembers its `initial_lr` for the LR schedule.
    """
    adam_groups = [{"params": [rm.backbone.wte.weight], "lr": embedding_lr},
                   {"params": [rm.head.weight], "lr": head_lr}]
    adam_groups = [group for group in adam_groups if group["params"][0].requires_grad]
    matrices = [p for p in rm.backbone.blocks.parameters() if p.requires_grad]
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


@torch.no_grad()
def rewards_for_ids(rm, id_lists, batch_size=32):
    """
    Rewards (N,) fp32 on the CPU of token id lists, each already rendered and ending at its reply's end token (cut
    them with nanochat.batching.cut_left first if they exceed the model's context). Batches hold similar lengths.
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


def pair_rewards(rm, batch):
    """(P, 2) rewards of a pair GroupBatch (nanochat/preference.py): each pair's chosen, then rejected reply."""
    return completion_rewards(rm, batch).view(-1, 2)


@torch.no_grad()
def pair_margins(rm, tok, rows, batch_size=32, max_len=None):
    """
    Margins r_chosen - r_rejected (N,) of pair rows. A pair's two replies are scored side by side from one prompt
    pass, as in training, so identical replies get identical rewards to the bit. Under torchrun each rank scores
    every world_size-th pair and the margins are summed over ranks into place, so every rank returns all of them.
    """
    rank, world_size = get_rank(), get_world_size()
    device = next(rm.parameters()).device
    margins = torch.zeros(len(rows), dtype=torch.float32, device=device)
    local = list(range(rank, len(rows), world_size))
    pairs = {i: split_pair(tok, rows[i], max_len) for i in local}
    local.sort(key=lambda i: -len(pairs[i][0]) - max(map(len, pairs[i][1])))  # similar lengths together
    pairs_per_batch = max(1, batch_size // 2)
    for start in range(0, len(local), pairs_per_batch):
        batch = local[start:start + pairs_per_batch]
        rewards = pair_rewards(rm, pack_pairs([pairs[i] for i in batch], device))
        margins[batch] = rewards[:, 0] - rewards[:, 1]
    return all_reduce_sum(margins).cpu()


def rm_train_step(rm, optimizers, micro_batches, global_pairs, center_coef=0.0, grad_clip=1.0):
    """
    One optimizer step over this rank's micro-batches of pairs (GroupBatches of nanochat.preference.micro_batches).
    Every loss is divided by the global number of pairs and gradients are summed over ranks, so N ranks compute the
    1-rank gradient of the same global batch. Returns the global batch's loss, accuracy, mean margin and the
    gradient norm.
    """
    device = micro_batches[0].prompt_ids.device
    sums = torch.zeros(3, device=device)  # loss, correct, margin
    for batch in micro_batches:
        rewards = pair_rewards(rm, batch)
        losses = bt_losses(rewards[:, 0], rewards[:, 1], center_coef)
        (losses.sum() / global_pairs).backward()
        margins = (rewards[:, 0] - rewards[:, 1]).detach()
        sums += torch.stack([losses.detach().sum(), pair_correct(margins).sum(), margins.sum()])
    grad_norm = optimizer_step(rm, optimizers, grad_clip)
    loss, accuracy, margin = (all_reduce_sum(sums) / global_pairs).tolist()
    return {"loss": loss, "accuracy": accuracy, "margin": margin, "grad_norm": grad_norm}


# -----------------------------------------------------------------------------
# metrics

def _summary(margins):
    return {"accuracy": pair_correct(margins).mean().item(), "mean_margin": margins.mean().item(),
            "n": len(margins)}


def preference_metrics(margins, rows, densities=None):
    """
    Accuracy and mean margin of pairs, overall and by src, cluster and rejected_kind (when rows carry them); by
    length (chosen reply shorter or longer than the rejected one, in characters) with the length-balanced accuracy
    (the mean of the two splits' accuracies, when both have pairs) and the number of pairs of equal length; and by
    quartile of their prompt's density (q1 sparsest .. q4 densest) over the rows whose prompt has a density.
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
    longer = [(len(row["chosen"]) > len(row["rejected"])) - (len(row["chosen"]) < len(row["rejected"])) for row in rows]
    splits = {name: [i for i, sign in enumerate(longer) if sign == side] for name, side in zip(LENGTH_SPLITS, (-1, 1))}
    metrics["by_length"] = {name: _summary(margins[index]) for name, index in splits.items() if index}
    metrics["length_ties"] = longer.count(0)
    if len(metrics["by_length"]) == 2:
        metrics["length_balanced_accuracy"] = sum(m["accuracy"] for m in metrics["by_length"].values()) / 2
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
    if "length_balanced_accuracy" in metrics:
        n = sum(m["n"] for m in metrics["by_length"].values())
        lines.append(f"{'length-balanced (mean of the 2)':<36} {n:>6} {metrics['length_balanced_accuracy']:>9.4f}")
    lines.append(f"({metrics['length_ties']} pairs with replies of equal length are in neither length split)")
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
    for name, m in metrics["by_length"].items():
        flat[f"{prefix}/length={name}/n"] = m["n"]
    flat[f"{prefix}/length_ties"] = metrics["length_ties"]
    if "length_balanced_accuracy" in metrics:
        flat[f"{prefix}/length_balanced_accuracy"] = metrics["length_balanced_accuracy"]
    return flat
