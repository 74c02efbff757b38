"""
Preference pairs as the RM and DPO stages use them: rendering a reply, the validation split, the global batch of a
step, sampling weights per pair, and the flags and data loading both stages share. Its own module because both
stages train on the same pairs the same way and neither should import the other's model.

Rendering. A (messages, reply) pair is the chat `messages + [{"role": "assistant", "content": reply}]` rendered by
`tok.render_conversation`: its ids end with <|assistant_end|>, and its mask is 1 on the final reply's tokens and
that end token only. The mask is not render_conversation's, which marks every assistant turn: in a multi-turn
conversation the earlier replies are context, and scoring them would dilute DPO's log-probs with the history. A
render longer than max_len is cut by nanochat/batching.py's `cut_left`: <|bos|>, then its last max_len - 1 tokens,
the end of the reply and the question right before it being what a reward or a log-prob is about. A reply that
alone is longer than max_len - 1 tokens loses its beginning.

Pair batches (`split_pair`, `pack_pairs`). Both stages run a pair as one prompt and two completions, the GroupBatch of
nanochat/grpo.py with groups of 2: the prompt's keys and values are computed once and both replies continue from
them (`completion_states`), so a pair costs its prompt once instead of twice, and completion row 2i is pair i's
chosen reply, row 2i + 1 its rejected one. Both replies read the same prompt tokens: when the prompt and the
longer reply exceed max_len, the prompt is cut from the left (keeping <|bos|>) until the longer reply fits, so the
two are compared in one context; replies that alone exceed max_len - 1 tokens are cut from the left after <|bos|>.

Sampling. Both arms draw a step's pairs with replacement, each prompt with probability proportional to its weight,
split evenly among its pairs: the density-aware arm's weight is the prompt's density weight, the uniform arm's is 1
for every prompt. So the arms differ only in the weights (uniform weights in a density file draw exactly the
uniform arm's batches), and a prompt with many pairs is not drawn more often than one with a single pair.
`--kind_weights` multiplies the weight of each pair of a rejected kind (synthetic pairs: artifact, evasive, wrong),
the same in both arms.

Accuracy counts a pair right when its margin (chosen minus rejected: a reward difference for the RM, a log-prob
or implicit-reward difference for DPO) is > 0, as TRL does: a tie counts 0, so a model that cannot tell the two
replies apart (step 0, or two identical replies) scores 0, not chance.
"""

import hashlib
import os
from typing import NamedTuple

import numpy as np
import torch

from nanochat.batching import cut_left
from nanochat.common import (InputError, add_common_flags, fraction, nonnegative_float, nonnegative_int,
                             positive_int, print0, str2bool)
from nanochat.density import load_density, pair_weights, sample_indices
from nanochat.grpo import pack_groups
from nanochat.pairs import read_pairs


# -----------------------------------------------------------------------------
# rendering and micro-batches

