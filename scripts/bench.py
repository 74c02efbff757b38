"""
Speed benchmarks at the design doc's reference size (depth 4: width 256, 4 heads; vocab 4096; context 512) on a
randomly initialised model, plus the Muon vs AdamW race that decides the default matrix optimizer. Prints one
table at the end and writes outs/bench.json (atomically; a partial `--only` run writes only its workloads).

    python -m scripts.bench                                    # all three workloads: ~3.5 minutes on 2 quiet cores
    python -m scripts.bench --only=train,generate              # skip the 2 x 60 s optimizer race
    python -m scripts.bench --only=optimizers --opt_seconds=300 --out=outs/bench_optimizers.json
    python -m scripts.bench --threads=1 --out=outs/bench_1thread.json

What is measured:
  train       tokens/s of `nanochat.training.train_step` (forward, backward, grad clip, optimizer step) on one
              micro-batch of --train_batch x --seq_len random tokens, for matrix optimizer muon and adamw, the two
              taking turns step by step: --train_warmup untimed steps, then tokens / seconds over --train_steps
              timed steps, and the same from the median step alone (robust to a neighbour's burst of load).
  generate    greedy decoding from random 32-token prompts at each batch size of --gen_batches, reported as
              batch * new tokens / seconds. "kv cache" is Engine.generate (temperature 0, no stop tokens; the
              prefill is inside the timed region). "no cache" is `naive_generate` below: every new token reruns
              the whole sequence through every layer. The no-cache time per token grows with the sequence, so by
              default both time the same tokens 1..--new_tokens. --naive_new_tokens=N < --new_tokens times only
              tokens 1..N of the no-cache loop, its cheapest ones: its tokens/s is then an upper bound and the
              cache speedup a lower bound. Each figure is one timed run after a short untimed warmup.
  optimizers  Muon vs AdamW with the defaults of `GPT.setup_optimizers`, each training the same freshly seeded
              model for --opt_seconds of its own step time on the same fixed token stream: synthetic world
              documents tokenized by a BPE tokenizer of --opt_vocab_size trained on them, cut into rows of
              --opt_seq_len + 1 tokens, batches of --opt_batch_rows rows read in order (wrapping around if the
              budget outlasts the stream). The two runs are interleaved step by step, so the machine's load hits
              both alike; each clock counts only that optimizer's train_step calls (data slicing and evaluation
              are outside). The learning rate decays linearly to 0 over the last 30% of the budget (base_train's
              warmdown, in seconds instead of steps). Reports steps done, the mean training loss of the last 10
              steps and the loss on held-out rows from documents of another seed; the lower held-out loss wins.

Timings are wall clock, so a shared machine makes them noisy: the json records the 1-minute load average before
and after (this run's own threads count towards the second). Reference figures appear only at the reference size.
"""

import argparse
import itertools
import os
import platform
import statistics
import time

import torch

from nanochat.common import atomic_write_json, parse_flags, seed_everything
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_from_depth, set_lr
from nanochat.synthetic import make_world
from nanochat.tokenizer import train_tokenizer
from nanochat.training import train_step

WORKLOADS = ("train", "generate", "optimizers")
OPTIMIZERS = ("muon", "adamw")
PROMPT_LEN = 32
WARMDOWN = 0.3  # share of the race's time budget with a linearly decaying learning rate
LAST_STEPS = 10  # the race's training loss is averaged over this many final steps: one batch is too noisy

# measured by the design doc with HF transformers on this machine class, at the reference size
REF_TRAIN_TOKENS_PER_S = 2960  # GPT-2, batch 8 x 512
REF_GENERATE_TOKENS_PER_S = {1: 250, 16: 1790}  # generate(), greedy, 256 new tokens


def at_reference_size(args):
    return (args.depth, args.vocab_size, args.seq_len) == (4, 4096, 512)


def sync(device):
    # GPU kernels run asynchronously: stop the clock only once they have finished
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def fresh_model(config, seed, device):
    seed_everything(seed)
    return GPT(config).to(device)


# -----------------------------------------------------------------------------
# train: optimizer steps per second

