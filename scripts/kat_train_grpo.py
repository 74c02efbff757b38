"""
GRPO on the preference prompts, with density-aware prompt sampling (the default) or uniform sampling.

    python -m scripts.kat_train_grpo                              # density-aware -> outs/grpo_density_s42/
    python -m scripts.kat_train_grpo --density_aware=False --seed=1   # uniform baseline -> outs/grpo_baseline_s1/
    torchrun --standalone --nproc_per_node=8 -m scripts.kat_train_grpo -- --prompts_per_step=64
    python -m scripts.kat_train_grpo --resume                     # continue after an interruption

Each step samples `--prompts_per_step` prompts with replacement: by the weights of --density_path when
density-aware (written by scripts.kat_density from the embeddings of this --sft_ckpt_path, which is checked), with
equal weights otherwise, so the two arms differ only in the weights. Then it samples `--num_generations`
completions per prompt, scores them with the reward model on the sampled ids, normalises rewards within each
prompt's group and takes `--num_iterations` clipped policy-gradient steps with a `--beta`-weighted KL penalty to
the frozen SFT model (nanochat/grpo.py has the formulas). Under torchrun each rank samples and scores its share of
the prompts; gradients are summed over ranks. Training seeds are the
experiment's replicates: speedrun.sh trains each arm with SEEDS seeds, into outs/grpo_<arm>_s<seed>/. Each run
writes drawn_prompts.json: how often it drew prompts of each training-density quartile and cluster.

Held-out evaluation at the start, every `--eval_every` steps and at the end: `--eval_samples` answers to each of
`--eval_prompts` prompts of pairs_test.jsonl (a fixed sample stratified by source, the same for every seed), sampled
at `--eval_temperature` with the same seed every time (so two evaluations differ only by the policy), their mean
reward and, for synthetic prompts, the world's gold score and planted-artifact rate (the check against reward
hacking). Sampled rather than greedy on purpose: SFT puts its artifacts in the tail of its distribution, where
greedy decoding never goes, and that tail is what GRPO trims.
"""

import argparse
import os
from collections import Counter

import torch

from nanochat.batching import cut_left
from nanochat.checkpoint import check_same_tokenizer, load_model, load_tokenizer, tokenizer_dir
from nanochat.common import (InputError, add_common_flags, all_reduce_sum, atomic_write_json, check_completion_budget,
                             dist_cleanup, dist_init, nonnegative_float, nonnegative_int, open_fraction, parse_flags,
                             positive_float, positive_int, print0, run_script, seed_everything, str2bool)
from nanochat.density import (QUARTILES, check_density_model, load_density, pair_weights, read_quartiles,
                              sample_indices, weight_stats)
from nanochat.engine import Engine
from nanochat.gpt import lr_multiplier, remember_initial_lr, set_lr
from nanochat.grpo import GRPOConfig, group_rewards, grpo_step
from nanochat.pairs import extract_prompts, heldout_sample, read_pairs
from nanochat.rm import load_reward_model, rewards_for_ids
from nanochat.stage import Stage


EVAL_CHUNK = 32  # held-out prompts per generate call in the evaluation


def group_size(text):
    """--num_generations: one completion has no group to be compared with (its advantage would be 0/0)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2 (completions per prompt), got {text!r}")
    return value


def step_seed(seed, step):
    """The seed of a step's prompt draw and sampling: every rank draws the same batch, and --resume needs no RNG."""
    return seed * 1_000_003 + step


def draw_prompts(weights, n, seed, step):
    """The step's global prompt batch: n indices drawn with replacement by weight, a pure function of (seed, step)."""
    return sample_indices(weights, n, torch.Generator().manual_seed(step_seed(seed, step)))


