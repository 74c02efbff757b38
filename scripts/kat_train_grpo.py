"""
GRPO on the preference prompts, with density-aware prompt sampling (the default) or uniform sampling.

    python -m scripts.kat_train_grpo                              # density-aware -> outs/grpo_density/
    python -m scripts.kat_train_grpo --density_aware=False        # uniform baseline -> outs/grpo_baseline/
    torchrun --standalone --nproc_per_node=8 -m scripts.kat_train_grpo -- --prompts_per_step=64
    python -m scripts.kat_train_grpo --resume                     # continue after an interruption

Each step samples `--prompts_per_step` prompts (weights from nanochat.density on the SFT model's embeddings when
density-aware), `--num_generations` completions per prompt, scores them with the reward model on the sampled ids,
normalises rewards within each prompt's group and takes `--num_iterations` clipped policy-gradient steps with a
`--beta`-weighted KL penalty to the frozen SFT model (nanochat/grpo.py has the formulas). Under torchrun each
rank samples and scores its share of the prompts; gradients are summed over ranks.

Held-out evaluation at the start, every `--eval_every` steps and at the end: `--eval_samples` answers to each of
`--eval_prompts` prompts of pairs_test.jsonl, sampled at `--eval_temperature` with the same seed every time (so two
evaluations differ only by the policy), their mean reward and, for synthetic prompts, the world's gold score and
planted-artifact rate (the check against reward hacking). Sampled rather than greedy on purpose: SFT puts its
artifacts in the tail of its distribution, where greedy decoding never goes, and that tail is what GRPO trims.
"""

import argparse
import math

import torch

from nanochat.checkpoint import load_model, load_resume_state, load_tokenizer, save_checkpoint
from nanochat.common import (WandbLogger, add_common_flags, all_reduce_sum, dist_cleanup, dist_init,
                             get_rank, parse_flags, print0, seed_everything, str2bool)
