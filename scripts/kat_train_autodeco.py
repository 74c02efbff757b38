"""
AutoDeco step 2: train the temperature (and optionally top-p) head on a frozen base (nanochat/autodeco.py).

    python -m scripts.kat_construct_autodeco --base_model_name_or_path outs/sft --output_dir outs/autodeco_init
    python -m scripts.kat_train_autodeco                          # synthetic chats of the base's world (cpu profile)
    torchrun --standalone --nproc_per_node=8 -m scripts.kat_train_autodeco -- --model_name_or_path outs/autodeco_init \\
      --dataset_name HuggingFaceH4/ultrachat_200k --output_dir outs/autodeco --train_temp true --train_top_p false \\
      --temp_objective analytic_min_p_hinge --min_p_ratio 0.1 --temp_hinge_weight 1.0 --temp_reg_weight 0.1 \\
      --goldilocks_filter true --goldilocks_easy_frac 0.1 --goldilocks_topk 10 --max_steps 50 --logging_steps 1 \\
      --per_device_train_batch_size 4 --learning_rate 1e-4 --completion_only_loss true --report_to wandb \\
      --temp_diag_enabled true --temp_diag_steps 50 --temp_diag_examples 3 --temp_diag_topk 5
    python -m scripts.kat_train_autodeco --resume true           # continue outs/autodeco/ after an interruption
    python -m scripts.kat_pretty_print_temp_diag --path outs/autodeco/temp_diagnostics --num-files 2 --topk 8

Objective (--temp_objective). analytic_min_p_hinge: per selected token temp_hinge_weight * relu(T_req - T) plus
temp_reg_weight * T (--temp_reg_type linear: T learns the 1 - w_r/w_h quantile of the temperature min-p needs to
keep the right token) or temp_reg_weight * relu(T - T_req)^2 (overshoot_sq), where T_req = relu(z_max - z_y) /
ln(1 / min_p_ratio). legacy_ce: the paper's loss (cross-entropy at temperature T weighted by p(y)). --train_top_p
adds the paper's soft top-p loss for the top-p head. Decode with the same --min_p_ratio: the checkpoint records it.

Tokens (--goldilocks_filter). Easy tokens (the ground truth is the argmax) and top-k tokens (ranks 2..k) are
balanced to --goldilocks_easy_frac over the global batch (-1: the natural ratio); ranks beyond k never train.
--temp_target_cap with --cap_mode clamp (train towards min(T_req, cap)) or drop (leave those tokens out).

Data. Without --dataset_name: chats of the synthetic world the base model was trained on (offline). Otherwise a
.jsonl/.json/.parquet file, a `datasets` directory (save_to_disk) or a copy of a hub repo (a path, or a name under
data/), or a hub id; the split and the column are asked on a terminal only, else --dataset_split/--dataset_column or
the defaults (train_sft or train; a messages or conversations column). A seeded sample of rows is checked first.
Each step takes --per_device_train_batch_size conversations per rank, one per row, cut to --max_length tokens; the
loss reads the assistant's tokens (--completion_only_loss true) or every token (false).

Outputs in --output_dir: ckpt.pt (the heads only, kind "autodeco", naming the base and its weights' fingerprint),
tokenizer/, meta.json, report.md with history.png (mean T, T_req, coverage, loss); optim.pt while unfinished
(--resume); temp_diagnostics/step_NNNNNNN.json every --temp_diag_steps steps (rank 0's view of the tokens the loss
used: read them with scripts.kat_pretty_print_temp_diag). A held-out set of --eval_samples conversations is scored
at the end (mean T on easy and top-k tokens, min-p coverage, T_req quantiles).

Hugging Face flags are accepted so that a TRL command line runs unchanged: --torch_dtype (the base runs in bf16
autocast on CUDA and fp32 elsewhere, the project's policy; the heads and T_req are always fp32), --attn_implementation
(our GPT has one attention, torch's scaled_dot_product_attention) and --gradient_checkpointing (the base is frozen
and runs without autograd, so it keeps no activations to checkpoint) change nothing here. --report_to wandb logs to
wandb under --run (default: the output directory's name); none disables it.
"""

import argparse
import math
import os

import torch

from nanochat.autodeco import (AUTODECO_KIND, AllTokens, AutoDecoConfig, autodeco_step, base_reference,
                               check_chat_rows, chat_rows, diagnostics, evaluate_heads, load_autodeco,
                               open_chat_dataset)