def drawn_prompts(ids, quartile_of, cluster_of):
    """drawn_prompts.json: how many of the drawn prompt ids fall in each training-density quartile and cluster."""
    by_quartile, by_cluster = Counter(), Counter()
    for i in ids:
        if i in quartile_of:
            by_quartile[quartile_of[i]] += 1
        if i in cluster_of:
            by_cluster[cluster_of[i]] += 1
    return {"draws": len(ids), "distinct_prompts": len(set(ids)),
            "by_quartile": {q: by_quartile[q] for q in QUARTILES} if quartile_of else {},
            "by_cluster": dict(by_cluster.most_common())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft_ckpt_path", type=str, default="outs/sft/ckpt.pt", help="policy init and reference")
    parser.add_argument("--rm_ckpt_path", type=str, default="outs/rm/ckpt.pt")
    parser.add_argument("--pairs_path", type=str, default=".cache/data/pairs_all.jsonl", help="training prompts")
    parser.add_argument("--test_pairs_path", type=str, default=".cache/data/pairs_test.jsonl",
                        help="held-out prompts for evaluation")
    parser.add_argument("--density_aware", type=str2bool, default=True, help="sample prompts by inverse density")
    parser.add_argument("--density_path", type=str, default=".cache/data/density.jsonl",
                        help="weights and quartiles of the training prompts (python -m scripts.kat_density)")
    parser.add_argument("--prompts_per_step", type=positive_int, default=16)
    parser.add_argument("--num_generations", type=group_size, default=8,
                        help="G: completions per prompt (at least 2: advantages compare a completion to its group)")
    parser.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature (> 0)")
    parser.add_argument("--top_k", type=positive_int, default=None)
    parser.add_argument("--max_new_tokens", type=positive_int, default=64,
                        help="completion budget; at most half of the model's context (the rest is the prompt's)")
    parser.add_argument("--scale_rewards", type=str, default="group", choices=["group", "none"])
    parser.add_argument("--clip_eps", type=open_fraction, default=0.2,
                        help="clip range of the ratio: [1 - clip_eps, 1 + clip_eps]")
    parser.add_argument("--epsilon_high", type=positive_float, default=None,
                        help="upper clip instead of clip_eps (DAPO's clip-higher, e.g. 0.28)")
    parser.add_argument("--mask_truncated_completions", type=str2bool, default=True,
                        help="completions cut by --max_new_tokens are scored but enter no loss (their reward is "
                             "read at a token the reward model was never trained on)")
    parser.add_argument("--num_iterations", type=positive_int, default=1, help="optimisation passes per sampled batch")
    parser.add_argument("--beta", type=nonnegative_float, default=0.04,
                        help="weight of the KL penalty to the SFT model")
    parser.add_argument("--loss_type", type=str, default="token", choices=["token", "sequence"])
    parser.add_argument("--max_steps", type=positive_int, default=50)
    parser.add_argument("--learning_rate", type=positive_float, default=1e-4)
    parser.add_argument("--warmup_steps", type=nonnegative_int, default=5)
    parser.add_argument("--grad_clip", type=nonnegative_float, default=1.0, help="0 disables clipping")
    parser.add_argument("--device_batch_size", type=positive_int, default=32,
                        help="rows per forward/backward, in whole groups (at least one prompt's G rows)")
    parser.add_argument("--compile", type=str2bool, default=False,
                        help="run the log-prob tail of the policy and reference passes as the plain ops through "
                             "torch.compile instead of the hand-fused tail (GPT.token_logprobs): no gain on 2 CPU "
                             "cores, not measured on a GPU (needs a C++ compiler, ~20 s to compile)")
    parser.add_argument("--save_every", type=nonnegative_int, default=25, help="resume state every N steps (0: never)")
    parser.add_argument("--eval_every", type=nonnegative_int, default=25,
                        help="evaluation every N steps (0: at the start and the end only)")
    parser.add_argument("--eval_prompts", type=positive_int, default=128, help="held-out prompts per evaluation")
    parser.add_argument("--eval_samples", type=positive_int, default=2, help="answers per held-out prompt")
    parser.add_argument("--eval_temperature", type=nonnegative_float, default=1.0, help="0 for greedy answers")
    parser.add_argument("--resume", type=str2bool, default=False)
    parser.add_argument("--out_dir", type=str, default=None,
                        help="default outs/grpo_density_s<seed> or outs/grpo_baseline_s<seed>, by --density_aware")
    add_common_flags(parser)
    args = parse_flags(parser, argv)
    args.out_dir = args.out_dir or f"outs/grpo_{'density' if args.density_aware else 'baseline'}_s{args.seed}"

    rank, world_size, device = dist_init(args.device)
    stage = Stage(args.out_dir, args, script="kat_train_grpo")
    if stage.finished:
        return dist_cleanup()
    seed_everything(args.seed)
    if args.prompts_per_step % world_size:
        raise InputError(f"--prompts_per_step={args.prompts_per_step} must divide by the world size {world_size}")
    policy, payload = load_model(args.sft_ckpt_path, device)
    reference, _ = load_model(args.sft_ckpt_path, device)
    reference.requires_grad_(False)
    rm, rm_payload = load_reward_model(args.rm_ckpt_path, device)
    check_same_tokenizer(payload, rm_payload)
    tok = load_tokenizer(payload)
    stop_tokens = [tok.encode_special("<|assistant_end|>"), tok.bos_token_id]
    check_completion_budget("max_new_tokens", args.max_new_tokens, policy, "policy")
    max_prompt = policy.config.sequence_len - args.max_new_tokens

    def prompt_ids(messages):
        return cut_left(tok.render_for_completion(messages), max_prompt)

    train_rows, log = read_pairs(args.pairs_path, "--pairs_path")
    if log.total():
        print0(log.note(args.pairs_path))
    prompts, _ = extract_prompts(train_rows)
    rendered = [prompt_ids(p["messages"]) for p in prompts]
    cut = sum(len(tok.render_for_completion(p["messages"])) > max_prompt for p in prompts)
    if cut:
        print0(f"note: {cut} of {len(prompts)} prompts are longer than {max_prompt} tokens and lose their beginning")
    if args.density_aware:  # before resume: the check is against the SFT weights the run starts from
        meta = check_density_model(args.density_path, policy, args.sft_ckpt_path)
        weights = pair_weights([p["id"] for p in prompts], load_density(args.density_path))
        ws = weight_stats(weights)
        print0(f"density-aware sampling over {len(prompts)} prompts ({args.density_path}: k={meta['k']}, alpha "
               f"{meta['alpha']}, cap {meta['max_ratio']}, mix {meta['mix']}): effective sample size "
               f"{ws['ess']:.0f} ({ws['ess_fraction']:.0%}), weights {ws['weight_min']:.3f} .. {ws['weight_max']:.3f}")
    else:
        weights = torch.ones(len(prompts), dtype=torch.float64)
        print0(f"uniform sampling over {len(prompts)} prompts")
    # for drawn_prompts.json only: which training-density quartile and cluster each drawn prompt is in
    quartile_of = read_quartiles(args.density_path) if os.path.exists(args.density_path) else {}
    cluster_of = {row["prompt_id"]: row["cluster"] for row in train_rows if "cluster" in row}
    eval_rows, eval_log = read_pairs(args.test_pairs_path, "--test_pairs_path")
    if eval_log.total():
        print0(eval_log.note(args.test_pairs_path))
    # one fixed held-out sample (seed 0, not --seed), so the runs of every seed and arm are evaluated alike
    eval_prompts = heldout_sample(extract_prompts(eval_rows)[0], args.eval_prompts, seed=0)
    # shortest first, so that each generate call below prefills prompts of similar length (a batch pads its prompts
    # to its longest: 128 held-out prompts of 11 to 100 tokens in one call took 3.7-4.2 s on one thread, in sorted
    # calls of 32 prompts 2.5-2.7 s)
    eval_ids = [prompt_ids(p["messages"]) for p in eval_prompts]
    order = sorted(range(len(eval_prompts)), key=lambda i: len(eval_ids[i]))
    eval_prompts, eval_ids = [eval_prompts[i] for i in order], [eval_ids[i] for i in order]
    world = None  # the gold scorer of the world the SFT model learnt (its checkpoint's lineage says which)
    if payload["world"] is not None and any(p["src"] == "synthetic" for p in eval_prompts):
        from nanochat.synthetic import make_world
        world = make_world(seed=payload["world"]["seed"], size=payload["world"]["size"])

    adamw = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    optimizers = remember_initial_lr([adamw])
    start_step, _ = stage.resume(policy, optimizers, args.max_steps, tokenizer_dir(payload), device)
    engine = Engine(policy)
    config = GRPOConfig.from_flags(args)

    def reward_model(batch):
        return group_rewards(rm, batch, args.device_batch_size)

    @torch.no_grad()
    def evaluate():
        """Seeded samples for held-out prompts (split over ranks): mean reward, gold score and artifact rate."""
        policy.eval()
        # contiguous slices, sampled with the global random stream: N ranks sample what one process would
        per = -(-len(eval_prompts) // world_size)
        first = min(rank * per, len(eval_prompts))
        mine = eval_prompts[first:first + per]  # a rank may hold none when there are fewer prompts than ranks
        ids = eval_ids[first:first + per]
        completions = []
        for start in range(0, len(ids), EVAL_CHUNK):  # each row draws what it would in one call over all prompts
            completions += engine.generate(ids[start:start + EVAL_CHUNK], num_samples=args.eval_samples,
                                           max_new_tokens=args.max_new_tokens, temperature=args.eval_temperature,
                                           top_k=args.top_k, stop_tokens=stop_tokens, seed=args.seed,
                                           global_rows=((first + start) * args.eval_samples,
                                                        len(eval_prompts) * args.eval_samples)).completions()
        prompts_of_rows = [(p, i) for p, i in zip(mine, ids) for _ in range(args.eval_samples)]
        sums = {"reward": 0.0, "samples": len(completions), "score": 0.0, "correct": 0.0, "artifacted": 0.0,
                "gold_samples": 0}
        if completions:  # the samples of each prompt are consecutive
            rewards = rewards_for_ids(rm, [i + c for (_, i), c in zip(prompts_of_rows, completions)])
            sums["reward"] = float(rewards.double().sum())
        if world is not None:
            for (p, _), c in zip(prompts_of_rows, completions):
                if p["src"] != "synthetic":
                    continue
                text = tok.decode([t for t in c if t not in stop_tokens])
                g = world.gold_score(p["messages"], text)
                sums["score"] += g["score"]
                sums["correct"] += g["correct"]
                sums["artifacted"] += g["artifacts"] > 0
                sums["gold_samples"] += 1
        totals = all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64, device=device)).tolist()
        sums = dict(zip(sums, totals))
        n_gold = max(sums["gold_samples"], 1)
        policy.train()
        return {"reward": sums["reward"] / max(sums["samples"], 1), "gold_score": sums["score"] / n_gold,
                "gold_correct": sums["correct"] / n_gold, "artifact_rate": sums["artifacted"] / n_gold}

    per_rank = args.prompts_per_step // world_size
    policy.train()
    for step in range(start_step, args.max_steps):
        if step == 0 or (args.eval_every > 0 and step % args.eval_every == 0):
            stage.log_eval(step, evaluate(), prefix="eval")
        lr = lr_multiplier(step, args.max_steps, args.warmup_steps, 1.0)
        set_lr(optimizers, lr)
        # every rank draws the same global prompt batch and keeps its own slice
        chosen = draw_prompts(weights, args.prompts_per_step, args.seed, step)
        prompt_batch = [rendered[i] for i in chosen[rank * per_rank:(rank + 1) * per_rank].tolist()]
        # scored on exactly the sampled ids, each prompt once per group
        stats, _, _ = grpo_step(policy, reference, optimizers, engine, prompt_batch, reward_model, config,
                                stop_tokens, seed=step_seed(args.seed, step), pad_id=tok.bos_token_id)
        stage.log(step + 1, stats | {"lr_multiplier": lr},
                  f"Loss: {stats['loss']:.4f}  PG Loss: {stats['pg_loss']:.4f}, "
                  f"KL Loss: {args.beta * stats['kl']:.4f}, Total: {stats['loss']:.4f} | reward "
                  f"{stats['reward']:.3f} ± {stats['reward_std']:.3f} | KL {stats['kl']:.4f} | clip "
                  f"{stats['clip_ratio']:.3f} | len {stats['completion_length']:.1f} (truncated "
                  f"{stats['truncated']:.0%}) | entropy {stats['entropy']:.3f}")
        stage.maybe_save(step + 1, policy, optimizers)

    stage.log_eval(args.max_steps, evaluate(), prefix="eval")
    evals = [h for h in stage.history if "eval/reward" in h]
    metrics = {f"{k}_{when}": h[f"eval/{k}"] for when, h in (("start", evals[0]), ("final", evals[-1]))
               for k in ("reward", "gold_score", "gold_correct", "artifact_rate")}
    metrics.update({"steps": args.max_steps, "train_prompts": len(prompts),
                    "eval_history": [f"{h['step']}:{h['eval/reward']:.3f}/{h['eval/gold_score']:.3f}"
                                     for h in evals]})
    # the draws are a pure function of (seed, step), so a resumed run counts the steps before its restart too
    drawn = drawn_prompts([prompts[i]["id"] for step in range(args.max_steps)
                           for i in draw_prompts(weights, args.prompts_per_step, args.seed, step).tolist()],
                          quartile_of, cluster_of)
    if rank == 0:
        atomic_write_json(os.path.join(args.out_dir, "drawn_prompts.json"), drawn)
    metrics.update({f"drawn_{q}": n / drawn["draws"] for q, n in drawn["by_quartile"].items()})
    metrics["drawn_distinct_prompts"] = drawn["distinct_prompts"]
    stage.finish(policy, tokenizer_dir(payload), metrics, {"train_seconds": stage.elapsed()},
                 extra={"method": "grpo"}, parents=[payload, rm_payload], world=payload["world"], device=device)
    dist_cleanup()


if __name__ == "__main__":
    run_script(main)