from nanochat.density import compute_density, sample_indices
from nanochat.engine import Engine
from nanochat.gpt import lr_multiplier, remember_initial_lr, set_lr
from nanochat.grpo import batch_logprobs, group_advantages, group_rewards, pack_groups, policy_update
from nanochat.pairs import extract_prompts, read_pairs
from nanochat.report import write_report
from nanochat.rm import load_reward_model, rewards_for_ids
from nanochat.training import Progress


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft_ckpt_path", type=str, default="outs/sft/ckpt.pt", help="policy init and reference")
    parser.add_argument("--rm_ckpt_path", type=str, default="outs/rm/ckpt.pt")
    parser.add_argument("--pairs_path", type=str, default=".cache/data/pairs_all.jsonl", help="training prompts")
    parser.add_argument("--eval_pairs_path", type=str, default=".cache/data/pairs_test.jsonl",
                        help="held-out prompts for evaluation")
    parser.add_argument("--density_aware", type=str2bool, default=True, help="sample prompts by inverse density")
    parser.add_argument("--density_k", type=int, default=10)
    parser.add_argument("--density_alpha", type=float, default=1.0)
    parser.add_argument("--density_max_ratio", type=float, default=10.0, help="0 disables the cap")
    parser.add_argument("--density_mix", type=float, default=0.0)
    parser.add_argument("--cache_dir", type=str, default=".cache/data", help="prompt embedding cache")
    parser.add_argument("--prompts_per_step", type=int, default=16)
    parser.add_argument("--num_generations", type=int, default=8, help="G: completions per prompt")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--scale_rewards", type=str, default="group", choices=["group", "none"])
    parser.add_argument("--clip_eps", type=float, default=0.2)
    parser.add_argument("--num_iterations", type=int, default=1, help="optimisation passes per sampled batch")
    parser.add_argument("--beta", type=float, default=0.04, help="weight of the KL penalty to the SFT model")
    parser.add_argument("--loss_type", type=str, default="token", choices=["token", "sequence"])
    parser.add_argument("--max_steps", type=int, default=50)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--warmup_steps", type=int, default=5)
    parser.add_argument("--grad_clip", type=float, default=1.0)
    parser.add_argument("--device_batch_size", type=int, default=32,
                        help="rows per forward/backward, in whole groups (at least one prompt's G rows)")
    parser.add_argument("--compile", type=str2bool, default=False,
                        help="torch.compile the log-softmax tail of the policy and reference passes (about a third "
                             "off the training part of a step; needs a C++ compiler, ~20 s to compile)")
    parser.add_argument("--save_every", type=int, default=25)
    parser.add_argument("--eval_every", type=int, default=25)
    parser.add_argument("--eval_prompts", type=int, default=128, help="held-out prompts per evaluation")
    parser.add_argument("--eval_samples", type=int, default=2, help="answers per held-out prompt")
    parser.add_argument("--eval_temperature", type=float, default=1.0, help="0 for greedy answers")
    parser.add_argument("--resume", type=str2bool, default=False)
    parser.add_argument("--out_dir", type=str, default=None,
                        help="default outs/grpo_density or outs/grpo_baseline, by --density_aware")
    add_common_flags(parser)
    args = parse_flags(parser, argv)
    args.out_dir = args.out_dir or ("outs/grpo_density" if args.density_aware else "outs/grpo_baseline")

    rank, world_size, device = dist_init(args.device)
    seed_everything(args.seed)
    if args.prompts_per_step % world_size:
        raise SystemExit(f"--prompts_per_step={args.prompts_per_step} must divide by the world size {world_size}")
    policy, payload = load_model(args.sft_ckpt_path, device)
    reference, _ = load_model(args.sft_ckpt_path, device)
    reference.requires_grad_(False)
    rm, _ = load_reward_model(args.rm_ckpt_path, device)
    tok = load_tokenizer(payload)
    stop_tokens = [tok.encode_special("<|assistant_end|>"), tok.bos_token_id]
    max_prompt = policy.config.sequence_len - args.max_new_tokens

    def prompt_ids(messages):
        ids = tok.render_for_completion(messages)
        return ids if len(ids) <= max_prompt else [tok.bos_token_id] + ids[len(ids) - max_prompt + 1:]

    train_rows, _ = read_pairs(args.pairs_path)
    prompts, _ = extract_prompts(train_rows)
    rendered = [prompt_ids(p["messages"]) for p in prompts]
    if args.density_aware:
        density = compute_density(policy, tok, prompts, k=args.density_k, alpha=args.density_alpha,
                                  max_ratio=args.density_max_ratio or None, mix=args.density_mix,
                                  cache_dir=args.cache_dir)
        weights = density["weight"]
        ws = density["weight_stats"]
        print0(f"density-aware sampling over {len(prompts)} prompts: effective sample size {ws['ess']:.0f} "
               f"({ws['ess_fraction']:.0%}), weights {ws['weight_min']:.3f} .. {ws['weight_max']:.3f}")
    else:
        weights = torch.ones(len(prompts), dtype=torch.float64)
        print0(f"uniform sampling over {len(prompts)} prompts")
    eval_rows, _ = read_pairs(args.eval_pairs_path)
    eval_prompts, _ = extract_prompts(eval_rows)
    eval_prompts = eval_prompts[:args.eval_prompts]
    world = None
    if any(p["src"] == "synthetic" for p in eval_prompts):
        from nanochat.synthetic import make_world
        flags = payload.get("flags", {})
        world = make_world(seed=flags.get("seed", 0), size=flags.get("synthetic_size", 1))

    adamw = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    optimizers = remember_initial_lr([adamw])
    start_step, history = 0, []
    if args.resume:
        start_step, extra = load_resume_state(args.out_dir, policy, optimizers, device)
        if extra is not None:
            history = extra["history"]
            print0(f"resumed from {args.out_dir} at step {start_step}")
    engine = Engine(policy)

    @torch.no_grad()
    def evaluate(step):
        """Seeded samples for held-out prompts (split over ranks): mean reward, gold score and artifact rate."""
        policy.eval()
        mine = eval_prompts[rank::world_size]
        ids = [prompt_ids(p["messages"]) for p in mine]
        gen = engine.generate(ids, num_samples=args.eval_samples, max_new_tokens=args.max_new_tokens,
                              temperature=args.eval_temperature, top_k=args.top_k, stop_tokens=stop_tokens,
                              seed=args.seed * world_size + rank)
        completions = gen.completions()  # the samples of each prompt are consecutive
        prompts_of_rows = [(p, i) for p, i in zip(mine, ids) for _ in range(args.eval_samples)]
        rewards = rewards_for_ids(rm, [i + c for (_, i), c in zip(prompts_of_rows, completions)])
        gold = {"score": 0.0, "correct": 0.0, "artifacted": 0.0, "n": 0}
        if world is not None:
            for (p, _), c in zip(prompts_of_rows, completions):
                if p["src"] != "synthetic":
                    continue
                text = tok.decode([t for t in c if t not in stop_tokens])
                g = world.gold_score(p["messages"], text)
                gold["score"] += g["score"]
                gold["correct"] += g["correct"]
                gold["artifacted"] += g["artifacts"] > 0
                gold["n"] += 1
        stats = all_reduce_sum(torch.tensor([rewards.double().sum().item(), len(completions), gold["score"],
                                             gold["correct"], gold["artifacted"], gold["n"]],
                                            dtype=torch.float64, device=device))
        n_gold = max(stats[5].item(), 1)
        result = {"step": step, "reward": stats[0].item() / max(stats[1].item(), 1),
                  "gold_score": stats[2].item() / n_gold, "gold_correct": stats[3].item() / n_gold,
                  "artifact_rate": stats[4].item() / n_gold}
        policy.train()
        return result

    def save(step, metrics=None):
        save_checkpoint(args.out_dir, policy, step, payload["tokenizer_dir"], flags=vars(args),
                        metrics=metrics or {"eval_history": history}, optimizers=optimizers,
                        extra_state={"history": history})

    wandb = WandbLogger(args.run, "nanochat-kat-grpo", vars(args))
    progress = Progress(args.max_steps, start_step)
    per_rank = args.prompts_per_step // world_size
    policy.train()
    stats = {}
    for step in range(start_step, args.max_steps):
        if step == 0 or (args.eval_every > 0 and step % args.eval_every == 0):
            history.append(evaluate(step))
            print0(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items() if k != "step"))
            wandb.log({f"eval/{k}": v for k, v in history[-1].items()}, step)
        set_lr(optimizers, lr_multiplier(step, args.max_steps, args.warmup_steps, 1.0))
        # every rank draws the same global prompt batch from a per-step seed (so --resume needs no RNG state)
        # and keeps its own slice
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        chosen = sample_indices(weights, args.prompts_per_step, generator)[rank * per_rank:(rank + 1) * per_rank]
        prompt_batch = [rendered[i] for i in chosen.tolist()]
        policy.eval()
        gen = engine.generate(prompt_batch, num_samples=args.num_generations, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, stop_tokens=stop_tokens,
                              seed=(args.seed * 1_000_003 + step) * world_size + rank)
        policy.train()
        completions = gen.completions()
        if any(len(c) == 0 for c in completions):
            raise RuntimeError("the engine returned an empty completion")
        # scored on exactly the sampled ids; a completion cut by max_new_tokens is scored at its last token
        batch = tuple(t.to(device) for t in pack_groups(prompt_batch, completions, tok.bos_token_id))
        rewards = group_rewards(rm, batch, args.device_batch_size)
        advantages = group_advantages(rewards.view(per_rank, args.num_generations), args.scale_rewards).view(-1)
        ref_logprobs = batch_logprobs(reference, batch, args.device_batch_size, args.compile)
        num_tokens = all_reduce_sum(batch[3].sum().float())
        stats = policy_update(policy, optimizers, batch, ref_logprobs, advantages, args,
                              num_sequences_global=args.prompts_per_step * args.num_generations,
                              num_tokens_global=num_tokens)
        reward_sum = all_reduce_sum(torch.stack([rewards.sum(), (rewards ** 2).sum()]).double())
        n = args.prompts_per_step * args.num_generations
        reward_mean = (reward_sum[0] / n).item()
        reward_std = math.sqrt(max((reward_sum[1] / n).item() - reward_mean ** 2, 0.0))
        length = num_tokens.item() / n
        print0(f"Step {step + 1}/{args.max_steps} - Loss: {stats['loss']:.4f}  PG Loss: {stats['pg']:.4f}, "
               f"KL Loss: {args.beta * stats['kl']:.4f}, Total: {stats['loss']:.4f} | reward {reward_mean:.3f} "
               f"± {reward_std:.3f} | KL {stats['kl']:.4f} | clip {stats['clipped']:.3f} | len {length:.1f} | "
               f"entropy {stats['entropy']:.3f} | ETA {progress.eta(step)}")
        wandb.log({"train/loss": stats["loss"], "train/pg_loss": stats["pg"], "train/kl": stats["kl"],
                   "train/clip_ratio": stats["clipped"], "train/reward": reward_mean, "train/reward_std": reward_std,
                   "train/completion_length": length, "train/entropy": stats["entropy"]}, step)
        if args.save_every > 0 and (step + 1) % args.save_every == 0 and step + 1 < args.max_steps and rank == 0:
            save(step + 1)

    history.append(evaluate(args.max_steps))
    print0(f"eval step {args.max_steps}: " + ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items()
                                                       if k != "step"))
    if get_rank() == 0:
        first, last = history[0], history[-1]
        metrics = {f"{k}_{when}": h[k] for when, h in (("start", first), ("final", last))
                   for k in ("reward", "gold_score", "gold_correct", "artifact_rate")}
        metrics.update({"steps": args.max_steps, "train_prompts": len(prompts),
                        "eval_history": [f"{h['step']}:{h['reward']:.3f}/{h['gold_score']:.3f}" for h in history]})
        save(args.max_steps, metrics)
        write_report(args.out_dir, metrics, {"train_seconds": progress.elapsed()}, vars(args), device)
    wandb.finish()
    dist_cleanup()


if __name__ == "__main__":
    main()