def bench_train(args, config, device):
    gen = torch.Generator().manual_seed(args.seed)
    rows = torch.randint(0, config.vocab_size, (args.train_batch, args.seq_len + 1), generator=gen).to(device)
    micro = [(rows[:, :-1], rows[:, 1:])]
    tokens_per_step = args.train_batch * args.seq_len
    runs = {}
    for name in OPTIMIZERS:
        model = fresh_model(config, args.seed, device)
        runs[name] = (model, model.setup_optimizers(matrix_optimizer=name))
    step_seconds = {name: [] for name in OPTIMIZERS}
    for i in range(args.train_warmup + args.train_steps):
        # the optimizers take turns step by step, so a shared machine's changing load slows both alike
        for name, (model, optimizers) in runs.items():
            _, seconds = timed(lambda: train_step(model, optimizers, micro), device)
            if i >= args.train_warmup:
                step_seconds[name].append(seconds)
    results = {}
    for name, seconds in step_seconds.items():
        tps = len(seconds) * tokens_per_step / sum(seconds)
        median_tps = tokens_per_step / statistics.median(seconds)
        results[name] = {"tokens_per_s": tps, "tokens_per_s_median_step": median_tps, "step_seconds": seconds}
        print(f"train {name:5s}: {tps:,.0f} tok/s (median step {median_tps:,.0f})", flush=True)
    reference = REF_TRAIN_TOKENS_PER_S if at_reference_size(args) and args.train_batch == 8 else None
    return {"batch": args.train_batch, "seq_len": args.seq_len, "warmup_steps": args.train_warmup,
            "timed_steps": args.train_steps, **results, "reference_hf_gpt2_tokens_per_s": reference}


# -----------------------------------------------------------------------------
# generate: KV cache vs recomputing everything

@torch.no_grad()
def naive_generate(model, prompts, new_tokens):
    """Greedy decoding of (B, T) prompts without a cache: every new token reruns the whole sequence."""
    ids = prompts
    for _ in range(new_tokens):
        # only the last position goes through the LM head: all argmax needs, and what HF generate does too
        logits = model.logits_from_hidden(model.hidden_states(ids)[:, -1])
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return ids[:, prompts.size(1):]


def bench_generate(args, config, device):
    model = fresh_model(config, args.seed, device).eval()
    engine = Engine(model)
    naive_tokens = args.new_tokens if args.naive_new_tokens <= 0 else min(args.naive_new_tokens, args.new_tokens)
    gen = torch.Generator().manual_seed(args.seed)
    at_reference = at_reference_size(args) and args.new_tokens == 256
    results = {"prompt_len": PROMPT_LEN, "new_tokens": args.new_tokens, "naive_new_tokens": naive_tokens,
               "batches": {}}
    for batch in args.gen_batches:
        prompts = torch.randint(0, config.vocab_size, (batch, PROMPT_LEN), generator=gen).to(device)
        prompt_lists = prompts.tolist()

        def cached(n):
            return engine.generate(prompt_lists, max_new_tokens=n, temperature=0.0).tokens

        # warmup: first-call allocations stay out of the timings
        cached(4)
        naive_generate(model, prompts, 4)
        tokens, cache_s = timed(lambda: cached(args.new_tokens), device)
        assert tokens.shape == (batch, args.new_tokens)  # an early stop would inflate tokens/s
        _, naive_s = timed(lambda: naive_generate(model, prompts, naive_tokens), device)
        cache_tps, naive_tps = batch * args.new_tokens / cache_s, batch * naive_tokens / naive_s
        results["batches"][batch] = {
            "kv_cache": {"tokens_per_s": cache_tps, "seconds": cache_s},
            "no_cache": {"tokens_per_s": naive_tps, "seconds": naive_s},
            "cache_speedup": cache_tps / naive_tps,
            "reference_hf_generate_tokens_per_s": REF_GENERATE_TOKENS_PER_S.get(batch) if at_reference else None,
        }
        print(f"generate batch {batch}: kv cache {cache_tps:,.0f} tok/s, no cache {naive_tps:,.0f} tok/s "
              f"({cache_tps / naive_tps:.1f}x)", flush=True)
    return results


