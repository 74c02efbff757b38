"""
Pretrain the base GPT on packed documents.

    python -m scripts.base_train                                  # synthetic world, depth 4 (cpu profile)
    python -m scripts.base_train --depth=20 --source=fineweb --num_shards=240 --device_batch_size=32 \
        --batch_rows=512 --seq_len=2048                           # gpu profile
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20 --source=fineweb
    python -m scripts.base_train --resume                         # continue outs/base/ after an interruption

Each step trains on `--batch_rows` rows of `--seq_len` tokens (split over ranks and `--device_batch_size`
micro-batches). The length of the run is `--max_steps`, or else `--target_tokens`, or else
`--target_param_data_ratio` tokens per parameter (Chinchilla's 20 by default). Validation bits-per-byte every
`--eval_every` steps; greedy samples from held-out document openings; the resume state every `--save_every`
steps. With `--source=synthetic` the synthetic world is the one of `--seed` and `--synthetic_size`, recorded in
the checkpoint for every later stage. Writes outs/base/ (ckpt.pt and tokenizer/ at the end, optim.pt while
unfinished, meta.json, report.md and history.png; see nanochat/stage.py).
"""

import argparse

import torch

from nanochat.common import (InputError, add_common_flags, dist_cleanup, dist_init, fraction, nonnegative_float,
                             nonnegative_int, parse_flags, positive_float, positive_int, print0, run_script,
                             seed_everything, str2bool)
