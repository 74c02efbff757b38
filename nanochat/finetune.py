"""
The loop shared by the chat stages that continue a checkpoint on conversations:

- mid-training (`scripts/mid_train.py`): conversations rendered with the chat template and packed into rows like
  pretraining text, loss on every token, so the model learns the special tokens and the turn structure;
- SFT (`scripts/chat_sft.py`): one conversation per row, loss only on the assistant's tokens.

Both start from a checkpoint (`--ckpt_path`), use the optimizer recipe of base training at a fraction of its
learning rates (`--lr_frac`), decay linearly to zero, evaluate validation loss, save resumable checkpoints and
write their report section.

Synthetic answers carry planted artifacts at `--artifact_rate`, on every cluster (`--artifact_focus=all`) or only
on the rare ones (`rare`, nanochat.synthetic.RARE_CLUSTERS): the positive control, whose SFT model has its
artifacts where density-aware RLHF samples more, while the world and the reward model stay the same.
"""

import math

import torch

from nanochat.checkpoint import load_model, load_tokenizer, tokenizer_dir
from nanochat.common import (InputError, add_common_flags, dist_cleanup, dist_init, fraction, nonnegative_float,
                             nonnegative_int, positive_float, positive_int, print0, seed_everything,
                             str2bool)
from nanochat.data import chat_conversations
from nanochat.gpt import MATRIX_LR, lr_multiplier, set_lr
from nanochat.stage import Stage
from nanochat.synthetic import RARE_CLUSTERS
from nanochat.training import evaluate_loss, train_step


def add_finetune_flags(parser, ckpt_path, out_dir, num_conversations, stream, artifact_rate):
    parser.add_argument("--ckpt_path", type=str, default=ckpt_path, help="checkpoint to start from")
    parser.add_argument("--source", type=str, default="synthetic", choices=["synthetic", "smoltalk"])
    parser.add_argument("--from_dir", type=str, default=None, help="local copy of the hub data set (smoltalk)")
    parser.add_argument("--num_conversations", type=positive_int, default=num_conversations,
                        help="training conversations")
    parser.add_argument("--val_conversations", type=positive_int, default=200)
    parser.add_argument("--stream", type=nonnegative_int, default=stream,
                        help="which sample of synthetic conversations")
    parser.add_argument("--artifact_rate", type=fraction, default=artifact_rate,
                        help="share of synthetic answers with planted mode-collapse artifacts")
    parser.add_argument("--artifact_focus", type=str, default="all", choices=["all", "rare"],
                        help="synthetic answers that may carry artifacts: all, or only those about the rare "
                             "clusters (nanochat.synthetic.RARE_CLUSTERS; the positive control)")
    parser.add_argument("--free_clause_rate", type=fraction, default=0.0,
                        help="share of synthetic answers ending in a free clause, any of many equally good ones "
                             "(AutoDeco's data: one answer mixes one-right-value tokens with free ones)")
    parser.add_argument("--mc_conversations", type=nonnegative_int, default=0,
                        help="synthetic only: this many of the world's multiple-choice questions answered in STaR's "
                             "format (a short rationale, then 'Answer: X') join the training conversations")
    parser.add_argument("--mc_l2_share", type=fraction, default=0.1,
                        help="share of those in the world's second language, the low-resource one STaR studies")
    parser.add_argument("--workflow_conversations", type=nonnegative_int, default=0,
                        help="synthetic only: this many of workflow GRPO's conversations (the policy writing "
                             "workflows, the executor answering operator prompts) join the training conversations")
    parser.add_argument("--workflow_policy_share", type=fraction, default=0.3,
                        help="share of those that are the policy's; the rest are the executor's")
    parser.add_argument("--batch_rows", type=positive_int, default=16, help="global rows (conversations) per step")
    parser.add_argument("--device_batch_size", type=positive_int, default=8)
    parser.add_argument("--max_len", type=positive_int, default=512, help="tokens per row")
    parser.add_argument("--num_epochs", type=positive_float, default=1.0,
                        help="length of the run when --max_steps is not given")
    parser.add_argument("--max_steps", type=positive_int, default=None, help="optimizer steps (default: from "
                        "--num_epochs)")
    parser.add_argument("--matrix_optimizer", type=str, default="adamw", choices=["adamw", "muon"])
    parser.add_argument("--matrix_lr", type=nonnegative_float, default=None,
                        help="learning rate of the transformer's matrices (default: 0.002 adamw, 0.02 muon)")
    parser.add_argument("--embedding_lr", type=nonnegative_float, default=0.2)
    parser.add_argument("--unembedding_lr", type=nonnegative_float, default=0.004)
    parser.add_argument("--lr_frac", type=nonnegative_float, default=0.5, help="multiplies every learning rate")
    parser.add_argument("--warmdown_ratio", type=fraction, default=1.0, help="1.0: linear decay over the whole run")
    parser.add_argument("--grad_clip", type=nonnegative_float, default=1.0, help="0 disables clipping")
    parser.add_argument("--compile", type=str2bool, default=False,
                        help="torch.compile the training forward (pays off when rows have one fixed length)")
    parser.add_argument("--eval_every", type=nonnegative_int, default=50, help="validation every N steps (0: at the "
                        "end only)")
    parser.add_argument("--save_every", type=nonnegative_int, default=100, help="resume state every N steps (0: never)")
    parser.add_argument("--log_every", type=positive_int, default=10)
    parser.add_argument("--resume", type=str2bool, default=False)
    parser.add_argument("--out_dir", type=str, default=out_dir)
    add_common_flags(parser)
    return parser


