"""
RLHF stage 4: the reward model. The SFT model plus a scalar head, trained on preference pairs with the
Bradley-Terry loss (nanochat/rm.py).

    python -m scripts.kat_train_rm                                # outs/sft + .cache/data/pairs_all.jsonl -> outs/rm/
    python -m scripts.kat_train_rm --density_aware=True           # pairs drawn by their prompt's density weight
    python -m scripts.kat_train_rm --max_steps=300 --max_len=64 --batch_size_pairs=64 --device_batch_size=16
    python -m scripts.kat_train_rm --matrix_optimizer=adamw --learning_rate=1e-3
    python -m scripts.kat_train_rm --kind_weights=wrong=8 --max_steps=300   # wrong facts 8x as often
    python -m scripts.kat_train_rm --kind_weights=wrong=16 --learning_rate=0.02 --train_layers=2 --max_steps=300
    torchrun --standalone --nproc_per_node=2 -m scripts.kat_train_rm -- --batch_size_pairs=32
    python -m scripts.kat_train_rm --resume=True                  # continue outs/rm/ after an interruption

Data. A seeded --val_share of the prompt ids of --pairs_path (with all their pairs) is held out for validation;
the rest is training. --test_pairs_path (pairs_test.jsonl, prompts never in pairs_all) is evaluated at the end.
Each step draws --batch_size_pairs pairs with replacement, each prompt in proportion to its weight, split evenly
among its pairs: weight 1 for every prompt (uniform, the default) or, with --density_aware, the prompt's weight in
--density_path (scripts.kat_density); the two arms differ only in these weights (nanochat/preference.py).
--kind_weights=wrong=8 draws each wrong-fact pair 8 times as often in both arms: the artifact and evasive pairs are
learnt in tens of steps, the wrong facts take hundreds, so the steps go where the learning is. The draw
is a function of (--seed, step), so every rank draws the same global batch and takes its slice, and a resumed run
draws what the uninterrupted one would have. Each rank runs its slice in
micro-batches of --device_batch_size pairs (a prompt run once, then its chosen and its rejected reply), shortest
pairs together.

Trained part. --train_layers=N trains the top N blocks and the head; the token embedding and the blocks below
keep the SFT model's weights, so backward stops at the lowest trained block (0, the default: everything). On the
cpu speedrun's depth-4 model (run K's SFT model and pairs, 300 steps, 2 cores) the top 2 blocks reached pairs_test
0.909 (wrong facts 0.777) in 200 s, against 0.9005 (0.752) in 318 s training everything; the top block alone
0.877 (0.690) in 140 s (README "Runs M, N and O").

Optimization. The backbone's matrices with Muon (--matrix_optimizer) at --learning_rate, the embedding and the
fresh head with AdamW at --embedding_lr and --head_lr; linear warmup over --warmup_steps, constant, then
a linear decay to 0 over the last --warmdown_ratio of the steps. Loss: Bradley-Terry plus --center_coef times the
squared sum of the pair's rewards (reward centering). Why Muon: on the synthetic world the pairs with a wrong fact
are the hard ones (the artifact and evasive ones are learned within 50 steps); telling a wrong fact from the right
one at the reply's end token takes a new circuit in the backbone, and Muon grew it in fewer steps than AdamW.

Writes outs/rm/ (ckpt.pt of kind "rm", tokenizer/, meta.json, report.md, history.png; optim.pt while unfinished,
see nanochat/stage.py): accuracy (margin > 0) and mean margin on the validation and test pairs, by source,
cluster, rejected kind, length (chosen reply shorter / longer than the rejected one, and the length-balanced mean of
the two) and (validation) density quartile. Evaluate any RM checkpoint again with python -m scripts.kat_eval_rm.
"""

import argparse
import os
import time

from nanochat.checkpoint import load_model, load_tokenizer, tokenizer_dir
from nanochat.common import (InputError, dist_cleanup, dist_init, fraction, nonnegative_float, nonnegative_int,
                             parse_flags, positive_int, print0, run_script, seed_everything, str2bool)
from nanochat.density import read_densities
from nanochat.gpt import MATRIX_LR, lr_multiplier, set_lr
from nanochat.preference import add_pair_flags, load_pair_data, micro_batches, pair_batch
from nanochat.rm import (RM_KIND, RewardModel, flat_metrics, freeze_lower_blocks, metrics_table, pair_margins,
                         preference_metrics, rm_train_step, setup_rm_optimizers)
