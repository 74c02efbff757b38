"""
STaR, the Self-Taught Reasoner (issue 14), on multiple-choice QA: each iteration samples rationales to training
questions, keeps what reached the right answer (nanochat/star.py) and trains on it, then evaluates greedily.

    python -m scripts.kat_train_star --model_name outs/sft --dataset_name world_en --train_strategy reinforce \\
        --max_epochs 2 --num_train_questions 200 --samples_per_train_question 4
    python -m scripts.kat_train_star --model_name outs/sft --dataset_name world_en --train_strategy dpo --lora_r 8
    python -m scripts.kat_train_star --model_name outs/sft --dataset_name world_en --max_epochs 0   # evaluate only
    python -m scripts.kat_train_star --model_name outs/sft --dataset_name world_en \\
        --meta_prompt_to_preamble "Think logically." "Please cook."                             # prompt sweep
    python -m scripts.kat_train_star ... --preload_data_for_training outs/star/<run>/generations_iter1.jsonl
    torchrun --standalone --nproc_per_node=2 -m scripts.kat_train_star -- --model_name outs/sft ...
    python -m scripts.kat_train_star ... --resume True                    # continue an interrupted run

One iteration k = 1..--max_epochs:
1. sample --samples_per_train_question rationales (temperature --temperature) to each of --num_train_questions
   training questions, seed --seed + k (another stream each iteration); with --rationalize, questions without a
   usable correct sample are sampled again with the answer as a hint and those samples merged into their records
   (flagged "hinted"; star.py never trains on one that mentions the hint). Records go to generations_iter<k>.jsonl;
   --preload_data_for_training reads iteration 1's records from such a file instead of sampling;
2. train --internal_epochs passes over the data, from the previous iteration's model, or from --model_name each
   iteration with --reset_model_every_star_epoch (as the STaR paper does):
   - reinforce: SFT on [question, correct rationale] (star.reinforce_examples; --unique drops a question's
     repeated rationales), loss on the assistant's tokens only;
   - with --reward answer_logprob a sample counts as a success when its rationale raises the log-probability of
     the correct answer line over answering at once (star.answer_logprob_rewards; baseline: no rationale), not
     when its own letter is right: that decides reinforce's examples and dpo's chosen / rejected sides;
   - dpo: DPO (sigmoid, --dpo_beta) on star.dpo_pairs of the contested questions, against --ref_model_name if
     given, else the policy's own base weights under lora.adapters_disabled (--lora_r > 0), else a frozen copy of
     the iteration's starting model.
   Optimizer steps take --train_batch_size examples per rank x --train_gradient_accumulation_steps micro-batches x
   world size; an epoch is ceil(examples / that) steps, indices wrapping around so every step is full. AdamW at
   --learning_rate with --warmup linear warmup steps, then constant. --lora_r > 0 trains fresh adapters each
   iteration and merges them into the weights at its end, so every saved model is a plain GPT.
3. evaluate: greedy answers to --num_val_questions validation questions of each data set: accuracy with a Wilson
   95% interval, its change since iteration 0 (the starting model, evaluated too unless
   --skip_first_validation_loop) on the same questions with a paired bootstrap interval over questions (none when
   no answer changed: a degenerate interval, flagged), no-answer and degeneration rates, accuracy per subject,
   and the held-out loss: loss per response token on a fixed set of generations, iteration 0's greedy answers.

--dataset_name takes one data set or several separated by commas, e.g. world_l2,world_en: training questions
(--num_train_questions of each) are sampled and trained on together, validation is reported per data set.

Debugging and options: --single_batch trains every step on the first batch (an overfitting check);
--shuffle_dataloader=False keeps record order within an epoch (default: a seeded permutation per epoch);
--val_every_n_steps N also evaluates every N optimizer steps inside an iteration (recorded as val_inner/*).

Output: --out_dir (default outs/star/<run name>, the name from star.run_name; wandb only with --run): ckpt.pt of
the final model (loads with checkpoint.load_model and chat_cli), generations_iter<k>.jsonl, report.md with the
per-iteration table. Resume granularity: one STaR iteration (the state is saved after each, --save_every); a run
killed inside an iteration redoes that iteration from its start, with the same seeds.

--meta_prompt_to_preamble P1 P2 ... sweeps meta-prompts instead (no training): greedy validation accuracy with no
meta-prompt and with each one, written to <out_dir>/sweep.md and sweep.json. --meta_prompt adds one meta-prompt
(between the preamble and the question) to every prompt of a STaR run, training and evaluation alike.
"""

