"""
RLHF stage 5 (alternative to RM + GRPO): DPO on the preference pairs, from the SFT model, against the SFT model
as the frozen reference (nanochat/dpo.py).

    python -m scripts.kat_train_dpo                               # density-aware sampling -> outs/dpo_density/
    python -m scripts.kat_train_dpo --density_aware=False         # uniform sampling -> outs/dpo_baseline/
    python -m scripts.kat_train_dpo --loss_type=ipo --beta=0.5 --max_steps=300 --out_dir=outs/dpo_ipo
    torchrun --standalone --nproc_per_node=2 -m scripts.kat_train_dpo -- --batch_size_pairs=32
    python -m scripts.kat_train_dpo --resume=True                 # continue the output directory

Data and batches as in scripts/kat_train_rm.py: a seeded --val_share of pairs_all's prompt ids held out, global
batches of --batch_size_pairs pairs drawn as a function of (--seed, step), prompts by density weight (default) or
uniformly (the same sampler with weight 1 for every prompt), sliced over ranks and run in micro-batches of
--device_batch_size pairs. The reference's log-probs are computed for each micro-batch under no_grad. AdamW on all
parameters at --learning_rate, linear warmup then linear decay to 0. Each logged step prints the loss and TRL's
rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (margin > 0, so 0 at step 0).
--loss_type=ipo averages the log-probs per reply token, as TRL does.

At the end, for the SFT model and the DPO policy alike:
- held-out preference accuracy on --test_pairs_path and the validation split: `accuracy`, the share of pairs whose
  chosen reply has the higher mean log-prob per reply token (a tie counts 0); `summed_accuracy`, the same with
  summed log-probs (mostly a length test on synthetic pairs, see nanochat/dpo.py); `implicit_accuracy`, DPO's
  implicit reward margin > 0 (0 for SFT by definition: its margins are all 0);
- when the SFT model was trained on the synthetic world: --eval_questions sampled answers (temperature
  --eval_temperature, the same seeds for both models) to the world's held-out questions, gold-scored: share
  correct, mean gold score and the planted-artifact rate (share of answers with at least one artifact).
Writes the output directory (ckpt.pt, tokenizer/, meta.json, report.md with both models side by side, history.png;
optim.pt while unfinished, see nanochat/stage.py).
"""

import argparse
import copy
import time

import torch

from nanochat.checkpoint import load_model, load_tokenizer, tokenizer_dir
from nanochat.common import (dist_cleanup, dist_init, nonnegative_float, nonnegative_int, parse_flags, positive_float,
                             positive_int, print0, run_script, seed_everything, str2bool)
from nanochat.dpo import LOSS_TYPES, dpo_train_step, pair_logprobs, preference_eval, world_eval
from nanochat.gpt import lr_multiplier, remember_initial_lr, set_lr
from nanochat.preference import add_pair_flags, load_pair_data, micro_batches, pair_batch
from nanochat.stage import Stage