from nanochat.data import pretrain_documents
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_from_depth, lr_multiplier, model_size_summary, set_lr
from nanochat.loaders import PackedLoader
from nanochat.stage import Stage
from nanochat.tokenizer import Tokenizer
from nanochat.training import evaluate_bpb, train_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model
    parser.add_argument("--depth", type=positive_int, default=4, help="layers; width = 64 * depth, heads of 64 dims")
    parser.add_argument("--seq_len", type=positive_int, default=512, help="context length in tokens")
    # data
    parser.add_argument("--source", type=str, default="synthetic", choices=["synthetic", "local", "fineweb"])
    parser.add_argument("--data_dir", type=str, default=None)
    parser.add_argument("--num_shards", type=positive_int, default=2, help="fineweb shards (the last is validation)")
    parser.add_argument("--synthetic_size", type=positive_int, default=1)
    parser.add_argument("--num_docs", type=positive_int, default=None, help="cap on training documents")
    # batch and length
    parser.add_argument("--batch_rows", type=positive_int, default=16, help="global rows per optimizer step")
    parser.add_argument("--device_batch_size", type=positive_int, default=8, help="rows per forward/backward")
    parser.add_argument("--max_steps", type=positive_int, default=None,
                        help="optimizer steps (default: from --target_tokens, else from --target_param_data_ratio)")
    parser.add_argument("--target_tokens", type=positive_int, default=None,
                        help="training tokens (default: --target_param_data_ratio x parameters)")
    parser.add_argument("--target_param_data_ratio", type=positive_float, default=20.0)
    # optimization
    parser.add_argument("--matrix_optimizer", type=str, default="adamw", choices=["adamw", "muon"])
    parser.add_argument("--matrix_lr", type=nonnegative_float, default=None,
                        help="learning rate of the transformer's matrices (default: 0.002 adamw, 0.02 muon)")
    parser.add_argument("--embedding_lr", type=nonnegative_float, default=0.2)
    parser.add_argument("--unembedding_lr", type=nonnegative_float, default=0.004)
    parser.add_argument("--weight_decay", type=nonnegative_float, default=0.0)
    parser.add_argument("--warmup_steps", type=nonnegative_int, default=0)
    parser.add_argument("--warmdown_ratio", type=fraction, default=0.3, help="share of steps with a linear decay")
    parser.add_argument("--grad_clip", type=nonnegative_float, default=1.0, help="0 disables clipping")
    parser.add_argument("--compile", type=str2bool, default=False,
                        help="torch.compile the training forward (steps ~1.1x faster at depth 4 on 2 CPU cores, "
                             "after ~25 s of compiling; needs a C++ compiler)")
    # evaluation, checkpoints
    parser.add_argument("--eval_every", type=nonnegative_int, default=50, help="validation every N steps (0: at "
                        "the end only)")
    parser.add_argument("--eval_tokens", type=positive_int, default=65536, help="validation tokens per evaluation")
    parser.add_argument("--sample_every", type=nonnegative_int, default=0,
                        help="greedy samples every N steps (0: at the end only)")
    parser.add_argument("--save_every", type=nonnegative_int, default=100,
                        help="resumable state every N steps (0: never)")
    parser.add_argument("--resume", type=str2bool, default=False, help="continue from --out_dir")
    parser.add_argument("--log_every", type=positive_int, default=10)
    parser.add_argument("--tokenizer_dir", type=str, default="outs/tokenizer")
    parser.add_argument("--out_dir", type=str, default="outs/base")
    add_common_flags(parser)
    args = parse_flags(parser, argv)

    rank, world_size, device = dist_init(args.device)
    stage = Stage(args.out_dir, args, script="base_train")
    if stage.finished:
        return dist_cleanup()
    seed_everything(args.seed)
    try:
        tok = Tokenizer.load(args.tokenizer_dir)
    except (OSError, ValueError) as e:
        raise InputError(f"--tokenizer_dir: {e} (train one with python -m scripts.tok_train)") from e
    model = GPT(config_from_depth(args.depth, tok.vocab_size, args.seq_len)).to(device)
    print0(f"model: {model_size_summary(model)}")
    optimizers = model.setup_optimizers(args.matrix_lr, args.embedding_lr, args.unembedding_lr, args.weight_decay,
                                        args.matrix_optimizer)

    rows_per_micro = args.device_batch_size * world_size
    if args.batch_rows % rows_per_micro:
        raise InputError(f"--batch_rows={args.batch_rows} must be a multiple of --device_batch_size x world size "
                         f"= {rows_per_micro}")
    grad_accum = args.batch_rows // rows_per_micro
    tokens_per_step = args.batch_rows * args.seq_len
    if args.max_steps is not None:
        num_steps = args.max_steps
    else:
        target = args.target_tokens or args.target_param_data_ratio * model.num_params()
        num_steps = max(1, int(target // tokens_per_step))
    print0(f"{num_steps} steps x {tokens_per_step:,} tokens ({args.batch_rows} rows, {grad_accum} micro-batches "
           f"of {args.device_batch_size} rows on each of {world_size} ranks) = {num_steps * tokens_per_step:,} tokens")

    def data(split, num_docs=None):
        return pretrain_documents(args.source, split, data_dir=args.data_dir, num_docs=num_docs, seed=args.seed,
                                  synthetic_size=args.synthetic_size, num_shards=args.num_shards)

    train_docs, val_docs = data("train", args.num_docs), data("val")
    loader = PackedLoader(train_docs, tok, args.device_batch_size * world_size, args.seq_len, rank, world_size,
                          train=True, seed=args.seed)
    start_step, loader_state = stage.resume(model, optimizers, num_steps, args.tokenizer_dir, device)
    if loader_state is not None:
        loader.load_state_dict(loader_state)
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

    smooth_loss, loss = None, float("nan")
    model.train()
    for step in range(start_step, num_steps):
        if args.eval_every > 0 and step % args.eval_every == 0:
            stage.log_eval(step, {"bpb": val_bpb()})
        if args.sample_every > 0 and step > 0 and step % args.sample_every == 0:
            for line in samples():
                print0(f"  sample: {line}")
        lr = lr_multiplier(step, num_steps, args.warmup_steps, args.warmdown_ratio)
        set_lr(optimizers, lr)
        micro = [tuple(t.to(device) for t in next(train_iter)) for _ in range(grad_accum)]
        loss, grad_norm = train_step(train_model, optimizers, micro, args.grad_clip)
        smooth_loss = loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * loss
        tok_per_s = (step + 1 - start_step) * tokens_per_step / stage.elapsed()
        stage.log(step + 1, {"loss": loss, "grad_norm": grad_norm, "lr_multiplier": lr, "tok_per_s": tok_per_s},
                  f"loss {loss:.4f} (smooth {smooth_loss:.4f}) | grad norm {grad_norm:.3f} | {tok_per_s:,.0f} tok/s")
        stage.maybe_save(step + 1, model, optimizers, loader.state_dict())

    stage.log_eval(num_steps, {"bpb": val_bpb()})
    sample_lines = samples()
    for line in sample_lines:
        print0(f"  sample: {line}")
    history = stage.series("val/bpb")
    train_seconds = stage.elapsed()
    metrics = {"final_train_loss": loss, "val_bpb_first": history[0][1], "val_bpb_final": history[-1][1],
               "val_bpb_history": [f"{s}:{b:.4f}" for s, b in history], "num_params": model.num_params(),
               "steps": num_steps, "tokens": num_steps * tokens_per_step}
    world = {"seed": args.seed, "size": args.synthetic_size} if args.source == "synthetic" else None
    stage.finish(model, args.tokenizer_dir, metrics,
                 {"train_seconds": train_seconds,
                  "tokens_per_second": (num_steps - start_step) * tokens_per_step / max(train_seconds, 1e-9)},
                 notes="Samples (greedy):\n\n" + "\n".join(f"- {s}" for s in sample_lines), world=world,
                 device=device)
    dist_cleanup()


if __name__ == "__main__":
    run_script(main)
