"""
Direct Preference Optimization (Rafailov et al. 2023) and two variants of its loss, against a frozen reference.

Log-probs. A reply's log-prob is the sum of log p(token | everything before it) over the reply's target tokens
only: the final reply and its <|assistant_end|>, never an earlier turn (see nanochat/preference.py for rendering
and the max_len cut). Prompt tokens never count. A pair's prompt runs once and its chosen and rejected replies
continue from the prompt's keys/values (pair batches, nanochat/preference.py; `completion_logprobs` of
nanochat/grpo.py), the same numbers as two full forwards at three quarters of the tokens when prompt and reply are
equally long.

Losses, with h = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected)):
    sigmoid  -log sigmoid(beta h)             DPO, summed log-probs
    ipo      (h - 1 / (2 beta))^2             IPO (Azar et al. 2023), log-probs averaged per reply token
    hinge    max(0, 1 - beta h)               SLiC (Zhao et al. 2023), summed log-probs
IPO averages as the IPO paper's experiments and TRL do, so its beta means what it means there (a summed h grows
with the reply's length, and 1 / (2 beta) would be a target on a different scale). As in TRL the averaged log-probs
then also make IPO's rewards/* and logps/* metrics. At the first step the policy is the reference, so h is exactly
0 and the sigmoid loss is exactly ln 2.

Metrics use TRL's names: rewards/chosen = beta (log pi(chosen) - log ref(chosen)), rewards/rejected likewise,
rewards/margins = rewards/chosen - rewards/rejected, rewards/accuracies = share of pairs with a margin > 0 (a tie
counts 0, so step 0 logs 0, as TRL).

Held-out evaluation (`preference_eval`): the policy's own preference, the share of pairs whose chosen reply has the
higher mean log-prob per reply token (a tie counts 0). Unlike the implicit reward it says something about the SFT
model too (the implicit margin of the reference against itself is 0 on every pair, an implicit accuracy of 0), so
SFT and DPO compare directly.
Per token, because a summed log-prob mostly measures length: a synthetic artifact rejection is the chosen reply
plus extra words, so any model "prefers" the chosen one by its sum (the SFT model on 100% of them). The summed
accuracy and, for DPO, the implicit-reward accuracy are reported beside it.
"""

import torch
import torch.nn.functional as F

from nanochat.batching import IGNORE_INDEX
from nanochat.common import all_reduce_sum, autocast_ctx, get_rank, get_world_size
from nanochat.evaluate import evaluate_task
from nanochat.grpo import completion_logprobs
from nanochat.preference import pack_pairs, pair_correct, split_pair
from nanochat.tasks import world as world_task
from nanochat.training import optimizer_step

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def sequence_logprobs(model, inputs, targets):
    """(B,) fp32: each row's summed log-probability of its targets (those not IGNORE_INDEX)."""
    keep = targets != IGNORE_INDEX
    with autocast_ctx(inputs.device):
        # the LM head and the softmax over the vocabulary run only where a target is scored
        logits = model.logits_from_hidden(model.hidden_states(inputs)[keep])
    token_logprobs = -F.cross_entropy(logits, targets[keep], reduction="none")
    rows = torch.arange(inputs.size(0), device=inputs.device)[:, None].expand_as(targets)[keep]
    return torch.zeros(inputs.size(0), device=inputs.device).index_add(0, rows, token_logprobs.float())


def pair_logps(model, batch):
    """(P, 2) summed log-probs of each pair's chosen and rejected reply in a pair GroupBatch, one forward."""
    return completion_logprobs(model, batch).sum(1).view(-1, 2)


