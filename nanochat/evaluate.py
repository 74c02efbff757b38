"""
Generate chat responses in batches and score them with a task adapter (nanochat/tasks).

`generate_responses` renders each conversation up to a fresh <|assistant_start|>, samples through Engine.generate
in batches of `batch_size` prompts of similar length (a batch pads its prompts to its longest), and decodes each
completion up to (not including) <|assistant_end|> or <|bos|>. `evaluate_task` scores those responses with the
task's own `score`: choice tasks parse the first option letter of a free-form answer (no logit tricks, the model
must say the letter). A task with a `gold(item, response)` verdict (the synthetic world) also reports the mean gold
score, the share of responses carrying planted artifacts and the accuracy of every topic cluster.

Under torchrun each rank takes every world_size-th item; the results are gathered back into item order, so every
rank (rank 0 included) returns the same complete list. A single process is the normal case.
"""

from collections import defaultdict

import torch.distributed as dist

from nanochat.common import get_rank, get_world_size
from nanochat.engine import Engine
from nanochat.synthetic import CLUSTER_WEIGHTS


def _map_sharded(fn, items):
    """fn(list of this rank's items) -> one result per item, gathered back into item order on every rank."""
    rank, world_size = get_rank(), get_world_size()
    local = fn(items[rank::world_size])
    if world_size == 1:
        return local
    parts = [None] * world_size
    dist.all_gather_object(parts, local)
    results = [None] * len(items)
    for r, part in enumerate(parts):
        results[r::world_size] = part
    return results


def generate_responses(model, tok, conversations, max_new_tokens=64, batch_size=32, temperature=0.0, seed=0,
                       num_samples=1, top_k=None, top_p=None, min_p=None, decode_hook=None):
    """
    Responses to conversations (each ending in a user turn; a trailing assistant turn is dropped), as a flat
    prompt-major list: entry i * num_samples + j is sample j for conversation i. Greedy by default; the sampling
    filters and the decode hook (AutoDeco's per-token temperature) are Engine.generate's.
    """
    stop = [tok.encode_special("<|assistant_end|>"), tok.bos_token_id]
    prompts = [tok.render_for_completion(c) for c in conversations]
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]), default=None)
    # fail before hours of generation, not at the batch that holds the one long prompt
    if longest is not None and len(prompts[longest]) + max_new_tokens > model.rotary_len:
        raise ValueError(f"conversation {longest} renders to {len(prompts[longest])} tokens; with "
                         f"max_new_tokens={max_new_tokens} that exceeds the model's limit of {model.rotary_len}")
    engine = Engine(model)

    def generate(indexed_prompts):
        out = []
        for start in range(0, len(indexed_prompts), batch_size):
            batch = indexed_prompts[start:start + batch_size]
            # every batch its own random stream (offset by its first item's index), so sampling is reproducible
            gen = engine.generate([p for _, p in batch], num_samples=num_samples, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                  seed=seed + batch[0][0], stop_tokens=stop, decode_hook=decode_hook)
            texts = [tok.decode(c[:-1] if c and c[-1] in stop else c) for c in gen.completions()]
            out += [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(batch))]
        return out

    # shortest first, so each batch pads little: on 2 cores the diversity report's 7 runs x 400 responses took 24.5 s
    # in input order, 18.4 s sorted. A batch's random stream is offset by its first item's index in the input
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    per_item = _map_sharded(generate, [(i, prompts[i]) for i in order])
    in_order = [None] * len(prompts)
    for i, samples in zip(order, per_item):
        in_order[i] = samples
    return [text for samples in in_order for text in samples]


def _last_user_message(messages):
    return [m for m in messages if m["role"] == "user"][-1]["content"]


def evaluate_task(model, tok, task, items, max_new_tokens=64, batch_size=32, temperature=0.0, seed=0, num_samples=1,
                  top_k=None, top_p=None, min_p=None, decode_hook=None):
    """
    `num_samples` responses to each of a task's items (one greedy response by default), scored. Returns
    {"accuracy": mean score over all responses, "n" responses, "records": [{"item", "sample", "prompt", "response",
    "score", ...}]}, and with num_samples = k > 1 "pass@k", the share of items with at least one response scoring
    1 (maj@k and other per-item statistics follow from the records, grouped by "item"). A task with `gold` (the
    world) adds "score" (mean gold score), "correct", "artifact_rate" and "per_cluster" ({cluster: accuracy},
    densest first), and to each record its cluster, answer, gold score and artifact count.
    """
    gold = getattr(task, "gold", None)
    responses = generate_responses(model, tok, [item["messages"] for item in items], max_new_tokens, batch_size,
                                   temperature, seed, num_samples, top_k, top_p, min_p, decode_hook)
    sampled_items = [item for item in items for _ in range(num_samples)]
    # scoring can be slow too (HumanEval runs every program), so it is sharded like generation
    verdicts = _map_sharded(lambda pairs: [gold(i, r) if gold else task.score(i, r) for i, r in pairs],
                            list(zip(sampled_items, responses)))
    records = []
    for row, (item, response, verdict) in enumerate(zip(sampled_items, responses, verdicts)):
        record = {"item": row // num_samples, "sample": row % num_samples,
                  "prompt": _last_user_message(item["messages"]), "response": response}
        if gold:
            record.update(score=float(verdict["correct"]), cluster=item["cluster"], answer=item["answer"],
                          gold_score=verdict["score"], artifacts=verdict["artifacts"])
        else:
            record.update(score=verdict, **({"answer": item["answer"]} if "answer" in item else {}))
        records.append(record)
    n = len(records)
    result = {"accuracy": sum(r["score"] for r in records) / max(n, 1), "n": n}
    if num_samples > 1:
        solved = {r["item"] for r in records if r["score"] >= 1}
        result[f"pass@{num_samples}"] = len(solved) / max(len(items), 1)
    if gold:
        by_cluster = defaultdict(list)
        for r in records:
            by_cluster[r["cluster"]].append(r["score"])
        result.update(score=sum(r["gold_score"] for r in records) / max(n, 1), correct=result["accuracy"],
                      artifact_rate=sum(r["artifacts"] > 0 for r in records) / max(n, 1),
                      per_cluster={c: sum(by_cluster[c]) / len(by_cluster[c]) for c in CLUSTER_WEIGHTS
                                   if c in by_cluster})
    result["records"] = records
    return result