import argparse
import copy
import json
import math
import os

import torch

from nanochat import mcqa, star
from nanochat.batching import collate_targets
from nanochat.checkpoint import load_model, load_tokenizer, tokenizer_dir
from nanochat.common import (InputError, add_common_flags, atomic_write, atomic_write_json, dist_cleanup, dist_init,
                             get_rank, get_world_size, is_master, nonnegative_float, nonnegative_int, parse_flags,
                             positive_float, positive_int, print0, run_script, seed_everything, str2bool)
from nanochat.diversity import bootstrap_ci
from nanochat.dpo import dpo_train_step
from nanochat.gpt import lr_multiplier, remember_initial_lr, set_lr
from nanochat.lora import adapters_disabled, apply_lora, merge_lora
from nanochat.preference import pack_pairs, split_pair
from nanochat.stage import Stage
from nanochat.training import evaluate_loss, train_step

STRATEGIES = ("reinforce", "dpo")
DPO_COLUMNS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")  # TRL's names


def wilson(correct, n, z=1.96):
    """The Wilson score 95% interval of a proportion (lo, hi); (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(model, tok, val_sets, args, meta_prompt, heldout=None):
    """
    Greedy answers to the validation questions of each data set (one batched generation for all): per data set,
    accuracy with its Wilson CI, no-answer and degeneration rates, accuracy per subject, each question's
    correctness (kept for the paired comparison with iteration 0) and the conversations answered; with heldout
    ({data set: conversations}, a fixed set of generations) also the loss per response token on them.
    """
    was_training = model.training
    model.eval()
    items = [item for name in val_sets for item in val_sets[name]]
    records = star.sample_rationales(model, tok, items, 1, 0.0, args.max_new_tokens, args.gen_batch_size, args.seed,
                                     meta_prompt=meta_prompt)
    model.train(was_training)
    out, start = {}, 0
    for name, its in val_sets.items():
        part = records[start:start + len(its)]
        start += len(its)
        m = star.iteration_metrics(part)
        correct = [int(r["samples"][0]["score"] >= 1) for r in part]
        lo, hi = wilson(sum(correct), len(correct))
        out[name] = {"accuracy": m["accuracy"], "accuracy_lo": lo, "accuracy_hi": hi, "correct": correct,
                     "no_answer_rate": m["no_answer_rate"], "degenerate_rate": m["degenerate_rate"],
                     "questions": len(part), **{f"subject/{s}": a for s, a in m["per_subject"].items()},
                     "conversations": [r["messages"] + [{"role": "assistant", "content": r["samples"][0]["response"]}]
                                       for r in part]}
        if heldout:
            out[name]["heldout_loss"] = heldout_loss(model, tok, heldout[name], args)
    return out


def heldout_loss(model, tok, conversations, args):
    """Loss per response token on fixed conversations, this rank's share of them (evaluate_loss sums over ranks)."""
    was_training = model.training
    model.eval()
    max_len = args.max_len or model.config.sequence_len
    mine = [tok.render_conversation(c, max_tokens=max_len + 1) for c in conversations[get_rank()::get_world_size()]]
    device = next(model.parameters()).device
    batches = [collate_targets(mine[i:i + args.train_batch_size], device)
               for i in range(0, len(mine), args.train_batch_size)]
    loss = evaluate_loss(model, batches)
    model.train(was_training)
    return loss


def flat(val):
    """{data set: metrics} as one level of scalar metrics for the history, <data set>/<metric> (per-subject
    accuracies only in the report's table: dozens of them would bury the progress line)."""
    return {f"{name}/{k}": v for name, m in val.items() for k, v in m.items()
            if isinstance(v, (int, float)) and not k.startswith("subject/")}