from nanochat.stage import Stage


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=positive_int, default=600)
    parser.add_argument("--matrix_optimizer", type=str, default="muon", choices=["muon", "adamw"],
                        help="optimizer of the backbone's matrices (embedding and head: AdamW)")
    parser.add_argument("--learning_rate", type=nonnegative_float, default=None,
                        help="learning rate of the backbone's matrices (default: half of base training's, "
                             "0.01 muon / 0.001 adamw)")
    parser.add_argument("--embedding_lr", type=nonnegative_float, default=1e-3,
                        help="AdamW learning rate of the embedding")
    parser.add_argument("--head_lr", type=nonnegative_float, default=3e-3,
                        help="AdamW learning rate of the head")
    parser.add_argument("--warmdown_ratio", type=fraction, default=0.3, help="share of steps with a linear decay to 0")
    parser.add_argument("--batch_size_pairs", type=positive_int, default=32, help="global pairs per optimizer step")
    parser.add_argument("--device_batch_size", type=positive_int, default=8, help="pairs per forward/backward")
    parser.add_argument("--train_layers", type=nonnegative_int, default=0,
                        help="train the top N blocks and the head, the embedding and the blocks below frozen "
                             "(0: everything)")
    parser.add_argument("--center_coef", type=nonnegative_float, default=0.01, help="reward-centering weight (0: off)")
    parser.add_argument("--density_aware", type=str2bool, default=False,
                        help="draw prompts by their density weight instead of uniformly")
    parser.add_argument("--out_dir", "--out_path", dest="out_dir", type=str, default="outs/rm",
                        help="output directory (--out_path, the seed how-to's name, may end in /ckpt.pt)")
    add_pair_flags(parser)
    args = parse_flags(parser, argv)
    if args.out_dir.endswith(".pt") and os.path.basename(args.out_dir) != "ckpt.pt":
        parser.error(f"argument --out_dir/--out_path: must be a directory or end in ckpt.pt, got {args.out_dir!r}")
    out_dir = os.path.dirname(args.out_dir) if args.out_dir.endswith(".pt") else args.out_dir

    rank, world_size, device = dist_init(args.device)
    stage = Stage(out_dir, args, script="kat_train_rm", kind=RM_KIND)
    if stage.finished:
        return dist_cleanup()
    seed_everything(args.seed)
    backbone, payload = load_model(args.sft_ckpt_path, device)
    tok = load_tokenizer(payload)
    rm = RewardModel(backbone)
    rm.train()
    try:
        trained = freeze_lower_blocks(rm, args.train_layers)
    except ValueError as e:
        raise InputError(f"--{e}; the model: {payload['path']}") from None
    if args.train_layers:
        print0(f"training the top {args.train_layers} of {rm.config.n_layer} blocks and the head: {trained:,} of "
               f"{sum(p.numel() for p in rm.parameters()):,} parameters")
    max_len = args.max_len or rm.config.sequence_len
    train, val, test, weights = load_pair_data(args, world_size)
    densities = read_densities(args.density_path) if os.path.exists(args.density_path) else None

    matrix_lr = 0.5 * MATRIX_LR[args.matrix_optimizer] if args.learning_rate is None else args.learning_rate
    optimizers = setup_rm_optimizers(rm, matrix_lr, args.embedding_lr, args.head_lr,
                                     args.matrix_optimizer)

    local_pairs = args.batch_size_pairs // world_size
    num_steps = args.max_steps
    start_step, _ = stage.resume(rm, optimizers, num_steps, tokenizer_dir(payload), device)

    def evaluate(rows):
        rm.eval()
        margins = pair_margins(rm, tok, rows, args.eval_batch_size, max_len)
        rm.train()
        return margins

    train_seconds, stats = 0.0, {}
    for step in range(start_step, num_steps):
        # none at step 0: the head starts at zero, so every margin is 0 and the accuracy 0 by construction
        if val and args.eval_every > 0 and step % args.eval_every == 0 and step > 0:
            m = preference_metrics(evaluate(val), val)
            stage.log_eval(step, {"accuracy": m["accuracy"], "mean_margin": m["mean_margin"]})
        t0 = time.time()
        lr = lr_multiplier(step, num_steps, args.warmup_steps, args.warmdown_ratio)
        set_lr(optimizers, lr)
        batch = pair_batch(step, weights, args.batch_size_pairs, args.seed)
        mine = [train[i] for i in batch[rank * local_pairs:(rank + 1) * local_pairs]]
        micro = micro_batches(tok, mine, args.device_batch_size, max_len, device)
        stats = rm_train_step(rm, optimizers, micro, args.batch_size_pairs, args.center_coef, args.grad_clip)
        train_seconds += time.time() - t0
        pairs_per_s = (step + 1 - start_step) * args.batch_size_pairs / train_seconds
        stage.log(step + 1, stats | {"lr_multiplier": lr, "pairs_per_s": pairs_per_s},
                  f"loss {stats['loss']:.4f} | accuracy {stats['accuracy']:.3f} | margin {stats['margin']:.3f} | "
                  f"grad norm {stats['grad_norm']:.3f} | {pairs_per_s:.1f} pairs/s")
        stage.maybe_save(step + 1, rm, optimizers)

    metrics = {"steps": num_steps, "train_pairs": len(train), "final_train_loss": stats.get("loss"),
               "final_train_accuracy": stats.get("accuracy")}
    notes = []
    for name, rows, dens in (("val", val, densities), ("test", test, densities)):
        if not rows:
            continue
        m = preference_metrics(evaluate(rows), rows, dens)
        if name == "val":
            stage.log_eval(num_steps, {"accuracy": m["accuracy"], "mean_margin": m["mean_margin"]})
        table = metrics_table(m)
        print0(f"\n{name} pairs:\n{table}")
        notes.append(f"{name.capitalize()} pairs:\n\n```\n{table}\n```")
        metrics.update(flat_metrics(m, name))
    metrics["val_accuracy_history"] = [f"{s}:{a:.4f}" for s, a in stage.series("val/accuracy")]
    timings = {"train_seconds": train_seconds, "total_seconds": stage.elapsed(),
               "pairs_per_second": (num_steps - start_step) * args.batch_size_pairs / max(train_seconds, 1e-9)}
    print0(f"training {train_seconds:.1f}s ({timings['pairs_per_second']:.1f} pairs/s), total "
           f"{timings['total_seconds']:.1f}s")
    stage.finish(rm, tokenizer_dir(payload), metrics, timings, notes="\n\n".join(notes),
                 extra={"max_len": max_len, "sft_ckpt_path": payload["path"]}, parents=[payload],
                 world=payload["world"], device=device)
    dist_cleanup()


if __name__ == "__main__":
    run_script(main)