# -----------------------------------------------------------------------------
# optimizers: loss reached in a fixed wall-clock budget

def token_rows(docs, tok, row_len):
    """Documents -> one BOS-separated token stream, cut into (rows, row_len) with the tail dropped."""
    stream = torch.tensor(list(itertools.chain.from_iterable(tok.encode(docs, prepend=tok.bos_token_id))))
    return stream[:len(stream) // row_len * row_len].view(-1, row_len)


@torch.no_grad()
def mean_loss(model, rows, batch):
    model.eval()
    total = sum(model(r[:, :-1], r[:, 1:], loss_reduction="sum").item() for r in rows.split(batch))
    model.train()
    return total / (rows.size(0) * (rows.size(1) - 1))


class Racer:
    """One optimizer's run in the race. Its clock counts only its own steps."""

    def __init__(self, name, config, args, device):
        self.name, self.budget, self.device = name, args.opt_seconds, device
        self.model = fresh_model(config, args.seed, device)
        self.optimizers = self.model.setup_optimizers(matrix_optimizer=name)
        self.seconds, self.losses, self.curve = 0.0, [], []

    def step(self, rows):
        set_lr(self.optimizers, min(1.0, (1 - self.seconds / self.budget) / WARMDOWN))
        (loss, _), seconds = timed(lambda: train_step(self.model, self.optimizers, [(rows[:, :-1], rows[:, 1:])]),
                                   self.device)
        self.seconds += seconds
        self.losses.append(loss)
        self.curve.append((round(self.seconds, 3), round(loss, 4)))


def bench_optimizers(args, device):
    world = make_world(args.seed)
    train_docs = world.pretrain_documents(args.opt_docs, seed=args.seed)
    heldout_docs = world.pretrain_documents(args.opt_heldout_docs, seed=args.seed + 1)
    tok = train_tokenizer(iter(train_docs), args.opt_vocab_size)
    train_rows = token_rows(train_docs, tok, args.opt_seq_len + 1).to(device)
    heldout_rows = token_rows(heldout_docs, tok, args.opt_seq_len + 1).to(device)
    config = config_from_depth(args.depth, tok.vocab_size, args.opt_seq_len)
    results = {"depth": args.depth, "vocab_size": tok.vocab_size, "seq_len": args.opt_seq_len,
               "batch_rows": args.opt_batch_rows, "budget_seconds": args.opt_seconds,
               "train_tokens": train_rows[:, :-1].numel(), "heldout_tokens": heldout_rows[:, :-1].numel()}
    batches = train_rows.split(args.opt_batch_rows)[:len(train_rows) // args.opt_batch_rows]  # full ones only
    racers = [Racer(name, config, args, device) for name in OPTIMIZERS]
    # interleaved, always stepping whoever has used less of its budget: a shared machine's changing load then
    # slows both alike instead of whichever happened to run second
    while (racer := min(racers, key=lambda r: r.seconds)).seconds < args.opt_seconds:
        racer.step(batches[len(racer.losses) % len(batches)])
    for r in racers:
        last = r.losses[-LAST_STEPS:]
        results[r.name] = {"steps": len(r.losses), "seconds": r.seconds,
                           "seconds_per_step": r.seconds / len(r.losses), "epochs": len(r.losses) / len(batches),
                           "train_loss": sum(last) / len(last),
                           "heldout_loss": mean_loss(r.model, heldout_rows, args.opt_batch_rows), "curve": r.curve}
        o = results[r.name]
        print(f"optimizers {r.name:5s}: {o['steps']} steps in {o['seconds']:.0f} s, train loss {o['train_loss']:.4f}, "
              f"held-out loss {o['heldout_loss']:.4f}", flush=True)
    results["winner"] = min(OPTIMIZERS, key=lambda n: results[n]["heldout_loss"])
    return results


# -----------------------------------------------------------------------------

def environment(device):
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_average_start": os.getloadavg()}


def table(results):
    rows = [("workload", "measured", "reference")]
    if "train" in results:
        r = results["train"]
        ref = r["reference_hf_gpt2_tokens_per_s"]
        for name in OPTIMIZERS:
            t = r[name]
            rows.append((f"train {name} {r['batch']}x{r['seq_len']}",
                         f"{t['tokens_per_s']:,.0f} tok/s (median step {t['tokens_per_s_median_step']:,.0f})",
                         f"{ref:,} tok/s HF GPT-2" if ref else ""))
    if "generate" in results:
        r = results["generate"]
        for batch, g in r["batches"].items():
            ref = g["reference_hf_generate_tokens_per_s"]
            rows.append((f"generate b{batch} kv cache ({r['new_tokens']} tok)",
                         f"{g['kv_cache']['tokens_per_s']:,.0f} tok/s", f"{ref:,} tok/s HF generate" if ref else ""))
            rows.append((f"generate b{batch} no cache ({r['naive_new_tokens']} tok)",
                         f"{g['no_cache']['tokens_per_s']:,.0f} tok/s", ""))
            rows.append((f"generate b{batch} cache speedup", f"{g['cache_speedup']:.1f}x", ""))
    if "optimizers" in results:
        r = results["optimizers"]
        for name in OPTIMIZERS:
            o = r[name]
            rows.append((f"optimizers {name} {r['budget_seconds']:g} s ({o['steps']} steps)",
                         f"train {o['train_loss']:.3f} / held-out {o['heldout_loss']:.3f}",
                         "winner" if name == r["winner"] else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=str, default=",".join(WORKLOADS), help="comma-separated subset of "
                        + ", ".join(WORKLOADS))
    parser.add_argument("--depth", type=int, default=4, help="layers; width = 64 * depth, heads of 64 dims")
    parser.add_argument("--vocab_size", type=int, default=4096, help="train and generate (random tokens)")
    parser.add_argument("--seq_len", type=int, default=512, help="train rows and the model's context")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--threads", type=int, default=cores,
                        help="torch intra-op threads (default: every core this process may use)")
    parser.add_argument("--device", type=str, default="cpu", help="the reference figures are CPU ones")
    parser.add_argument("--seed", type=int, default=42)
    # train
    parser.add_argument("--train_batch", type=int, default=8)
    parser.add_argument("--train_warmup", type=int, default=2, help="untimed steps")
    parser.add_argument("--train_steps", type=int, default=5, help="timed steps")
    # generate
    parser.add_argument("--gen_batches", type=str, default="1,16")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--naive_new_tokens", type=int, default=-1,
                        help="tokens the no-cache loop generates (-1: --new_tokens; fewer times only the first ones)")
    # optimizers
    parser.add_argument("--opt_seconds", type=float, default=60.0, help="train_step seconds per optimizer")
    parser.add_argument("--opt_vocab_size", type=int, default=1024)
    parser.add_argument("--opt_seq_len", type=int, default=256)
    parser.add_argument("--opt_batch_rows", type=int, default=16)
    parser.add_argument("--opt_docs", type=int, default=20000, help="training documents (~140 tokens each)")
    parser.add_argument("--opt_heldout_docs", type=int, default=300)
    parser.add_argument("--out", type=str, default="outs/bench.json")
    args = parse_flags(parser, argv)
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    if not only or set(only) - set(WORKLOADS):
        raise SystemExit(f"--only takes a comma-separated subset of {', '.join(WORKLOADS)}, got {args.only!r}")
    args.gen_batches = [int(b) for b in args.gen_batches.split(",")]

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {"environment": environment(device), "flags": dict(vars(args))}
    if "train" in only or "generate" in only:
        config = config_from_depth(args.depth, args.vocab_size, args.seq_len)
    if "train" in only:
        results["train"] = bench_train(args, config, device)
    if "generate" in only:
        results["generate"] = bench_generate(args, config, device)
    if "optimizers" in only:
        results["optimizers"] = bench_optimizers(args, device)
    results["environment"]["load_average_end"] = os.getloadavg()

    env = results["environment"]
    print(f"\ntorch {env['torch']} on {env['device']} ({env['cpu_capability']}), {env['threads']} threads of "
          f"{env['cpu_count']} cpus, load average {env['load_average_start'][0]:.2f} -> "
          f"{env['load_average_end'][0]:.2f}")
    print(table(results))
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