def finetune(args, script, make_loader, tokens_per_conversation_hint=None):
    """
    Run a chat stage. `make_loader(conversations, tok, global_rows, rank, world_size, train)` returns a resumable
    loader of (inputs, targets).
    """
    if args.artifact_focus != "all" and args.source != "synthetic":
        raise InputError(f"--artifact_focus={args.artifact_focus} plants artifacts in synthetic conversations; "
                         f"it needs --source=synthetic, not {args.source}")
    rank, world_size, device = dist_init(args.device)
    stage = Stage(args.out_dir, args, script=script)
    if stage.finished:
        return dist_cleanup()
    seed_everything(args.seed)
    model, payload = load_model(args.ckpt_path, device)
    model.train()
    tok = load_tokenizer(payload)
    lr = args.lr_frac
    matrix_lr = MATRIX_LR[args.matrix_optimizer] if args.matrix_lr is None else args.matrix_lr
    optimizers = model.setup_optimizers(matrix_lr * lr, args.embedding_lr * lr, args.unembedding_lr * lr,
                                        matrix_optimizer=args.matrix_optimizer)
    rows_per_micro = args.device_batch_size * world_size
    if args.batch_rows % rows_per_micro:
        raise InputError(f"--batch_rows={args.batch_rows} must be a multiple of --device_batch_size x world size "
                         f"= {rows_per_micro}")
    grad_accum = args.batch_rows // rows_per_micro

    # synthetic conversations come from the world the model was pretrained on (its checkpoint says which), so
    # the facts they state are the facts it learnt; a model pretrained on real data starts a world of --seed
    world = None
    if args.source == "synthetic":
        world = payload["world"] or {"seed": args.seed, "size": 1}
        print0(f"synthetic world: seed {world['seed']}, size {world['size']} (from {payload['path']})")

    # the positive control: the same per-answer rate, on the rare clusters' answers only
    artifact_rate = args.artifact_rate
    if args.artifact_focus == "rare":
        artifact_rate = dict.fromkeys(RARE_CLUSTERS, args.artifact_rate)

    def conversations(split, num):
        return chat_conversations(args.source, split, from_dir=args.from_dir, num=num,
                                  seed=world["seed"] if world else args.seed,
                                  synthetic_size=world["size"] if world else 1, stream=args.stream,
                                  artifact_rate=artifact_rate, free_clause_rate=args.free_clause_rate)

    train_convs = conversations("train", args.num_conversations)
    val_convs = conversations("val", args.val_conversations)
    if args.mc_conversations:  # STaR's answer format; only training questions, so STaR's held-out ones stay unseen
        if world is None:
            raise InputError("--mc_conversations needs --source=synthetic (the world's multiple-choice questions)")
        from nanochat import mcqa  # reads hub data sets too: imported only when asked for
        train_convs += mcqa.sft_conversations(world, args.mc_conversations, args.mc_l2_share, args.seed)
        print0(f"{args.mc_conversations} multiple-choice conversations, a {args.mc_l2_share:.0%} share in the "
               f"second language")
    if args.workflow_conversations:  # workflow GRPO's two roles; only training tasks, so its eval tasks stay unseen
        if world is None:
            raise InputError("--workflow_conversations needs --source=synthetic (the world's workflow tasks)")
        from nanochat import workflow_data  # pulls in the task loaders: imported only when asked for
        train_convs += workflow_data.sft_conversations(world, args.workflow_conversations,
                                                       args.workflow_policy_share, args.seed)
        print0(f"{args.workflow_conversations} workflow conversations, a {args.workflow_policy_share:.0%} share "
               f"of them the policy's")
    loader = make_loader(train_convs, tok, rows_per_micro, rank, world_size, True)
    if args.max_steps is not None:
        num_steps = args.max_steps
    else:  # rows per epoch: one per conversation, or fewer when several are packed into a row
        rows_per_epoch = len(train_convs) / (tokens_per_conversation_hint(train_convs, tok)
                                             if tokens_per_conversation_hint else 1)
        num_steps = max(1, math.ceil(args.num_epochs * rows_per_epoch / args.batch_rows))
    print0(f"{len(train_convs)} training conversations, {num_steps} steps of {args.batch_rows} rows")

    start_step, loader_state = stage.resume(model, optimizers, num_steps, tokenizer_dir(payload), device)
    if loader_state is not None:
        loader.load_state_dict(loader_state)
    train_iter = iter(loader)
    train_model = torch.compile(model) if args.compile else model

    def val_loss():
        model.eval()
        batches = [(x.to(device), y.to(device))
                   for x, y in make_loader(val_convs, tok, rows_per_micro, rank, world_size, False)]
        loss = evaluate_loss(model, batches)
        model.train()
        return loss

    loss = float("nan")
    for step in range(start_step, num_steps):
        if args.eval_every > 0 and step % args.eval_every == 0:
            stage.log_eval(step, {"loss": val_loss()})
        lr = lr_multiplier(step, num_steps, 0, args.warmdown_ratio)
        set_lr(optimizers, lr)
        micro = [tuple(t.to(device) for t in next(train_iter)) for _ in range(grad_accum)]
        loss, grad_norm = train_step(train_model, optimizers, micro, args.grad_clip)
        stage.log(step + 1, {"loss": loss, "grad_norm": grad_norm, "lr_multiplier": lr},
                  f"loss {loss:.4f} | grad norm {grad_norm:.3f}")
        stage.maybe_save(step + 1, model, optimizers, loader.state_dict())
    stage.log_eval(num_steps, {"loss": val_loss()})
    history = stage.series("val/loss")
    metrics = {"final_train_loss": loss, "val_loss_first": history[0][1], "val_loss_final": history[-1][1],
               "val_loss_history": [f"{s}:{v:.4f}" for s, v in history], "steps": num_steps,
               "train_conversations": len(train_convs)}
    stage.finish(model, tokenizer_dir(payload), metrics, {"train_seconds": stage.elapsed()}, parents=[payload],
                 world=world, device=device)
    dist_cleanup()