def dpo_losses(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid"):
    """
    Per-pair losses, and the implicit rewards of the chosen and rejected replies (detached), of log-probs as the
    loss takes them: summed, or for IPO averaged per reply token (dpo_train_step averages them).
    """
    h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return losses, beta * (pi_chosen - ref_chosen).detach(), beta * (pi_rejected - ref_rejected).detach()


def dpo_train_step(policy, reference, optimizers, micro_batches, global_pairs, beta=0.1, loss_type="sigmoid",
                   grad_clip=1.0):
    """
    One optimizer step over this rank's micro-batches of pairs (GroupBatches of nanochat.preference.micro_batches).
    Losses are divided by the global number of pairs and gradients summed over ranks (the 1-rank gradient of the
    global batch). Returns the global batch's loss and TRL-named metrics, and the gradient norm. IPO's log-probs are
    averaged per reply token, the others' summed.
    """
    device = micro_batches[0].prompt_ids.device
    sums = torch.zeros(7, device=device)
    for batch in micro_batches:
        with torch.no_grad():
            ref = pair_logps(reference, batch)
        pi = pair_logps(policy, batch)
        if loss_type == "ipo":
            # IPO's target 1 / (2 beta) is on the per-token scale (the IPO paper's runs, TRL), not a length's multiple
            tokens = batch.completion_mask.sum(1).view(-1, 2)
            pi, ref = pi / tokens, ref / tokens
        losses, chosen, rejected = dpo_losses(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], beta, loss_type)
        (losses.sum() / global_pairs).backward()
        margins = chosen - rejected
        sums += torch.stack([losses.detach().sum(), chosen.sum(), rejected.sum(), margins.sum(),
                             pair_correct(margins).sum(), pi[:, 0].detach().sum(), pi[:, 1].detach().sum()])
    grad_norm = optimizer_step(policy, optimizers, grad_clip)
    means = (all_reduce_sum(sums) / global_pairs).tolist()
    names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected")
    return {**dict(zip(names, means)), "grad_norm": grad_norm}


@torch.no_grad()
def pair_logprobs(model, tok, rows, batch_size=32, max_len=None):
    """
    {"chosen", "rejected": summed reply log-probs (N,), "chosen_tokens", "rejected_tokens": scored tokens (N,)} of
    pair rows. Under torchrun each rank takes every world_size-th row and the results are summed over ranks into
    place, so every rank returns all of them.
    """
    rank, world_size = get_rank(), get_world_size()
    device = next(model.parameters()).device
    out = torch.zeros(4, len(rows), device=device)
    local = list(range(rank, len(rows), world_size))
    for start in range(0, len(local), batch_size):
        batch = local[start:start + batch_size]
        groups = pack_pairs([split_pair(tok, rows[i], max_len) for i in batch], device)
        logprobs, tokens = pair_logps(model, groups), groups.completion_mask.sum(1).view(-1, 2).float()
        out[:, batch] = torch.stack([logprobs[:, 0], logprobs[:, 1], tokens[:, 0], tokens[:, 1]])
    return dict(zip(("chosen", "rejected", "chosen_tokens", "rejected_tokens"), all_reduce_sum(out).cpu()))


def preference_eval(policy, reference=None, beta=0.1):
    """
    Held-out preference metrics from pair_logprobs results: accuracy of the mean log-prob per reply token (the
    headline), of the summed log-prob, and with a reference the implicit-reward accuracy and mean margin.
    """
    per_token = policy["chosen"] / policy["chosen_tokens"] - policy["rejected"] / policy["rejected_tokens"]
    summed = policy["chosen"] - policy["rejected"]
    metrics = {"accuracy": pair_correct(per_token).mean().item(), "summed_accuracy": pair_correct(summed).mean().item(),
               "n": len(summed)}
    if reference is not None:
        margins = beta * (summed - (reference["chosen"] - reference["rejected"]))
        metrics.update(implicit_accuracy=pair_correct(margins).mean().item(), implicit_margin=margins.mean().item())
    return metrics


def world_eval(model, tok, world_seed, world_size, num_questions, temperature=0.7, seed=0, max_new_tokens=64,
               batch_size=32):
    """
    Sampled answers to the synthetic world's held-out questions, gold-scored: the share correct, the mean gold
    score and the artifact rate (share of answers with at least one planted artifact).
    """
    items = world_task.load(limit=num_questions, seed=world_seed, size=world_size)
    result = evaluate_task(model, tok, world_task, items, max_new_tokens, batch_size, temperature, seed)
    return {"correct": result["correct"], "gold_score": result["score"], "artifact_rate": result["artifact_rate"],
            "n": result["n"], "records": result["records"]}
