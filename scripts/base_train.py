"""
Pretrain the base GPT on packed documents.

    python -m scripts.base_train                                  # synthetic world, depth 4 (cpu profile)
    python -m scripts.base_train --depth=20 --source=fineweb --num_shards=240 --device_batch_size=32 \
        --batch_rows=512 --seq_len=2048                           # gpu profile
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20 --source=fineweb
    python -m scripts.base_train --resume                         # continue outs/base/ after an interruption

Each step trains on `--batch_rows` rows of `--seq_len` tokens (split over ranks and `--device_batch_size`
micro-batches). The length of the run is `--num_steps`, or else `--target_tokens`, or else
`--target_param_data_ratio` tokens per parameter (Chinchilla's 20 by default). Validation bits-per-byte every
`--eval_every` steps; greedy samples from held-out document openings; a resumable checkpoint every `--save_every`.
Writes outs/base/ (ckpt.pt, optim.pt, meta.json, report.md).
"""

import argparse

import torch

from nanochat.checkpoint import load_resume_state, save_checkpoint
from nanochat.common import (WandbLogger, add_common_flags, dist_cleanup, dist_init, parse_flags, print0,
                             seed_everything, str2bool)
from nanochat.data import PackedLoader, pretrain_documents
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_from_depth, lr_multiplier, model_size_summary, set_lr
from nanochat.report import write_report
from nanochat.tokenizer import Tokenizer
from nanochat.training import Progress, evaluate_bpb, train_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model
    parser.add_argument("--depth", type=int, default=4, help="layers; width = 64 * depth, heads of 64 dims")
    parser.add_argument("--seq_len", type=int, default=512, help="context length in tokens")
    # data
    parser.add_argument("--source", type=str, default="synthetic", choices=["synthetic", "local", "fineweb"])
    parser.add_argument("--data_dir", type=str, default=None)
    parser.add_argument("--num_shards", type=int, default=2, help="fineweb shards (the last is validation)")
    parser.add_argument("--synthetic_size", type=int, default=1)
    parser.add_argument("--num_docs", type=int, default=None, help="cap on training documents")
    # batch and length
    parser.add_argument("--batch_rows", type=int, default=16, help="global rows per optimizer step")
    parser.add_argument("--device_batch_size", type=int, default=8, help="rows per forward/backward")
    parser.add_argument("--num_steps", type=int, default=-1, help="optimizer steps (-1: from the token target)")
    parser.add_argument("--target_tokens", type=int, default=-1, help="training tokens (-1: from the ratio)")
    parser.add_argument("--target_param_data_ratio", type=float, default=20.0)
    # optimization
    parser.add_argument("--matrix_optimizer", type=str, default="adamw", choices=["adamw", "muon"])
    parser.add_argument("--matrix_lr", type=float, default=None,
                        help="learning rate of the transformer's matrices (default: 0.002 adamw, 0.02 muon)")
    parser.add_argument("--embedding_lr", type=float, default=0.2)
    parser.add_argument("--unembedding_lr", type=float, default=0.004)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--warmup_steps", type=int, default=0)
    parser.add_argument("--warmdown_ratio", type=float, default=0.3, help="share of steps with a linear decay")
    parser.add_argument("--grad_clip", type=float, default=1.0, help="0 disables clipping")
    parser.add_argument("--compile", type=str2bool, default=False,
                        help="torch.compile the training forward (about 1.6x faster on CPU; needs a C++ compiler)")
    # evaluation, checkpoints
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--eval_tokens", type=int, default=65536, help="validation tokens per evaluation")
    parser.add_argument("--sample_every", type=int, default=-1, help="greedy samples every N steps (-1: at end)")
    parser.add_argument("--save_every", type=int, default=100, help="resumable checkpoint every N steps")
    parser.add_argument("--resume", type=str2bool, default=False, help="continue from --out_dir")
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--tokenizer_dir", type=str, default="outs/tokenizer")
    parser.add_argument("--out_dir", type=str, default="outs/base")
    add_common_flags(parser)
    args = parse_flags(parser, argv)

    rank, world_size, device = dist_init(args.device)
    seed_everything(args.seed)
    tok = Tokenizer.load(args.tokenizer_dir)
    model = GPT(config_from_depth(args.depth, tok.vocab_size, args.seq_len)).to(device)
    print0(f"model: {model_size_summary(model)}")
    optimizers = model.setup_optimizers(args.matrix_lr, args.embedding_lr, args.unembedding_lr, args.weight_decay,
                                        args.matrix_optimizer)

    rows_per_micro = args.device_batch_size * world_size
    if args.batch_rows % rows_per_micro:
        raise SystemExit(f"--batch_rows={args.batch_rows} must be a multiple of --device_batch_size x world size "
                         f"= {rows_per_micro}")
    grad_accum = args.batch_rows // rows_per_micro
    tokens_per_step = args.batch_rows * args.seq_len
    if args.num_steps > 0:
        num_steps = args.num_steps
    else:
        target = args.target_tokens if args.target_tokens > 0 else args.target_param_data_ratio * model.num_params()
        num_steps = max(1, int(target // tokens_per_step))
    print0(f"{num_steps} steps x {tokens_per_step:,} tokens ({args.batch_rows} rows, {grad_accum} micro-batches "
           f"of {args.device_batch_size} rows on each of {world_size} ranks) = {num_steps * tokens_per_step:,} tokens")

    def data(split, num_docs=None):
        return pretrain_documents(args.source, split, data_dir=args.data_dir, num_docs=num_docs, seed=args.seed,
                                  synthetic_size=args.synthetic_size, num_shards=args.num_shards)

    train_docs, val_docs = data("train", args.num_docs), data("val")
    loader = PackedLoader(train_docs, tok, args.device_batch_size * world_size, args.seq_len, rank, world_size,
                          train=True, seed=args.seed)
    start_step, history = 0, []  # history: (step, val bpb)
    if args.resume:
        start_step, extra = load_resume_state(args.out_dir, model, optimizers, device)
        if extra is not None:
            loader.load_state_dict(extra["loader"])
            history = extra["history"]
            print0(f"resumed from {args.out_dir} at step {start_step}")
    train_iter = iter(loader)
    # only the training forward is compiled: evaluation and sampling use other shapes and the plain module
    train_model = torch.compile(model) if args.compile else model
    val_rows = max(1, args.eval_tokens // args.seq_len)

    def val_bpb():
        model.eval()
        val_loader = PackedLoader(val_docs, tok, args.device_batch_size * world_size, args.seq_len, rank,
                                  world_size, train=False)
        batches = []
        for inputs, targets in val_loader:
            batches.append((inputs.to(device), targets.to(device)))
            if len(batches) * args.device_batch_size * world_size >= val_rows:
                break
        bpb = evaluate_bpb(model, batches, tok.token_bytes())
        model.train()
        return bpb

    def samples():
        model.eval()
        openings = [" ".join(d.split()[:6]) for d in val_docs[:4]]
        prompts = [tok.encode(o, prepend=tok.bos_token_id) for o in openings]
        gen = Engine(model).generate(prompts, max_new_tokens=24, temperature=0.0, stop_tokens=[tok.bos_token_id])
        model.train()
        return [o + " |" + tok.decode(c) for o, c in zip(openings, gen.completions())]

    wandb = WandbLogger(args.run, "nanochat-kat-base", vars(args))
    progress = Progress(num_steps, start_step)
    smooth_loss, loss = None, float("nan")
    model.train()

    def save(step, metrics=None):
        save_checkpoint(args.out_dir, model, step, args.tokenizer_dir, flags=vars(args),
                        metrics=metrics or {"val_bpb_history": history}, optimizers=optimizers,
                        extra_state={"loader": loader.state_dict(), "history": history})

    for step in range(start_step, num_steps):
        if args.eval_every > 0 and step % args.eval_every == 0:
            history.append((step, val_bpb()))
            print0(f"step {step:5d}/{num_steps} | val bpb {history[-1][1]:.4f}")
            wandb.log({"val/bpb": history[-1][1]}, step)
        if args.sample_every > 0 and step > 0 and step % args.sample_every == 0:
            for line in samples():
                print0(f"  sample: {line}")
        set_lr(optimizers, lr_multiplier(step, num_steps, args.warmup_steps, args.warmdown_ratio))
        micro = [tuple(t.to(device) for t in next(train_iter)) for _ in range(grad_accum)]
        loss, grad_norm = train_step(train_model, optimizers, micro, args.grad_clip)
        smooth_loss = loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * loss
        if step % args.log_every == 0 or step == num_steps - 1:
            tok_per_s = (step + 1 - start_step) * tokens_per_step / progress.elapsed()
            print0(f"step {step + 1:5d}/{num_steps} | loss {loss:.4f} (smooth {smooth_loss:.4f}) | grad norm "
                   f"{grad_norm:.3f} | {tok_per_s:,.0f} tok/s | ETA {progress.eta(step)}")
            wandb.log({"train/loss": loss, "train/grad_norm": grad_norm, "train/tok_per_s": tok_per_s}, step)
        if args.save_every > 0 and (step + 1) % args.save_every == 0 and step + 1 < num_steps and rank == 0:
            save(step + 1)

    history.append((num_steps, val_bpb()))
    print0(f"step {num_steps:5d}/{num_steps} | val bpb {history[-1][1]:.4f}")
    sample_lines = samples()
    for line in sample_lines:
        print0(f"  sample: {line}")
    train_seconds = progress.elapsed()
    metrics = {"final_train_loss": loss, "val_bpb_first": history[0][1], "val_bpb_final": history[-1][1],
               "val_bpb_history": [f"{s}:{b:.4f}" for s, b in history], "num_params": model.num_params(),
               "steps": num_steps, "tokens": num_steps * tokens_per_step}
    if rank == 0:
        save(num_steps, metrics)
        write_report(args.out_dir, metrics, {"train_seconds": train_seconds,
                                       "tokens_per_second": (num_steps - start_step) * tokens_per_step /
                                       max(train_seconds, 1e-9)},
                     vars(args), device, notes="Samples (greedy):\n\n" + "\n".join(f"- {s}" for s in sample_lines))
    wandb.finish()
    dist_cleanup()


if __name__ == "__main__":
    main()