from nanochat.checkpoint import load_tokenizer, tokenizer_dir
from nanochat.common import (InputError, add_common_flags, atomic_write_json, dist_cleanup, dist_init,
                             finite_float, fraction, is_master, nonnegative_float, nonnegative_int, open_fraction,
                             parse_flags, positive_float, positive_int, print0, run_script, seed_everything, str2bool)
from nanochat.data import chat_conversations
from nanochat.gpt import lr_multiplier, remember_initial_lr, set_lr
from nanochat.loaders import SFTLoader
from nanochat.stage import Stage


def easy_fraction(text):
    value = finite_float(text)
    if value != -1 and not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or -1 (the natural ratio), got {text!r}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", type=str, default="outs/autodeco_init",
                        help="heads to train (python -m scripts.kat_construct_autodeco writes fresh ones)")
    parser.add_argument("--output_dir", "--out_dir", dest="out_dir", type=str, default="outs/autodeco")
    # data
    parser.add_argument("--dataset_name", type=str, default=None,
                        help="a .jsonl/.json/.parquet file, a datasets directory, a name under data/, or a hub id "
                             "(default: the synthetic world's chats)")
    parser.add_argument("--dataset_split", type=str, default=None, help="default: train_sft, else train")
    parser.add_argument("--dataset_column", type=str, default=None, help="default: messages or conversations")
    parser.add_argument("--max_train_samples", type=positive_int, default=None,
                        help="training conversations (default: enough for --max_steps without repeating)")
    parser.add_argument("--eval_samples", type=nonnegative_int, default=32,
                        help="held-out conversations scored at the end (0: none)")
    parser.add_argument("--max_length", type=positive_int, default=None,
                        help="tokens per conversation (default: the base model's context)")
    parser.add_argument("--completion_only_loss", type=str2bool, default=True,
                        help="train on the assistant's tokens only (false: on every token)")
    # objective
    parser.add_argument("--train_temp", type=str2bool, default=True, help="train the temperature head")
    parser.add_argument("--train_top_p", type=str2bool, default=False, help="train the top-p head (soft top-p loss)")
    parser.add_argument("--temp_objective", type=str, default="analytic_min_p_hinge",
                        choices=["analytic_min_p_hinge", "legacy_ce"])
    parser.add_argument("--min_p_ratio", type=open_fraction, default=0.1, help="the min-p ratio decoding will use")
    parser.add_argument("--temp_hinge_weight", type=nonnegative_float, default=1.0)
    parser.add_argument("--temp_reg_weight", type=nonnegative_float, default=0.1)
    parser.add_argument("--temp_reg_type", type=str, default="linear", choices=["linear", "overshoot_sq"])
    parser.add_argument("--temp_target_cap", type=positive_float, default=None, help="cap on T_req (default: none)")
    parser.add_argument("--cap_mode", type=str, default="clamp", choices=["clamp", "drop"])
    parser.add_argument("--goldilocks_filter", type=str2bool, default=True,
                        help="balance easy and top-k tokens (ranks beyond --goldilocks_topk never train)")
    parser.add_argument("--goldilocks_easy_frac", type=easy_fraction, default=0.1,
                        help="target share of easy tokens among the selected ones; -1: the natural ratio")
    parser.add_argument("--goldilocks_topk", type=positive_int, default=10)
    # optimisation
    parser.add_argument("--max_steps", type=positive_int, default=600)
    parser.add_argument("--per_device_train_batch_size", type=positive_int, default=16,
                        help="conversations per rank per step")
    parser.add_argument("--learning_rate", type=nonnegative_float, default=1e-3, help="AdamW, peak")
    parser.add_argument("--weight_decay", type=nonnegative_float, default=0.0)
    parser.add_argument("--lr_scheduler_type", type=str, default="linear", choices=["linear", "constant"],
                        help="linear: decay to 0 over the run after the warmup")
    parser.add_argument("--warmup_ratio", type=fraction, default=0.0)
    parser.add_argument("--max_grad_norm", type=nonnegative_float, default=1.0, help="0 disables clipping")
    parser.add_argument("--logging_steps", "--log_every", dest="log_every", type=positive_int, default=25,
                        help="print a progress line every N steps")
    parser.add_argument("--save_steps", "--save_every", dest="save_every", type=nonnegative_int, default=100,
                        help="resume state every N steps (0: never)")
    parser.add_argument("--resume", type=str2bool, default=False)
    parser.add_argument("--report_to", type=str, default="none", choices=["none", "wandb"],
                        help="wandb: log to wandb under --run (default: the output directory's name)")
    # diagnostics
    parser.add_argument("--temp_diag_enabled", type=str2bool, default=True)
    parser.add_argument("--temp_diag_steps", type=positive_int, default=50)
    parser.add_argument("--temp_diag_examples", type=nonnegative_int, default=3)
    parser.add_argument("--temp_diag_topk", type=positive_int, default=5)
    # Hugging Face flags with no effect here (see the docstring)
    parser.add_argument("--torch_dtype", type=str, default="auto",
                        help="accepted, no effect: bf16 autocast on CUDA, fp32 elsewhere; heads and T_req in fp32")
    parser.add_argument("--attn_implementation", type=str, default="sdpa",
                        help="accepted, no effect: the GPT always uses scaled_dot_product_attention")
    parser.add_argument("--gradient_checkpointing", type=str2bool, default=False,
                        help="accepted, no effect: the frozen base runs without autograd, keeping no activations")
    add_common_flags(parser)
    args = parse_flags(parser, argv)
    if not (args.train_temp or args.train_top_p):
        parser.error("nothing to train: pass --train_temp true and/or --train_top_p true")
    if args.report_to == "none":
        args.run = None
    elif args.run is None:
        args.run = os.path.basename(os.path.abspath(args.out_dir))

    rank, world_size, device = dist_init(args.device)
    stage = Stage(args.out_dir, args, script="kat_train_autodeco", kind=AUTODECO_KIND)
    if stage.finished:
        return dist_cleanup()
    seed_everything(args.seed)
    base, heads, payload = load_autodeco(args.model_name_or_path, device)
    tok = load_tokenizer(payload)
    heads.temp_head.requires_grad_(args.train_temp)
    heads.top_p_head.requires_grad_(args.train_top_p)
    heads.train()
    cfg = AutoDecoConfig(**{k: getattr(args, k) for k in AutoDecoConfig.__dataclass_fields__})
    max_len = args.max_length or base.config.sequence_len
    global_batch = args.per_device_train_batch_size * world_size
    num_steps = args.max_steps

    # data: the synthetic world's chats (the base's world, so their facts are the ones it learnt), or a data set
    num_train = args.max_train_samples or num_steps * global_batch
    if args.dataset_name is None:
        world = payload["world"] or {"seed": args.seed, "size": 1}
        print0(f"data: synthetic chats of world seed {world['seed']}, size {world['size']}")
        # stream 2: other conversations than mid-training's and SFT's, about the same facts; clean answers, so the
        # heads learn how much randomness the right answers need, not the planted artifacts
        synthetic = dict(seed=world["seed"], synthetic_size=world["size"], stream=2, artifact_rate=0.0,
                         free_clause_rate=payload["base_payload"]["flags"].get("free_clause_rate", 0.0))
        train_convs = chat_conversations("synthetic", "train", num=num_train, **synthetic)
        eval_convs = chat_conversations("synthetic", "val", num=args.eval_samples, **synthetic)
    else:
        rows, column, label = open_chat_dataset(args.dataset_name, args.dataset_split, args.dataset_column)
        check_chat_rows(rows, column, label, args.seed)
        train_convs, skipped = chat_rows(rows, column, label, num_train, args.seed)
        eval_convs, _ = chat_rows(rows, column, label, args.eval_samples, args.seed, skip=num_train)
        print0(f"data: {label}, column {column}: {len(rows):,} rows, {len(train_convs):,} training conversations"
               + (f" ({len(skipped)} malformed rows skipped, the first: {skipped[0]})" if skipped else ""))
        if not train_convs:
            raise InputError(f"{label}: no usable conversation")
    render = tok if args.completion_only_loss else AllTokens(tok)
    loader = SFTLoader(train_convs, render, global_batch, max_len, rank, world_size, train=True, seed=args.seed)

    trainable = [p for p in heads.parameters() if p.requires_grad]
    optimizers = remember_initial_lr([torch.optim.AdamW(trainable, lr=args.learning_rate,
                                                        weight_decay=args.weight_decay)])
    start_step, loader_state = stage.resume(heads, optimizers, num_steps, tokenizer_dir(payload), device)
    if loader_state is not None:
        loader.load_state_dict(loader_state)
    train_iter = iter(loader)
    warmup_steps = math.ceil(args.warmup_ratio * num_steps)
    warmdown = 1.0 if args.lr_scheduler_type == "linear" else 0.0  # linear: to 0 at the end, as Hugging Face's
    knobs = {k: getattr(args, k) for k in ("min_p_ratio", "temp_objective", "temp_hinge_weight", "temp_reg_weight",
                                           "temp_reg_type", "temp_target_cap", "cap_mode", "goldilocks_filter",
                                           "goldilocks_easy_frac", "goldilocks_topk", "completion_only_loss",
                                           "train_temp", "train_top_p", "learning_rate")}
    print0(f"{len(train_convs)} training conversations, {num_steps} steps of {global_batch} conversations; "
           f"{sum(p.numel() for p in trainable):,} trained parameters, the base frozen")

    stats, first = {}, None
    for step in range(start_step, num_steps):
        lr = lr_multiplier(step, num_steps, warmup_steps, warmdown)
        set_lr(optimizers, lr)
        inputs, targets = (t.to(device) for t in next(train_iter))
        stats, batch = autodeco_step(base, heads, optimizers, inputs, targets, cfg, step, args.max_grad_norm)
        first = first or stats
        stage.log(step + 1, stats | {"lr_multiplier": lr},
                  f"loss {stats['loss']:.4f} | T {stats['mean_temperature']:.3f} | T_req {stats['mean_t_req']:.3f} "
                  f"| min-p keeps {stats['coverage']:.1%} | selected {stats['selected']}/{stats['valid']} "
                  f"(easy {stats['easy_frac']:.2f})" + (f" | top-p {stats['mean_top_p']:.3f}" if args.train_top_p
                                                        else "") + f" | grad norm {stats['grad_norm']:.3f}")
        if args.temp_diag_enabled and (step + 1) % args.temp_diag_steps == 0 and is_master():
            record = diagnostics(batch, stats, step + 1, tok, args.temp_diag_examples, args.temp_diag_topk, knobs)
            atomic_write_json(os.path.join(args.out_dir, "temp_diagnostics", f"step_{step + 1:07d}.json"), record)
        stage.maybe_save(step + 1, heads, optimizers, loader.state_dict())

    metrics = {"steps": num_steps, "train_conversations": len(train_convs), "final_loss": stats.get("loss"),
               "final_mean_temperature": stats.get("mean_temperature"), "final_mean_t_req": stats.get("mean_t_req"),
               "final_coverage": stats.get("coverage"), "final_selected": stats.get("selected"),
               "final_valid": stats.get("valid"), "final_easy_frac": stats.get("easy_frac")}
    if first and start_step == 0:
        metrics["first_mean_temperature"] = first["mean_temperature"]
    notes = []
    if eval_convs and is_master():
        heads.eval()
        batches = [tuple(t.to(device) for t in b) for b in SFTLoader(eval_convs, render, 8, max_len, train=False)]
        held_out = evaluate_heads(base, heads, batches, cfg)
        metrics |= {f"eval_{k}": v for k, v in held_out.items() if k != "t_req"}
        metrics |= {f"eval_t_req_{k}": v for k, v in held_out["t_req"].items()}
        by_kind = {k: "n/a" if held_out[k] is None else f"{held_out[k]:.3f}"
                   for k in ("mean_temperature_easy", "mean_temperature_topk")}
        notes.append(f"Held-out ({len(eval_convs)} conversations, {held_out['tokens']} tokens): mean predicted T "
                     f"{held_out['mean_temperature']:.3f} (easy tokens {by_kind['mean_temperature_easy']}, top-k "
                     f"tokens {by_kind['mean_temperature_topk']}); min-p ({args.min_p_ratio}) keeps the ground "
                     f"truth at the predicted T for {held_out['coverage']:.1%} of the tokens; T_req quantiles "
                     + ", ".join(f"{k} {v:.3f}" for k, v in held_out["t_req"].items() if k.startswith("p")) + ".")
        print0(notes[-1])
    extra = base_reference(payload["base_payload"]["path"], payload["extra"]["base_fingerprint"], args.out_dir)
    extra |= {"min_p_ratio": args.min_p_ratio, "train_temp": args.train_temp, "train_top_p": args.train_top_p,
              "temp_objective": args.temp_objective}
    stage.finish(heads, tokenizer_dir(payload), metrics, {"train_seconds": stage.elapsed()}, notes="\n\n".join(notes),
                 extra=extra, parents=[payload], world=payload["world"], device=device)
    dist_cleanup()


if __name__ == "__main__":
    run_script(main)