def change_from_start(correct, correct_start):
    """
    Paired accuracy difference of the same greedy questions against iteration 0, (point, lo, hi) by the
    half-sample bootstrap over questions; lo = hi = nan when no question changed (a degenerate interval).
    """
    d = [a - b for a, b in zip(correct, correct_start)]
    if not any(d):
        return 0.0, math.nan, math.nan
    return bootstrap_ci(d)


def load_items(args, name, split, limit, world):
    """One split of one data set of --dataset_name; world data sets ask about the world of the model's checkpoint."""
    if name.startswith("world_"):
        if world is None:
            raise InputError(f"--dataset_name={name}: {args.model_name} was not trained on the "
                             f"synthetic world (its checkpoint names none); use an mmlu data set")
        items = mcqa.load_world(name.removeprefix("world_"), split, limit=limit,
                                world_seed=world["seed"], world_size=world["size"])
    else:
        try:
            items = mcqa.load_mcqa(name, split, from_dir=args.from_dir, limit=limit)
        except ValueError as e:
            raise InputError(f"--dataset_name: {e}") from e
    if not items:
        raise InputError(f"--dataset_name={name}: the {split} split is empty")
    return items


def read_generations(path):
    """Records saved by an earlier run (generations_iter<k>.jsonl), checked enough to train on."""
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"--preload_data_for_training {path}, line {number}: not JSON ({e})") from e
            if not (isinstance(record, dict) and {"item", "messages", "samples"} <= set(record)):
                raise InputError(f"--preload_data_for_training {path}, line {number}: a record needs item, messages "
                                 f"and samples (write it with this script: generations_iter<k>.jsonl)")
            records.append(record)
    if not records:
        raise InputError(f"--preload_data_for_training {path}: no records")
    return records