TRL_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=positive_int, default=150)
    parser.add_argument("--learning_rate", type=positive_float, default=2e-5,
                        help="AdamW learning rate (on the synthetic world 5e-5 already degenerates sampled answers)")
    parser.add_argument("--batch_size_pairs", type=positive_int, default=32, help="global pairs per optimizer step")
    parser.add_argument("--device_batch_size", type=positive_int, default=8, help="pairs per forward/backward")
    parser.add_argument("--beta", type=positive_float, default=0.1)
    parser.add_argument("--loss_type", type=str, default="sigmoid", choices=LOSS_TYPES)
    parser.add_argument("--density_aware", type=str2bool, default=True,
                        help="draw prompts by their density weight (False: uniformly)")
    parser.add_argument("--out_dir", type=str, default=None,
                        help="default: outs/dpo_density, or outs/dpo_baseline with --density_aware=False")
    parser.add_argument("--eval_questions", type=nonnegative_int, default=400,
                        help="world questions sampled at the end (0: off)")
    parser.add_argument("--eval_temperature", type=nonnegative_float, default=0.7)
    parser.add_argument("--eval_max_new_tokens", type=positive_int, default=64)
    add_pair_flags(parser)
    args = parse_flags(parser, argv)
    out_dir = args.out_dir or ("outs/dpo_density" if args.density_aware else "outs/dpo_baseline")

    rank, world_size, device = dist_init(args.device)
    stage = Stage(out_dir, args, script="kat_train_dpo")
    if stage.finished:
        return dist_cleanup()
    seed_everything(args.seed)
    policy, payload = load_model(args.sft_ckpt_path, device)
    tok = load_tokenizer(payload)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.train()
    max_len = args.max_len or policy.config.sequence_len
    train, val, test, weights = load_pair_data(args, world_size)

    adamw = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    optimizers = remember_initial_lr([adamw])

    local_pairs = args.batch_size_pairs // world_size
    num_steps = args.max_steps
    start_step, _ = stage.resume(policy, optimizers, num_steps, tokenizer_dir(payload), device)

    def logprobs(model, rows):
        was_training = model.training
        model.eval()
        out = pair_logprobs(model, tok, rows, args.eval_batch_size, max_len)
        model.train(was_training)
        return out

    val_reference = logprobs(reference, val) if val else None
    train_seconds, stats = 0.0, {}
    for step in range(start_step, num_steps):
        if val and args.eval_every > 0 and step % args.eval_every == 0:
            stage.log_eval(step, preference_eval(logprobs(policy, val), val_reference, args.beta))
        t0 = time.time()
        lr = lr_multiplier(step, num_steps, args.warmup_steps, 1.0)
        set_lr(optimizers, lr)
        batch = pair_batch(step, weights, args.batch_size_pairs, args.seed)
        mine = [train[i] for i in batch[rank * local_pairs:(rank + 1) * local_pairs]]
        micro = micro_batches(tok, mine, args.device_batch_size, max_len, device)
        stats = dpo_train_step(policy, reference, optimizers, micro, args.batch_size_pairs, args.beta,
                               args.loss_type, args.grad_clip)
        train_seconds += time.time() - t0
        pairs_per_s = (step + 1 - start_step) * args.batch_size_pairs / train_seconds
        trl = " | ".join(f"{name} {stats[name]:.4f}" for name in TRL_NAMES)
        stage.log(step + 1, stats | {"lr_multiplier": lr, "pairs_per_s": pairs_per_s},
                  f"loss {stats['loss']:.4f} | {trl} | grad norm {stats['grad_norm']:.3f} | {pairs_per_s:.1f} pairs/s")
        stage.maybe_save(step + 1, policy, optimizers)

    policy.eval()
    metrics = {"steps": num_steps, "train_pairs": len(train), "final_train_loss": stats.get("loss"),
               **{f"final_train_{k}": stats.get(k) for k in TRL_NAMES}}
    lines = [f"{'':<26} {'SFT':>9} {'DPO':>9}"]
    counts = [f"val {len(val)} pairs", f"test {len(test) if test else 0} pairs"]

    def side_by_side(name, sft_value, dpo_value):
        metrics[f"sft/{name}"], metrics[f"dpo/{name}"] = sft_value, dpo_value
        lines.append(f"{name:<26} {sft_value:>9.4f} {dpo_value:>9.4f}")

    for split, rows, ref in (("val", val, val_reference), ("test", test, None)):
        if not rows:
            continue
        ref = ref or logprobs(reference, rows)
        sft_m, dpo_m = preference_eval(ref, ref, args.beta), preference_eval(logprobs(policy, rows), ref, args.beta)
        for key in ("accuracy", "summed_accuracy", "implicit_accuracy"):
            side_by_side(f"{split}/{key}", sft_m[key], dpo_m[key])
        if split == "val":
            stage.log_eval(num_steps, dpo_m)
    samples, world = [], payload["world"]
    if args.eval_questions > 0 and world is not None:
        sampled = {}
        for name, model in (("SFT", reference), ("DPO", policy)):
            sampled[name] = world_eval(model, tok, world["seed"], world["size"], args.eval_questions,
                                       args.eval_temperature, args.seed, args.eval_max_new_tokens)
        for key in ("artifact_rate", "correct", "gold_score"):
            side_by_side(f"world/{key}", sampled["SFT"][key], sampled["DPO"][key])
        counts.append(f"world {sampled['SFT']['n']} questions sampled at temperature {args.eval_temperature}")
        samples = [f"- {a['prompt']!r}\n  - SFT: {a['response']!r}\n  - DPO: {b['response']!r}"
                   for a, b in zip(sampled["SFT"]["records"][:8], sampled["DPO"]["records"][:8])]
    elif args.eval_questions > 0:
        print0("note: the SFT model was not trained on the synthetic world; no sampled-answer evaluation")
    table = "\n".join(lines + ["(" + "; ".join(counts) + ")"])
    print0("\n" + table)
    metrics["val_accuracy_history"] = [f"{s}:{a:.4f}/{b:.4f}" for (s, a), (_, b) in
                                       zip(stage.series("val/accuracy"), stage.series("val/implicit_accuracy"))]
    timings = {"train_seconds": train_seconds, "total_seconds": stage.elapsed(),
               "pairs_per_second": (num_steps - start_step) * args.batch_size_pairs / max(train_seconds, 1e-9)}
    print0(f"training {train_seconds:.1f}s ({timings['pairs_per_second']:.1f} pairs/s), total "
           f"{timings['total_seconds']:.1f}s")
    notes = (f"DPO ({args.loss_type}, beta {args.beta}, {'density-aware' if args.density_aware else 'uniform'} "
             f"sampling) from `{payload['path']}`; SFT = the reference.\n\n```\n{table}\n```")
    if samples:
        notes += "\n\nSampled answers (first 8 world questions):\n\n" + "\n".join(samples)
    stage.finish(policy, tokenizer_dir(payload), metrics, timings, notes=notes,
                 extra={"method": "dpo", "loss_type": args.loss_type, "beta": args.beta,
                        "sft_ckpt_path": payload["path"]}, parents=[payload], world=world, device=device)
    dist_cleanup()


if __name__ == "__main__":
    run_script(main)