def render_reply(tok, messages, reply, max_len=None):
    """
    (ids, mask) of the conversation `messages` answered by `reply`, the mask 1 on the reply and its end token only;
    cut from the left to max_len tokens.
    """
    ids, _ = tok.render_conversation(messages + [{"role": "assistant", "content": reply}], max_tokens=None)
    prompt = tok.render_for_completion(messages)
    if ids[:len(prompt)] != prompt:
        raise ValueError("the chat template renders a reply's prompt differently from the prompt alone")
    mask = [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    return cut_left(ids, max_len), cut_left(mask, max_len)


def split_pair(tok, row, max_len=None):
    """
    (prompt ids, [chosen reply ids, rejected reply ids]) of a pair row: the render of the conversation up to the
    reply, then each reply's tokens and its <|assistant_end|>, cut to max_len as the module docstring says.
    """
    prompt = tok.render_for_completion(row["messages"])
    replies = [render_reply(tok, row["messages"], row[side])[0][len(prompt):] for side in ("chosen", "rejected")]
    longest = max(map(len, replies))
    if max_len and len(prompt) + longest > max_len:
        if longest < max_len:
            prompt = cut_left(prompt, max_len - longest)
        else:  # the replies alone fill the context: <|bos|>, then each one's last max_len - 1 tokens
            prompt, replies = prompt[:1], [reply[max(0, len(reply) - max_len + 1):] for reply in replies]
    return prompt, replies


def pack_pairs(pairs, device="cpu", pad_id=0):
    """A GroupBatch of `split_pair` results: pair i's prompt, then its chosen (row 2i) and rejected (2i + 1) reply."""
    return pack_groups([prompt for prompt, _ in pairs], [r for _, replies in pairs for r in replies], pad_id).to(device)


def micro_batches(tok, rows, pairs_per_batch, max_len=None, device="cpu"):
    """
    Pair rows as GroupBatches (`pack_pairs`) of `pairs_per_batch` pairs each, pairs of similar length together (less
    padding); a step's summed loss does not depend on how its pairs are grouped.
    """
    pairs = sorted((split_pair(tok, row, max_len) for row in rows),
                   key=lambda pair: len(pair[0]) + max(map(len, pair[1])))
    return [pack_pairs(pairs[i:i + pairs_per_batch], device) for i in range(0, len(pairs), pairs_per_batch)]


def pair_correct(margins):
    """1 per pair with margin > 0, else 0 (a tie too, as TRL's rewards/accuracies)."""
    return (margins > 0).float()


# -----------------------------------------------------------------------------
# split, sampling, density

def split_by_prompt(rows, share, seed):
    """
    (train, val) rows: a seeded hash coin per prompt_id puts a `share` of the conversations, with all their pairs,
    into val, so no prompt is on both sides. The salt differs from the train/test split of
    nanochat/pair_sources.py, which has already removed its own held-out prompts from pairs_all.jsonl.
    """
    train, val = [], []
    for row in rows:
        h = int(hashlib.sha256(f"rm-val-{seed}-{row['prompt_id']}".encode()).hexdigest()[:15], 16)
        (val if h < share * 16 ** 15 else train).append(row)
    return train, val


def sampling_weights(rows, density_path=None, kind_weights=None):
    """
    Per-row sampling weights: each prompt's weight shared evenly among the rows of the prompt (`pair_weights`). The
    weight is the prompt's density weight in density_path, or 1 for every prompt without one (the uniform arm).
    kind_weights ({rejected_kind: factor}) then multiplies the rows of those kinds, in both arms alike.
    """
    prompt_ids = [row["prompt_id"] for row in rows]
    weights = pair_weights(prompt_ids, load_density(density_path) if density_path else dict.fromkeys(prompt_ids, 1.0))
    if kind_weights:
        weights = weights * torch.tensor([kind_weights.get(row.get("rejected_kind"), 1.0) for row in rows],
                                         dtype=weights.dtype)
    return weights


def parse_kind_weights(text):
    """"wrong=4,evasive=0.5" -> {"wrong": 4.0, "evasive": 0.5}; "" -> {}. Factors are positive numbers."""
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, value = part.partition("=")
        try:
            factor = float(value) if sep and kind.strip() else float("nan")
        except ValueError:
            factor = float("nan")
        if not factor > 0 or factor == float("inf"):  # nan fails the first test
            raise ValueError(f"expected kind=factor pairs with a positive factor, like wrong=4, got {part!r}")
        weights[kind.strip()] = factor
    return weights


def kind_shares(rows, weights):
    """{rejected_kind: the share of draws it gets under `weights`}, for the rows that carry a kind."""
    shares = {}
    for row, w in zip(rows, weights.tolist()):
        if "rejected_kind" in row:
            shares[row["rejected_kind"]] = shares.get(row["rejected_kind"], 0.0) + w
    total = float(weights.sum())
    return {kind: w / total for kind, w in sorted(shares.items())}


def pair_batch(step, weights, batch_size, seed):
    """
    The global batch of row indices for optimizer step `step`: `batch_size` draws with replacement, probability
    proportional to `weights`, from a generator seeded by (seed, step). A pure function of (seed, step): every rank
    draws the same one, and --resume needs no sampler state.
    """
    stream_seed = int(np.random.SeedSequence([seed, step]).generate_state(1)[0])
    return sample_indices(weights, batch_size, torch.Generator().manual_seed(stream_seed)).tolist()


# -----------------------------------------------------------------------------
# what the preference stages (scripts/kat_train_rm.py, scripts/kat_train_dpo.py) share: flags and data

def add_pair_flags(parser):
    """Flags shared by the preference stages (RM and DPO)."""
    parser.add_argument("--sft_ckpt_path", type=str, default="outs/sft/ckpt.pt", help="the model to start from")
    parser.add_argument("--pairs_path", type=str, default=".cache/data/pairs_all.jsonl")
    parser.add_argument("--test_pairs_path", type=str, default=".cache/data/pairs_test.jsonl",
                        help="held-out pairs evaluated at the end (skipped with a note when missing)")
    parser.add_argument("--density_path", type=str, default=".cache/data/density.jsonl")
    parser.add_argument("--val_share", type=fraction, default=0.05, help="share of prompt ids held out for validation")
    parser.add_argument("--kind_weights", type=str, default="",
                        help="kind=factor,...: draw the training pairs whose rejected_kind is kind factor times as "
                             "often, in both arms (synthetic pairs carry a kind, hub pairs none); e.g. wrong=4 "
                             "spends the steps on the pairs that need facts, not on those learnt in tens of steps")
    parser.add_argument("--max_len", type=nonnegative_int, default=0,
                        help="tokens per reply render, cut from the left (0: the SFT model's context length)")
    parser.add_argument("--warmup_steps", type=nonnegative_int, default=10)
    parser.add_argument("--grad_clip", type=nonnegative_float, default=1.0, help="0 disables clipping")
    parser.add_argument("--eval_every", type=nonnegative_int, default=50,
                        help="validation every N steps (0: only at the end)")
    parser.add_argument("--eval_batch_size", type=positive_int, default=64, help="rows per evaluation forward")
    parser.add_argument("--save_every", type=nonnegative_int, default=100, help="resume state every N steps (0: never)")
    parser.add_argument("--log_every", type=positive_int, default=10)
    parser.add_argument("--resume", type=str2bool, default=False, help="continue from the output directory")
    add_common_flags(parser)
    return parser


class PairData(NamedTuple):
    """The pairs of a preference stage: split, held out, and how training draws them."""
    train: list            # pair rows to train on
    val: list              # pair rows of the held-out prompt ids (split_by_prompt)
    test: list             # the rows of --test_pairs_path, or None when it is missing or empty
    weights: torch.Tensor  # per-train-row sampling weights (float64, sampling_weights)


def load_pair_data(args, world_size):
    """The PairData of a preference stage's flags, with checks and printed notes."""
    if args.batch_size_pairs % (args.device_batch_size * world_size):
        raise InputError(f"--batch_size_pairs={args.batch_size_pairs} must be a multiple of --device_batch_size x "
                         f"world size = {args.device_batch_size * world_size}")
    rows, log = read_pairs(args.pairs_path, "--pairs_path")
    if log.total():
        print0(log.note(args.pairs_path))
    train, val = split_by_prompt(rows, args.val_share, args.seed)
    if not train:
        raise InputError(f"{args.pairs_path}: no usable training pairs")
    test = None
    if args.test_pairs_path and os.path.exists(args.test_pairs_path) and os.path.getsize(args.test_pairs_path):
        test, test_log = read_pairs(args.test_pairs_path, "--test_pairs_path")
        if test_log.total():
            print0(test_log.note(args.test_pairs_path))
    elif args.test_pairs_path:
        print0(f"note: {args.test_pairs_path} is missing or empty; no test evaluation")
    try:
        kind_weights = parse_kind_weights(args.kind_weights)
    except ValueError as e:
        raise InputError(f"--kind_weights={args.kind_weights!r}: {e}") from None
    kinds = {row["rejected_kind"] for row in train if "rejected_kind" in row}
    if set(kind_weights) - kinds:
        raise InputError(f"--kind_weights: no training pair of {args.pairs_path} has rejected_kind "
                         f"{', '.join(sorted(set(kind_weights) - kinds))} (kinds there: "
                         f"{', '.join(sorted(kinds)) or 'none'})")
    try:
        weights = sampling_weights(train, args.density_path if args.density_aware else None, kind_weights)
    except InputError as e:
        raise InputError(f"--density_aware: {e} (write it with python -m scripts.kat_density, or pass "
                         f"--density_aware=False)") from e
    print0(f"{len(rows)} pairs: {len(train)} training, {len(val)} validation ({args.val_share:.0%} of prompt ids); "
           f"{len(test) if test is not None else 0} test; prompts drawn "
           f"{'by density weight' if args.density_aware else 'uniformly'}")
    if kind_weights:
        print0("--kind_weights: share of draws by rejected kind "
               + ", ".join(f"{kind} {share:.0%}" for kind, share in kind_shares(train, weights).items()))
    return PairData(train, val, test, weights)