class AdaptersOff:
    """DPO's reference when training LoRA: the policy itself with its adapters disabled (no second copy)."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):  # DPO's log-probs read config and call hidden_states / logits_from_hidden
        method = getattr(self.model, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            with adapters_disabled(self.model):
                return method(*args, **kwargs)
        return call


def val_table(rows):
    """Validation per iteration and data set: accuracy, its paired change since iteration 0, the failure rates."""
    lines = ["| iteration | data set | val accuracy [95% CI] | change since iteration 0 [95% CI] | no answer | "
             "degenerate | held-out loss |", "|---|---|---|---|---|---|---|"]
    start = rows[0]["val"] if rows and rows[0]["iteration"] == 0 else None
    for r in rows:
        for name, v in (r["val"] or {}).items():
            change = "-"
            if start and r["iteration"] > 0:
                point, lo, hi = change_from_start(v["correct"], start[name]["correct"])
                change = (f"{point:+.3f} [{lo:+.3f}, {hi:+.3f}]" if math.isfinite(lo)
                          else "0 (no question changed: degenerate, no interval)")
            lines.append(f"| {r['iteration']} | {name} | {v['accuracy']:.3f} [{v['accuracy_lo']:.3f}, "
                         f"{v['accuracy_hi']:.3f}] | {change} | {v['no_answer_rate']:.3f} | "
                         f"{v['degenerate_rate']:.3f} | {v.get('heldout_loss', math.nan):.4f} |")
    return "\n".join(lines)


def train_table(rows):
    """What each iteration's sampling found and trained on (and with dpo, its mean rewards over the steps)."""
    trained = [r for r in rows if r["train"]]
    dpo = [key for key in DPO_COLUMNS if trained and key in trained[0]["train"]]
    lines = ["| iteration | sample accuracy | pass@k | contested | degenerate | " + "".join(f"{key} | " for key in dpo)
             + "examples | steps |", "|---" * (7 + len(dpo)) + "|"]
    lines += [f"| {r['iteration']} | {t['accuracy']:.3f} | {t['pass_at_k']:.3f} | {t['contested']:.3f} | "
              f"{t['degenerate_rate']:.3f} | " + "".join(f"{t[key]:.3f} | " for key in dpo)
              + f"{t['examples']} | {t['steps']} |" for r in trained if (t := r["train"])]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", type=str, default="outs/sft", help="checkpoint to start from")
    parser.add_argument("--ref_model_name", type=str, default=None,
                        help="dpo: checkpoint of the frozen reference (default: see above)")
    parser.add_argument("--dataset_name", type=str, default="world_en",
                        help=f"multiple-choice data set, or several separated by commas (trained on together, "
                        f"evaluated apart): {', '.join(mcqa.LOADERS)}")
    parser.add_argument("--from_dir", type=str, default=None, help="local copy of the hub data set (mmlu*)")
    parser.add_argument("--train_strategy", type=str, default="reinforce", choices=STRATEGIES)
    parser.add_argument("--unique", type=str2bool, default=False,
                        help="drop a question's repeated rationales (whitespace-insensitive) from its training data")
    parser.add_argument("--max_epochs", type=nonnegative_int, default=2, help="STaR iterations (0: evaluate only)")
    parser.add_argument("--internal_epochs", type=positive_int, default=1, help="training passes per iteration")
    parser.add_argument("--num_train_questions", type=positive_int, default=200, help="per data set")
    parser.add_argument("--num_val_questions", type=positive_int, default=200, help="per data set")
    parser.add_argument("--samples_per_train_question", type=positive_int, default=4)
    parser.add_argument("--temperature", type=nonnegative_float, default=1.0, help="of the training samples")
    parser.add_argument("--max_new_tokens", type=positive_int, default=128)
    parser.add_argument("--gen_batch_size", type=positive_int, default=32, help="questions per generation batch")
    parser.add_argument("--reward", type=str, default="correct", choices=["correct", "answer_logprob"],
                        help="what makes a sample a success: its answer is correct, or its rationale raises log p("
                             "correct answer) over answering at once (the likelihood reward; star.py)")
    parser.add_argument("--rationalize", type=str2bool, default=False,
                        help="sample failed questions again with the answer as a hint")
    parser.add_argument("--train_batch_size", type=positive_int, default=8, help="examples per micro-batch per rank")
    parser.add_argument("--train_gradient_accumulation_steps", type=positive_int, default=1)
    parser.add_argument("--learning_rate", type=positive_float, default=1e-5)
    parser.add_argument("--weight_decay", type=nonnegative_float, default=0.0)
    parser.add_argument("--warmup", type=nonnegative_int, default=0, help="linear warmup steps of each iteration")
    parser.add_argument("--grad_clip", type=nonnegative_float, default=1.0, help="0 disables clipping")
    parser.add_argument("--dpo_beta", type=positive_float, default=0.1)
    parser.add_argument("--max_len", type=positive_int, default=None, help="tokens per training row (default: the "
                        "model's context length)")
    parser.add_argument("--reset_model_every_star_epoch", type=str2bool, default=False,
                        help="each iteration trains from --model_name (on the new data) instead of the last model")
    parser.add_argument("--lora_r", type=nonnegative_int, default=0, help="LoRA rank (0: full fine-tune)")
    parser.add_argument("--meta_prompt", type=str, default=None, help="a meta-prompt in every question")
    parser.add_argument("--meta_prompt_to_preamble", type=str, nargs="+", default=None,
                        help="sweep these meta-prompts on the validation split (no training)")
    parser.add_argument("--skip_first_validation_loop", type=str2bool, default=False,
                        help="no evaluation of the starting model (iteration 0)")
    parser.add_argument("--preload_data_for_training", type=str, default=None,
                        help="a generations_iter<k>.jsonl whose records replace iteration 1's sampling")
    parser.add_argument("--single_batch", type=str2bool, default=False, help="train on the first batch only")
    parser.add_argument("--shuffle_dataloader", type=str2bool, default=True)
    parser.add_argument("--val_every_n_steps", type=nonnegative_int, default=0,
                        help="also evaluate every N optimizer steps inside an iteration (0: only after it)")
    parser.add_argument("--log_every", type=positive_int, default=10, help="print every N optimizer steps")
    parser.add_argument("--save_every", type=nonnegative_int, default=1, help="resume state every N iterations")
    parser.add_argument("--resume", type=str2bool, default=False, help="continue the output directory's run")
    parser.add_argument("--out_dir", type=str, default=None, help="default: outs/star/<run name>")
    add_common_flags(parser)
    args = parse_flags(parser, argv)
    run = star.run_name({"strategy": args.train_strategy, "dataset": args.dataset_name.replace(",", "+"),
                         "hint": args.rationalize, "lora_r": args.lora_r, "lr": args.learning_rate,
                         "iterations": args.max_epochs, "samples_per_question": args.samples_per_train_question,
                         "temperature": args.temperature, "seed": args.seed})
    args.out_dir = args.out_dir or os.path.join("outs", "star", run)
    if args.preload_data_for_training and not os.path.isfile(args.preload_data_for_training):
        raise InputError(f"--preload_data_for_training {args.preload_data_for_training}: no such file")

    rank, world_size, device = dist_init(args.device)
    seed_everything(args.seed)
    model, payload = load_model(args.model_name, device)
    tok = load_tokenizer(payload)
    world = payload["world"]
    names = [name.strip() for name in args.dataset_name.split(",") if name.strip()]
    if not names or len(set(names)) < len(names):
        raise InputError(f"--dataset_name={args.dataset_name}: name each data set once, separated by commas")
    val_sets = {name: load_items(args, name, "validation", args.num_val_questions, world) for name in names}

    if args.meta_prompt_to_preamble:  # the prompt sweep: no stage, no checkpoint, a table
        model.eval()
        lines = ["| meta-prompt | data set | accuracy [95% CI] | no answer | degenerate |", "|---|---|---|---|---|"]
        results = []
        for meta in [None] + args.meta_prompt_to_preamble:
            for name, m in evaluate(model, tok, val_sets, args, meta).items():
                results.append({"meta_prompt": meta, "dataset": name,
                                **{key: v for key, v in m.items() if key != "conversations"}})
                lines.append(f"| {meta or '(none)'} | {name} | {m['accuracy']:.3f} [{m['accuracy_lo']:.3f}, "
                             f"{m['accuracy_hi']:.3f}] | {m['no_answer_rate']:.3f} | {m['degenerate_rate']:.3f} |")
        table = "\n".join(lines)
        print0(table)
        if is_master():
            os.makedirs(args.out_dir, exist_ok=True)
            atomic_write(os.path.join(args.out_dir, "sweep.md"), f"# Meta-prompt sweep\n\n`{payload['path']}` on "
                         f"{args.num_val_questions} validation questions per data set at most, greedy.\n\n{table}\n")
            atomic_write_json(os.path.join(args.out_dir, "sweep.json"), results)
        return dist_cleanup()

    stage = Stage(args.out_dir, args, script="kat_train_star")
    if stage.finished:
        return dist_cleanup()
    train_items = [item for name in names for item in load_items(args, name, "train", args.num_train_questions, world)]
    max_len = args.max_len or model.config.sequence_len
    rows_per_step = args.train_batch_size * args.train_gradient_accumulation_steps * world_size
    # the resume state is the model after each iteration (plain: adapters are merged), no optimizer: each
    # iteration starts a fresh one; the per-iteration table rows travel as the script's state
    start, state = stage.resume(model, [], args.max_epochs, tokenizer_dir(payload), device)
    rows = state or []
    heldout = None  # the fixed generations of the held-out loss: the starting model's greedy validation answers
    if start == 0 and not args.skip_first_validation_loop:
        val = evaluate(model, tok, val_sets, args, args.meta_prompt)
        heldout = {name: v["conversations"] for name, v in val.items()}
        for name in val:
            val[name]["heldout_loss"] = heldout_loss(model, tok, heldout[name], args)
        stage.log_eval(0, flat(val))
        rows.append({"iteration": 0, "val": val, "train": None})
    elif rows and rows[0]["iteration"] == 0:
        heldout = {name: v["conversations"] for name, v in rows[0]["val"].items()}

    for k in range(start + 1, args.max_epochs + 1):
        if args.reset_model_every_star_epoch:
            model, _ = load_model(args.model_name, device)
        model.eval()
        if k == 1 and args.preload_data_for_training:
            records = read_generations(args.preload_data_for_training)
            print0(f"iteration {k}: {len(records)} records from {args.preload_data_for_training} (no sampling)")
        else:
            records = star.sample_rationales(model, tok, train_items, args.samples_per_train_question,
                                             args.temperature, args.max_new_tokens, args.gen_batch_size,
                                             args.seed + k, meta_prompt=args.meta_prompt)
        train_metrics = star.iteration_metrics(records)  # before the hinted samples: what the model does alone
        if args.rationalize:
            failed = [r for r in records if not any(s["score"] >= 1 and not s["mentions_hint"]
                                                    for s in r["samples"])]
            hinted = star.sample_rationales(model, tok, [r["item"] for r in failed], args.samples_per_train_question,
                                            args.temperature, args.max_new_tokens, args.gen_batch_size,
                                            args.seed + k + 10_000, meta_prompt=args.meta_prompt, hint=True)
            for record, extra in zip(failed, hinted):
                record["samples"] += [s | {"hinted": True} for s in extra["samples"]]
            print0(f"iteration {k}: rationalised {len(failed)} failed questions with the hint")
        graded = args.reward == "answer_logprob"
        if graded:  # the rewards of the model that sampled the rationales, stored in the generations file too
            model.eval()
            star.score_answer_logprob(model, tok, records, meta_prompt=args.meta_prompt,
                                      batch_size=args.gen_batch_size)
            rewards = [s["reward"] for r in records for s in r["samples"]]
            print0(f"iteration {k}: answer_logprob rewards mean {sum(rewards) / max(len(rewards), 1):+.3f}, "
                   f"{sum(x > 0 for x in rewards) / max(len(rewards), 1):.0%} above the no-rationale baseline")
        if is_master():  # read back by --preload_data_for_training: never a half-written file
            atomic_write(os.path.join(args.out_dir, f"generations_iter{k}.jsonl"),
                         "".join(json.dumps(r) + "\n" for r in records))

        # training data of this iteration, rendered once: (ids, mask) rows, or pairs (a prompt, chosen and rejected)
        if args.train_strategy == "reinforce":
            examples = star.reinforce_examples(records, args.unique, graded)
            renders = [tok.render_conversation(c, max_tokens=max_len + 1) for c in examples]
        else:
            examples = star.dpo_pairs(records, args.unique, graded)
            renders = [split_pair(tok, e, max_len) for e in examples]
        print0(f"iteration {k}: {len(examples)} {args.train_strategy} examples from {len(records)} questions "
               f"(sample accuracy {train_metrics['accuracy']:.3f}, pass@k {train_metrics['pass_at_k']:.3f})")

        params = apply_lora(model, args.lora_r)
        reference = None
        if args.train_strategy == "dpo" and renders:
            if args.ref_model_name:
                reference = load_model(args.ref_model_name, device)[0].eval().requires_grad_(False)
            elif args.lora_r > 0:
                reference = AdaptersOff(model)
            else:
                reference = copy.deepcopy(model).eval().requires_grad_(False)
        adamw = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=args.weight_decay)
        optimizers = remember_initial_lr([adamw])
        steps_per_epoch = math.ceil(len(renders) / rows_per_step) if renders else 0
        num_steps = 1 if args.single_batch and renders else steps_per_epoch * args.internal_epochs
        model.train()
        losses, dpo_stats = [], []
        for step in range(num_steps):
            epoch, s = divmod(step, max(steps_per_epoch, 1))
            order = list(range(len(renders)))
            if args.shuffle_dataloader and not args.single_batch:
                gen = torch.Generator().manual_seed(args.seed * 1000 + k * 100 + epoch)
                order = torch.randperm(len(renders), generator=gen).tolist()
            # global rows of this step, wrapping around so the last step is full; then this rank's micro-batches
            picked = [order[(s * rows_per_step + j) % len(order)] for j in range(rows_per_step)]
            mine = picked[rank::world_size]
            chunks = [mine[i:i + args.train_batch_size] for i in range(0, len(mine), args.train_batch_size)]
            set_lr(optimizers, lr_multiplier(step, num_steps, args.warmup, 0.0))
            if args.train_strategy == "reinforce":
                micro = [collate_targets([renders[i] for i in c], device) for c in chunks]
                loss, grad_norm = train_step(model, optimizers, micro, args.grad_clip)
            else:  # a micro-batch is a pair batch: each prompt once, then its chosen and rejected reply
                micro = [pack_pairs([renders[i] for i in c], device) for c in chunks]
                stats = dpo_train_step(model, reference, optimizers, micro, rows_per_step, args.dpo_beta)
                loss, grad_norm = stats["loss"], stats["grad_norm"]
                dpo_stats.append({key: v for key, v in stats.items() if key.startswith("rewards/")})
            losses.append(loss)
            if (step + 1) % args.log_every == 0 or step + 1 == num_steps:
                rewards = "".join(f" | {key} {v:.3f}" for key, v in (dpo_stats[-1] if dpo_stats else {}).items())
                print0(f"iteration {k} step {step + 1}/{num_steps} | loss {loss:.4f}{rewards} | "
                       f"grad norm {grad_norm:.3f}")
            if args.val_every_n_steps and (step + 1) % args.val_every_n_steps == 0 and step + 1 < num_steps:
                stage.log_eval(k, flat(evaluate(model, tok, val_sets, args, args.meta_prompt, heldout)),
                               prefix="val_inner")
        merge_lora(model)  # a plain GPT again: what is saved, resumed and trained next
        del reference
        train = {key: v for key, v in train_metrics.items() if key != "per_subject"}
        train |= {"examples": len(examples), "steps": num_steps}
        train |= {key: sum(d[key] for d in dpo_stats) / len(dpo_stats) for key in (dpo_stats[0] if dpo_stats else {})}
        stage.log(k, train | ({"loss": sum(losses) / len(losses)} if losses else {}),
                  f"{num_steps} steps" + (f", mean loss {sum(losses) / len(losses):.4f}" if losses else ""))
        val = evaluate(model, tok, val_sets, args, args.meta_prompt, heldout)
        stage.log_eval(k, flat(val))
        rows.append({"iteration": k, "val": val, "train": train})
        stage.maybe_save(k, model, [], rows)

    model.eval()
    tables = f"Validation (greedy):\n\n{val_table(rows)}\n\nTraining samples:\n\n{train_table(rows)}"
    print0("\n" + tables)
    first, last = rows[0]["val"] if rows else None, rows[-1]["val"] if rows else None
    subjects = ""
    if last:
        subjects = ("\n\nValidation accuracy per subject, last iteration:\n\n| data set | subject | accuracy |\n"
                    "|---|---|---|\n")
        subjects += "\n".join(f"| {name} | {key.removeprefix('subject/')} | {v:.3f} |" for name, m in last.items()
                               for key, v in m.items() if key.startswith("subject/"))
    metrics = {"iterations": args.max_epochs, "run_name": run}
    for name in names:
        if first and rows[0]["iteration"] == 0:
            metrics[f"val_accuracy_start/{name}"] = first[name]["accuracy"]
        if last:
            metrics[f"val_accuracy_final/{name}"] = last[name]["accuracy"]
            metrics |= {f"final_val_{k}/{name}": v for k, v in last[name].items()
                        if isinstance(v, (int, float)) and not k.startswith("subject/") and k != "accuracy"}
    sizes = ", ".join(f"{n} {len(v)}" for n, v in val_sets.items())
    notes = (f"STaR ({args.train_strategy}, LoRA r={args.lora_r}) from `{payload['path']}` on {args.dataset_name}: "
             f"{len(train_items)} training questions; validation questions: {sizes}.\n\n{tables}{subjects}")
    stage.finish(model, tokenizer_dir(payload), metrics, {"total_seconds": stage.elapsed()}, notes=notes,
                 extra={"method": "star", "strategy": args.train_strategy, "run_name": run},
                 parents=[payload], world=world, device=device)
    dist_cleanup()


if __name__ == "__main__":
    run_script(main)
