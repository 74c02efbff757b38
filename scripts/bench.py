"""
Speed benchmarks at the project's reference size (depth 4: width 256, 4 heads; vocab 4096; context 512) on a
randomly initialised model and random tokens: pretraining and decoding throughput, the Muon vs AdamW race that
decides the default matrix optimizer, the post-training steps (reward model, DPO, GRPO), a workflow GRPO step by
part, and the kNN behind the density weights. train, generate, rm, dpo and grpo run beside their peers, measured in
the same run by scripts/bench_peers.py: HF transformers' GPT-2 (training step, `generate`) and TRL's RewardTrainer,
DPOTrainer and GRPOTrainer, when the peers extra is installed (`pip install -e '.[peers]'`; without it ours run alone
and the table says so). Prints one table at the end and writes outs/bench.json (atomically; a partial `--only` run
writes only its workloads).

    python -m scripts.bench                                    # every workload
    python -m scripts.bench --only=train,generate,rm,dpo,grpo  # every comparison with a peer, 3 repeats each
    python -m scripts.bench --only=train,generate --repeats=5
    python -m scripts.bench --only=train,generate,optimizers
    python -m scripts.bench --only=rm,dpo,grpo --peers=False   # ours alone
    python -m scripts.bench --only=grpo --compile=True         # as kat_train_grpo --compile=True
    python -m scripts.bench --only=density --density_n=200000 --brute_max_gib=8
    python -m scripts.bench --only=optimizers --opt_seconds=300 --out=outs/bench_optimizers.json
    python -m scripts.bench --threads=1 --out=outs/bench_1thread.json
    python -m scripts.bench --only=autodeco                    # what AutoDeco's heads add to decoding
    python -m scripts.bench --only=workflow                    # where a workflow GRPO step's time goes

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
  rm          pairs/s of one reward-model step as scripts/kat_train_rm.py takes it: `nanochat.rm.rm_train_step`
              (rewards of the chosen and rejected rows, Bradley-Terry loss with centering 0.01, backward, grad
              clip 1, optimizer step) of `RewardModel(GPT(config))` on --pairs pairs of --rm_len random chosen
              and --rm_len random rejected tokens that share only their first token (a pair batch's one-token
              prompt: nanochat.preference.pack_pairs), in micro-batches of --pair_device_batch_size pairs built once
              before timing. The last block runs only the end token's query. `setup_rm_optimizers` at the
              script's default learning rates with the backbone's matrices on muon (the script's default) and on
              adamw, the two taking turns step by step: --pair_warmup untimed steps, then pairs / seconds over
              --pair_steps timed steps and from the median step.
  dpo         pairs/s of one DPO step as scripts/kat_train_dpo.py takes it: `nanochat.dpo.dpo_train_step`
              (log-probs of a frozen copy of the model under no_grad, the policy's forward and backward, sigmoid
              loss at beta 0.1, grad clip 1, the script's AdamW step on every parameter) on --pairs pairs of a
              random --dpo_prompt_len-token prompt followed by a random --dpo_reply_len-token chosen or rejected
              reply; only reply tokens are scored, and each prompt runs once for both replies (a pair batch, as
              the script runs it; TRL runs prompt + chosen and prompt + rejected). Micro-batches, warmup and timing
              as rm.
  grpo        seconds per GRPO step as scripts/kat_train_grpo.py takes it, in three timed parts. generate:
              `Engine.generate` of --grpo_samples completions of --grpo_new_tokens tokens for each of
              --grpo_prompts random --grpo_prompt_len-token prompts, temperature 1, no stop tokens, so every
              completion runs to full length (the worst case). score: `pack_groups` and `group_rewards` of every
              completion by a random-init reward model of the same size. train: `group_advantages`, the frozen
              reference's log-probs under no_grad and one `policy_update` pass (token loss, clip 0.2, KL beta
              0.04, grad clip 1, AdamW at 1e-4). Scoring and training run in batches of
              --grpo_device_batch_size rows. One untimed step, then the median of --grpo_steps timed steps, for the
              whole step and for each part.
  autodeco    the decode-time cost of AutoDeco's heads: `Engine.generate` from random 32-token prompts at each
              batch size of --gen_batches, --new_tokens tokens, min-p 0.1, no stop tokens, plain (temperature 1)
              beside the heads' decode hook (nanochat.autodeco.decode_hook on heads whose last layers are drawn
              at random, so they are not the constant fresh ones) with the temperature head alone and with the top-p
              head too. The three take turns run by run: one untimed run each, then the median of --autodeco_runs
              timed runs; overhead = median with the hook / plain median - 1 (the issue's target: at most 5%).
  workflow    a workflow GRPO step as scripts/kat_train_workflow.py takes it, split into policy sampling, execution
              and training time. A random GPT of --depth and --seq_len is the policy, a frozen copy the KL
              reference and (through LocalExecutor) the executor; their vocabulary is a BPE tokenizer of
              --workflow_vocab_size trained on the synthetic world (seed 0, size 1), whose text holds about 1,250
              tokens, too few for --vocab_size's 4096 (the speedrun's tokenizer has 1024). The step: --workflow_tasks
              tasks of the world's "train" split (`workflow_data.synthetic_split`), 4 workflows each, the stage's
              defaults (AdamW 1e-4, clip 0.2, KL 0.04, token loss, grad clip 1, executor temperature 0.7, 5 s per
              sandbox run). A random policy writes invalid workflows, which cost no execution at all, so the parts
              are timed apart. sampling: `Engine.generate` of 4 workflows per task from its `policy_prompt`,
              temperature 1, up to --workflow_new_tokens tokens. execution: the stage's `score_workflows`
              (`run_workflows`, then each answer's reward: a code answer runs its tests in the sandbox) of as many
              valid workflows drawn from `workflow_data.WORKFLOWS` of each task's domain, executor replies of up to
              --workflow_executor_tokens tokens: the work a policy that writes valid workflows causes (the random
              executor's programs fail at once, so a sandbox run costs about its start-up). Counted per step:
              executor calls (one per round) and prompts, sandbox runs (workflow steps and code rewards). training:
              the whole `grpo_step` with a reward_fn of fixed random rewards (no execution), its own sampling
              included; it samples with the sampling part's seed and weights, so update = training - sampling is
              the rest (reference log-probs, the policy's forward and backward, AdamW). A random policy seldom
              samples its end token, so nearly every workflow is truncated, which the stage masks out of the loss:
              here mask_truncated_completions is off, and the update trains on every sampled token. The same tasks
              and jobs (executor seeds included) every run, the sampling seed run by run: one untimed run, then the
              median of --workflow_runs timed runs per part, and each part's share of sampling + execution + update
              (the step as the stage takes it, each part once).
  density     kNN (k = 10) plus density weights of --density_n random 256-dim unit vectors: blocked
              (`nanochat.density.knn`, tiles of --density_block_size) beside brute force (the whole N x N cosine
              similarity matrix, then topk of each row). Brute force runs at --density_n when its matrix and
              normalised copy fit in --brute_max_gib; otherwise both run at --density_brute_n and blocked alone
              at --density_n too. Each run is a fresh process with --threads threads: its seconds, and its peak
              extra memory: the peak RSS during the kNN minus the RSS just before it (vectors and torch loaded;
              on Linux the peak is reset there through /proc/self/clear_refs), beside the theory
              (`working_bytes`). "identical" is true when, at the size where both ran, they found the same
              neighbours in the same order with distances within 1e-6.

Peers (train, generate, rm, dpo, grpo). Each side runs in its own process; --repeats times, the sides take turns
(ours, peer, ours, peer, ...), each measurement being the workload as described above, its warmup included. The table
gives each side's median [min-max] over the measurements and ours vs peer = how many times faster ours is, from the
two medians (ours / peer for a rate, peer / ours for seconds per step). Headline values: train and rm the median
step's rate, generate the kv-cache tokens/s, dpo the median step's pairs/s, grpo the median step's seconds; the
details (no-cache speed, grpo parts) are those of our median measurement. What the peers do:
  train       GPT2LMHeadModel of the same depth, width, heads, vocab and context (dropout off), forward with its own
              shifted loss, backward, grad clip 1, torch AdamW, on the same --train_batch x --seq_len token shape;
              compared with ours on adamw and on muon. GPT-2 differs in its details (learned positions, LayerNorm
              with biases, GELU, tied embeddings), so its parameter count differs a little.
  generate    `model.generate` greedy (do_sample=False, use_cache=True, min_new_tokens = max_new_tokens, no eos, so
              it never stops early), same prompt length, batch sizes and --new_tokens; one warmup, one timed run.
  rm          RewardTrainer on a GPT2ForSequenceClassification (1 label), pre-tokenized pairs of the same lengths,
              --pair_device_batch_size pairs per micro-batch with gradient accumulation over --pairs, centering 0.01,
              grad clip 1, its default AdamW. Seconds per optimizer step from a TrainerCallback (on_step_begin to
              on_step_end: data collation is outside, as ours builds its batches before timing); --pair_warmup steps
              dropped, the median of --pair_steps.
  dpo         DPOTrainer, same shapes, with a frozen reference GPT-2, sigmoid loss at beta 0.1, grad clip 1. It
              tokenizes text and appends <eos> to each reply, so the reply texts hold --dpo_reply_len - 1 words: the
              same token counts as ours. Timed as rm.
  grpo        GRPOTrainer with --grpo_samples generations per prompt, --grpo_prompts prompts per optimizer step,
              completions of exactly --grpo_new_tokens tokens (min_new_tokens) sampled at temperature 1 (top-p 1, no
              top-k: as ours), scored by a random GPT2ForSequenceClassification of the same size (ours: a random
              RewardModel), a reference model for KL beta 0.04 (its default is 0: no reference) and learning rate
              1e-4, at its default micro-batch of 8 rows with gradient accumulation over the step's 128 rows (it
              still generates them in one batch): among its fastest settings, 2 to 16 rows timing alike and one
              micro-batch of every row the slowest (bench_peers.GRPO_MICRO_BATCH). Not identical: TRL decodes
              every completion to text and re-tokenizes it for the reward model, and computes its loss and metrics
              its own way (loss type, entropy, clip ratios); one untimed step, then the median of --grpo_steps.
  Our processes keep the memory a step frees for the next one, as our stages do (nanochat.common.keep_freed_memory:
  glibc's malloc then returns no freed block to the kernel); the peers' run at glibc's defaults, as their users run
  them. Both sides use a word-level tokenizer built in memory (bench_peers.word_tokenizer: token i is the word "t{i}"),
  fp32, the CPU, report_to="none", no saving, no eval, no logging, dataloader_num_workers=0; nothing is downloaded.

Load rule. Timings are wall clock, so a shared machine makes them noisy. Before and after every measurement the
1-minute load average is recorded (this run's own threads count towards it); a measurement's load is the mean of
the two. A ratio is not quoted (the table says why) when any reading exceeds --threads + 0.5 (other jobs were
taking cores), or when our measurements' mean load and the peer's differ by more than 0.5 (they ran under different
load). The 1-minute average lags: on a machine that was idle, let the load settle before trusting the first repeat.
A quoted ratio is flagged noisy when one repeat's own ratio (ours and the peer's measurements of that repeat, taken
one after the other) lies more than 10% from it: that run cannot promise that a rerun agrees within 10%.

Memory. Every workload, and every peer, runs in a process forked from a server that has imported torch, nanochat,
transformers and TRL and run nothing. "peak RSS +" is that process's peak RSS (VmHWM) minus its RSS when it started:
what the workload added over the shared imports (its models, activations, optimizer state, allocator caches, lazily
loaded kernels), all its measurements included. A fresh process is the honest way: in one long process memory freed
by one workload stays resident in the allocator and hides the next one's peak. The json also has the absolute peak.

FLOP/s. The train row's achieved FLOP/s = the median tokens/s x (6 x matmul parameters + 12 x layers x width x
context) per token: forward and backward through every weight matrix (the token embedding is a lookup and does not
count; GPT-2's tied one counts once, as its LM head), plus attention's scores and weighted sum at full (not causal)
length. Beside it, the machine's measured fp32 peak: the best of 5 torch.mm of two 2048 x 2048 matrices at --threads
threads, in a worker of its own, and the achieved share of it. The rm, dpo and grpo rows' FLOP/s are ours alone: the
FLOPs that one more (untimed) step runs, counted at the dispatcher (nanochat/flops.py, the same conventions: every
matrix product, attention at full length), over the median step's seconds (rm: its adamw step; grpo: the training
part, reference pass included). The peers' trainers run other work (every row whole, TRL's GRPO its generation
inside its step), so a count of theirs would not say how near the same work runs to the peak.
"""

import argparse
import copy
import functools
import itertools
import multiprocessing
import os
import platform
import random
import resource
import statistics
import sys
import time
import traceback
from collections import Counter

import torch

from nanochat import execution, workflow_data
from nanochat.batching import cut_left
from nanochat.common import atomic_write_json, keep_freed_memory, parse_flags, seed_everything, str2bool
from nanochat.density import densities, density_weights, knn
from nanochat.dpo import dpo_train_step
from nanochat.engine import Engine
from nanochat.executor import LocalExecutor
from nanochat.flops import count_flops
from nanochat.gpt import GPT, MATRIX_LR, config_from_depth, set_lr
from nanochat.grpo import (GRPOConfig, batch_logprobs, group_advantages, group_rewards, grpo_step, pack_groups,
                           policy_update)
from nanochat.preference import pack_pairs
from nanochat.rm import RewardModel, rm_train_step, setup_rm_optimizers
from nanochat.synthetic import make_world
from nanochat.tokenizer import train_tokenizer
from nanochat.training import train_step
from scripts import bench_peers
from scripts.kat_train_workflow import score_workflows

WORKLOADS = ("train", "generate", "optimizers", "rm", "dpo", "grpo", "autodeco", "workflow", "density")
OPTIMIZERS = ("muon", "adamw")
GRPO_PARTS = ("generate", "score", "train")
WORKFLOW_PARTS = ("sampling", "execution", "update")  # the step's time, all of it and none twice
WORKFLOW_GROUP = 4  # workflows per task: kat_train_workflow's default
WORKFLOW_TOKENIZER_DOCS = 2000  # world documents the workflow tokenizer learns from: 1000 already give 1024 tokens
PROMPT_LEN = 32
WARMDOWN = 0.3  # share of the race's time budget with a linearly decaying learning rate
LAST_STEPS = 10  # the race's training loss is averaged over this many final steps: one batch is too noisy
DENSITY_DIM, DENSITY_K = 256, 10
SAME_DISTANCE = 1e-6  # blocked and brute force round a cosine differently, by a few fp32 ulps

PEER_WORKLOADS = ("train", "generate", "rm", "dpo", "grpo")  # measured beside HF transformers or TRL (bench_peers)
TRAINING_WORKLOADS = ("train", "rm", "dpo", "grpo")  # their FLOP/s is reported beside the matmul peak
INSTALL_PEERS = "peers not installed: pip install -e '.[peers]'"
# issue 17's targets, ours over the peer in the same run (grpo: against both of TRL's settings)
TARGET_SPEEDUP = {"train": 1.1, "generate": 1.5, "rm": 2.0, "dpo": 2.5, "grpo": 3.0}
LOAD_TOLERANCE = 0.5  # the load rule: see the docstring
NOISE_TOLERANCE = 0.10  # the noise flag: a repeat's own ratio this far from the quoted one (see the docstring)
MATMUL_N = 2048  # the peak's matmul: 17 GFLOP, large enough for the BLAS's best blocking, a second or less

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


def random_ids(gen, vocab_size, rows, length):
    return torch.randint(0, vocab_size, (rows, length), generator=gen).tolist()


def time_steps(steps, warmup, timed_steps, device):
    """
    {name: seconds of each timed call} of the step functions `steps` {name: fn}. They take turns call by call, so
    a shared machine's changing load slows all of them alike.
    """
    step_seconds = {name: [] for name in steps}
    for i in range(warmup + timed_steps):
        for name, step in steps.items():
            _, seconds = timed(step, device)
            if i >= warmup:
                step_seconds[name].append(seconds)
    return step_seconds


def throughput(step_seconds, per_step, unit):
    """The rate over all timed steps and from the median step alone (robust to a neighbour's burst of load)."""
    return {f"{unit}_per_s": len(step_seconds) * per_step / sum(step_seconds),
            f"{unit}_per_s_median_step": per_step / statistics.median(step_seconds), "step_seconds": step_seconds}


# -----------------------------------------------------------------------------
# train: optimizer steps per second

def bench_train(args, config, device):
    gen = torch.Generator().manual_seed(args.seed)
    rows = torch.randint(0, config.vocab_size, (args.train_batch, args.seq_len + 1), generator=gen).to(device)
    micro = [(rows[:, :-1], rows[:, 1:])]
    tokens_per_step = args.train_batch * args.seq_len
    steps = {}
    for name in OPTIMIZERS:
        model = fresh_model(config, args.seed, device)
        steps[name] = functools.partial(train_step, model, model.setup_optimizers(matrix_optimizer=name), micro)
    results = {}
    for name, seconds in time_steps(steps, args.train_warmup, args.train_steps, device).items():
        results[name] = throughput(seconds, tokens_per_step, "tokens")
        print(f"train {name:5s}: {results[name]['tokens_per_s']:,.0f} tok/s (median step "
              f"{results[name]['tokens_per_s_median_step']:,.0f})", flush=True)
    # FLOPs: every matmul weight once (the token embedding is a lookup, not a matmul)
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "wte" not in n)
    return {"batch": args.train_batch, "seq_len": args.seq_len, "warmup_steps": args.train_warmup,
            "timed_steps": args.train_steps, **results, "matmul_params": matmul_params}


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
        }
        print(f"generate batch {batch}: kv cache {cache_tps:,.0f} tok/s, no cache {naive_tps:,.0f} tok/s "
              f"({cache_tps / naive_tps:.1f}x)", flush=True)
    return results


# -----------------------------------------------------------------------------
# autodeco: what the heads add to each decode step

def bench_autodeco(args, config, device):
    from nanochat.autodeco import AutoDecoHeads, HeadsConfig, decode_hook
    model = fresh_model(config, args.seed, device).eval()
    heads = AutoDecoHeads(HeadsConfig(n_embd=config.n_embd)).to(device).eval()
    with torch.no_grad():  # non-zero last layers: the temperature varies by row, as a trained head's does
        for mlp in (heads.temp_head, heads.top_p_head):
            mlp[2].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(args.seed))
    engine = Engine(model)
    gen = torch.Generator().manual_seed(args.seed)
    results = {"prompt_len": PROMPT_LEN, "new_tokens": args.new_tokens, "timed_runs": args.autodeco_runs,
               "batches": {}}
    for batch in args.gen_batches:
        prompts = random_ids(gen, config.vocab_size, batch, PROMPT_LEN)

        def run(hook):
            return functools.partial(engine.generate, prompts, max_new_tokens=args.new_tokens, temperature=1.0,
                                     min_p=0.1, seed=args.seed, decode_hook=hook)

        runs = {"plain": run(None), "temperature head": run(decode_hook(heads, use_top_p=False)),
                "temperature + top-p heads": run(decode_hook(heads, use_top_p=True))}
        medians = {name: statistics.median(seconds)
                   for name, seconds in time_steps(runs, 1, args.autodeco_runs, device).items()}
        results["batches"][batch] = {name: {"median_seconds": m, "overhead": m / medians["plain"] - 1}
                                     for name, m in medians.items()}
        print(f"autodeco batch {batch}: plain {medians['plain']:.3f} s, " + ", ".join(
            f"{name} {m:.3f} s ({m / medians['plain'] - 1:+.1%})" for name, m in medians.items() if name != "plain"),
            flush=True)
    return results


# -----------------------------------------------------------------------------
# workflow: a workflow GRPO step's sampling, execution and training time

def bench_workflow(args, device):
    world = {"seed": 0, "size": 1}
    docs = make_world(**world).pretrain_documents(WORKFLOW_TOKENIZER_DOCS, seed=0)
    tok = train_tokenizer(iter(docs), args.workflow_vocab_size)
    config = config_from_depth(args.depth, tok.vocab_size, args.seq_len)
    policy = fresh_model(config, args.seed, device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    executor = LocalExecutor(reference, tok)  # the stage's default: the frozen starting model runs the workflows
    tasks = workflow_data.synthetic_split(world, "train", args.workflow_tasks, seed=args.seed)
    stop_tokens = [tok.encode_special("<|assistant_end|>"), tok.bos_token_id]
    max_prompt = args.seq_len - args.workflow_new_tokens
    prompts = [cut_left(tok.render_for_completion([{"role": "user", "content": workflow_data.policy_prompt(t)}]),
                        max_prompt) for t in tasks]
    rng = random.Random(args.seed)
    jobs = [(rng.choice(workflow_data.WORKFLOWS[t["domain"]]), t) for t in tasks for _ in range(WORKFLOW_GROUP)]
    # kat_train_workflow's defaults, one rank, no gradient accumulation; the random policy's truncated workflows
    # stay in the loss, or the update would train on almost nothing
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    rows = len(tasks) * WORKFLOW_GROUP
    grpo_config = GRPOConfig(num_generations=WORKFLOW_GROUP, max_new_tokens=args.workflow_new_tokens,
                             temperature=1.0, scale_rewards="group", clip_eps=0.2, beta=0.04, loss_type="token",
                             mask_truncated_completions=False, grad_clip=1.0, device_batch_size=rows)
    stage_flags = argparse.Namespace(executor_temperature=0.7, executor_max_tokens=args.workflow_executor_tokens,
                                     execution_timeout=5.0)
    rewards = torch.rand(rows, generator=torch.Generator().manual_seed(args.seed))
    engine = Engine(policy)
    # workflow steps and code rewards both start their sandbox runs in execution._run: count them there
    sandbox_runs, run_in_sandbox = [], execution._run

    def counted_run(*run_args, **run_kwargs):
        sandbox_runs.append(None)  # list.append is atomic: run_workflows starts runs from a thread pool
        return run_in_sandbox(*run_args, **run_kwargs)

    run_seconds = {part: [] for part in ("sampling", "execution", "training")}
    counts = {"executor_calls": [], "executor_prompts": [], "sandbox_runs": []}
    execution._run = counted_run
    try:
        for run in range(1 + args.workflow_runs):  # the first run is the untimed warmup
            policy.eval()
            _, sampling_s = timed(lambda: engine.generate(
                prompts, num_samples=WORKFLOW_GROUP, max_new_tokens=args.workflow_new_tokens, temperature=1.0,
                stop_tokens=stop_tokens, seed=args.seed + run).completions(), device)
            policy.train()
            before = (executor.calls, executor.prompt_count, len(sandbox_runs))
            records, execution_s = timed(lambda: score_workflows(
                [text for text, _ in jobs], [task for _, task in jobs], executor, stage_flags, args.seed), device)
            after = (executor.calls, executor.prompt_count, len(sandbox_runs))
            # the same seed and weights as the sampling above: grpo_step samples the same workflows again
            (stats, _, _), training_s = timed(lambda: grpo_step(
                policy, reference, [optimizer], engine, prompts, lambda batch: rewards, grpo_config, stop_tokens,
                seed=args.seed + run, pad_id=tok.bos_token_id), device)
            if run:
                for part, seconds in zip(run_seconds, (sampling_s, execution_s, training_s)):
                    run_seconds[part].append(seconds)
                for name, b, a in zip(counts, before, after):
                    counts[name].append(a - b)
    finally:
        execution._run = run_in_sandbox
    run_seconds["update"] = [t - s for t, s in zip(run_seconds["training"], run_seconds["sampling"])]
    median = {part: statistics.median(seconds) for part, seconds in run_seconds.items()}
    step = sum(median[part] for part in WORKFLOW_PARTS)  # the stage's step: its parts, each once
    share = {part: median[part] / step for part in WORKFLOW_PARTS}
    per_step = {name: statistics.median(values) for name, values in counts.items()}
    print(f"workflow sampling : {median['sampling']:.2f} s ({share['sampling']:.0%}), {len(tasks)} tasks x "
          f"{WORKFLOW_GROUP} workflows of up to {args.workflow_new_tokens} tokens", flush=True)
    print(f"workflow execution: {median['execution']:.2f} s ({share['execution']:.0%}), {rows} valid workflows: "
          f"{per_step['executor_calls']:g} executor calls of {per_step['executor_prompts']:g} prompts, "
          f"{per_step['sandbox_runs']:g} sandbox runs", flush=True)
    print(f"workflow update   : {median['update']:.2f} s ({share['update']:.0%}) = grpo_step "
          f"{median['training']:.2f} s - sampling", flush=True)
    return {"tasks": len(tasks), "samples": WORKFLOW_GROUP, "domains": dict(Counter(t["domain"] for t in tasks)),
            "vocab_size": tok.vocab_size, "new_tokens": args.workflow_new_tokens,
            "executor_max_tokens": args.workflow_executor_tokens, "completion_length": stats["completion_length"],
            "truncated": stats["truncated"], "job_errors": sum(r["error"] is not None for r in records),
            "warmup_runs": 1, "timed_runs": args.workflow_runs, "step_seconds": step, "median_seconds": median,
            "share": share, "per_step": per_step, "run_seconds": run_seconds, "counts": counts}


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
# rm and dpo: preference pairs per second

def bench_rm(args, config, device):
    gen = torch.Generator().manual_seed(args.seed)
    chosen = random_ids(gen, config.vocab_size, args.pairs, args.rm_len)
    rejected = random_ids(gen, config.vocab_size, args.pairs, args.rm_len)
    b = args.pair_device_batch_size
    # rows that share only their first token (TRL's rows share nothing): a pair batch's prompt of 1 token
    pairs = [(c[:1], [c[1:], r[1:]]) for c, r in zip(chosen, rejected)]
    micro = [pack_pairs(pairs[i:i + b], device) for i in range(0, args.pairs, b)]
    steps = {}
    for name in OPTIMIZERS:
        rm = RewardModel(fresh_model(config, args.seed, device)).to(device)
        # kat_train_rm's default learning rates, centering and clipping (none of them changes the step's cost)
        optimizers = setup_rm_optimizers(rm, 0.5 * MATRIX_LR[name], 1e-3, 3e-3, name)
        steps[name] = functools.partial(rm_train_step, rm, optimizers, micro, args.pairs, 0.01, 1.0)
    results = {"pairs": args.pairs, "tokens_per_row": args.rm_len, "device_batch_pairs": b,
               "warmup_steps": args.pair_warmup, "timed_steps": args.pair_steps}
    timings = time_steps(steps, args.pair_warmup, args.pair_steps, device)
    results["flops_per_step"] = count_flops(steps["adamw"])[0]  # one more step, untimed
    for name, seconds in timings.items():
        results[name] = throughput(seconds, args.pairs, "pairs")
        print(f"rm {name:5s}: {results[name]['pairs_per_s']:,.1f} pairs/s (median step "
              f"{results[name]['pairs_per_s_median_step']:,.1f})", flush=True)
    return results


def bench_dpo(args, config, device):
    gen = torch.Generator().manual_seed(args.seed)
    prompts = random_ids(gen, config.vocab_size, args.pairs, args.dpo_prompt_len)
    replies = random_ids(gen, config.vocab_size, 2 * args.pairs, args.dpo_reply_len)  # chosen ones, rejected ones
    b, n = args.pair_device_batch_size, args.pairs
    pairs = [(prompts[i], [replies[i], replies[n + i]]) for i in range(n)]
    micro = [pack_pairs(pairs[i:i + b], device) for i in range(0, n, b)]
    policy = fresh_model(config, args.seed, device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    # kat_train_dpo's optimizer and default beta, loss and clipping (none of them changes the step's cost)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=2e-5, betas=(0.9, 0.95), weight_decay=0.0)
    step = functools.partial(dpo_train_step, policy, reference, [optimizer], micro, n, 0.1, "sigmoid", 1.0)
    seconds = time_steps({"dpo": step}, args.pair_warmup, args.pair_steps, device)["dpo"]
    results = {"pairs": n, "prompt_len": args.dpo_prompt_len, "reply_len": args.dpo_reply_len,
               "device_batch_pairs": b, "warmup_steps": args.pair_warmup, "timed_steps": args.pair_steps,
               **throughput(seconds, n, "pairs"), "flops_per_step": count_flops(step)[0]}  # one more step, untimed
    print(f"dpo: {results['pairs_per_s']:,.1f} pairs/s (median step {results['pairs_per_s_median_step']:,.1f})",
          flush=True)
    return results


# -----------------------------------------------------------------------------
# grpo: seconds per step, by part

def bench_grpo(args, config, device):
    policy = fresh_model(config, args.seed, device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = RewardModel(fresh_model(config, args.seed + 1, device)).to(device).eval()
    # kat_train_grpo's optimizer and default loss settings
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    grpo_config = GRPOConfig(device_batch_size=args.grpo_device_batch_size, compile=args.compile)
    engine = Engine(policy)
    gen = torch.Generator().manual_seed(args.seed)
    rows, batch_rows = args.grpo_prompts * args.grpo_samples, args.grpo_device_batch_size
    step_seconds = {part: [] for part in GRPO_PARTS}
    for step in range(1 + args.grpo_steps):  # the first step is the untimed warmup
        prompts = random_ids(gen, config.vocab_size, args.grpo_prompts, args.grpo_prompt_len)
        policy.eval()
        completions, generate_s = timed(lambda: engine.generate(
            prompts, num_samples=args.grpo_samples, max_new_tokens=args.grpo_new_tokens, temperature=1.0,
            seed=args.seed + step).completions(), device)
        policy.train()
        assert all(len(c) == args.grpo_new_tokens for c in completions)  # a short one would make the step cheaper
        # the pad id is never read: prompt_valid and the mask stop at each row's real tokens
        batch, score_s = timed(lambda: pack_groups(prompts, completions, pad_id=0).to(device), device)
        rewards, rewards_s = timed(lambda: group_rewards(rm, batch, batch_rows), device)
        score_s += rewards_s

        def train():
            advantages = group_advantages(rewards.view(args.grpo_prompts, args.grpo_samples)).view(-1)
            ref_logprobs = batch_logprobs(reference, batch, batch_rows, compile=args.compile)
            return policy_update(policy, [optimizer], batch, ref_logprobs, advantages, grpo_config,
                                 num_sequences_global=rows, num_tokens_global=batch.completion_mask.sum().float())

        _, train_s = timed(train, device)
        if step:
            for part, seconds in zip(GRPO_PARTS, (generate_s, score_s, train_s)):
                step_seconds[part].append(seconds)
    train_flops = count_flops(train)[0]  # the last step's training part once more, untimed
    step_seconds["total"] = [sum(parts) for parts in zip(*(step_seconds[part] for part in GRPO_PARTS))]
    median = {part: statistics.median(seconds) for part, seconds in step_seconds.items()}
    print(f"grpo: {median['total']:.2f} s/step (generate {median['generate']:.2f}, score {median['score']:.2f}, "
          f"train {median['train']:.2f})", flush=True)
    return {"prompts": args.grpo_prompts, "samples": args.grpo_samples, "prompt_len": args.grpo_prompt_len,
            "new_tokens": args.grpo_new_tokens, "device_batch_size": batch_rows, "warmup_steps": 1,
            "timed_steps": args.grpo_steps, "median_seconds": median, "step_seconds": step_seconds,
            "train_flops_per_step": train_flops}


# -----------------------------------------------------------------------------
# density: blocked kNN vs brute force, time and peak memory

def _status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss():
    """Start a new peak-RSS window at the current RSS; returns that RSS. Linux resets VmHWM via clear_refs."""
    if os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    return peak_rss_bytes()  # elsewhere the window starts at the process's peak so far: a lower bound


def peak_rss_bytes():
    if os.path.exists("/proc/self/status"):
        return _status_bytes("VmHWM")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS


def brute_force_knn(embeddings, k):
    """The baseline: the whole N x N similarity matrix, then top k of each row."""
    x = torch.nn.functional.normalize(embeddings.float(), dim=1)
    sims = x @ x.T
    sims.fill_diagonal_(float("-inf"))
    top = sims.topk(k, dim=1)
    return (1 - top.values).clamp_(min=0), top.indices


def working_bytes(method, n, block_size):
    """
    What a kNN allocates beyond its input, in theory: both normalise a copy of the vectors; brute force then holds
    the N x N matrix, the blocked version one tile and its transposed copy, and every row's running top k (fp32
    similarity + int64 index).
    """
    copy_bytes = n * DENSITY_DIM * 4
    if method == "brute":
        return copy_bytes + n * n * 4
    return copy_bytes + 2 * min(block_size, n) ** 2 * 4 + n * DENSITY_K * 12


def density_run(method, n, block_size, threads, seed):
    """One measurement, run in a fresh process so that its peak RSS is its own."""
    torch.set_num_threads(threads)
    x = torch.randn(n, DENSITY_DIM, generator=torch.Generator().manual_seed(seed))
    x /= x.norm(dim=1, keepdim=True)
    before = reset_peak_rss()
    t0 = time.perf_counter()
    distances, indices = knn(x, DENSITY_K, block_size) if method == "blocked" else brute_force_knn(x, DENSITY_K)
    density_weights(densities(distances.double().mean(1)))  # the rest of compute_density after the kNN
    seconds = time.perf_counter() - t0
    return {"method": method, "n": n, "seconds": seconds, "peak_extra_bytes": max(0, peak_rss_bytes() - before),
            "distances": distances, "indices": indices}


def density_compare_n(args):
    """The size at which blocked and brute force both run: --density_n if brute force fits the budget there."""
    budget = args.brute_max_gib * 2**30
    if working_bytes("brute", args.density_n, args.density_block_size) <= budget:
        return args.density_n
    need = working_bytes("brute", args.density_brute_n, args.density_block_size) / 2**30
    if need > budget or args.density_brute_n >= args.density_n:
        raise SystemExit(f"brute force at --density_brute_n={args.density_brute_n} needs {need:.3g} GiB: it must "
                         f"fit in --brute_max_gib={args.brute_max_gib:g} and be below --density_n={args.density_n}")
    return args.density_brute_n


def bench_density(args, compare_n):
    n = args.density_n
    jobs = [("blocked", m) for m in sorted({compare_n, n})] + [("brute", compare_n)]
    context = multiprocessing.get_context("spawn")
    runs = []
    for method, m in jobs:
        with context.Pool(1) as pool:
            r = pool.apply(density_run, (method, m, args.density_block_size, args.threads, args.seed))
        r["working_bytes_theory"] = working_bytes(method, m, args.density_block_size)
        runs.append(r)
        print(f"density {method:7s} N={m}: {r['seconds']:.2f} s, peak +{r['peak_extra_bytes'] / 2**20:.1f} MiB "
              f"(theory {r['working_bytes_theory'] / 2**20:.1f} MiB)", flush=True)
    blocked, brute = (next(r for r in runs if (r["method"], r["n"]) == (method, compare_n))
                      for method in ("blocked", "brute"))
    max_diff = (blocked["distances"] - brute["distances"]).abs().max().item()
    identical = torch.equal(blocked["indices"], brute["indices"]) and max_diff <= SAME_DISTANCE
    skipped = None
    if compare_n != n:
        need = working_bytes("brute", n, args.density_block_size) / 2**30
        skipped = f"N={n}: brute force needs {need:.3g} GiB > --brute_max_gib={args.brute_max_gib:g}"
    print(f"density blocked vs brute force at N={compare_n}: identical: {str(identical).lower()}", flush=True)
    return {"dim": DENSITY_DIM, "k": DENSITY_K, "block_size": args.density_block_size, "threads": args.threads,
            "runs": [{key: v for key, v in r.items() if key not in ("distances", "indices")} for r in runs],
            "compared_at_n": compare_n, "identical": identical,
            "same_neighbours_fraction": (blocked["indices"] == brute["indices"]).float().mean().item(),
            "max_abs_distance_diff": max_diff, "brute_skipped": skipped}


# -----------------------------------------------------------------------------
# workers: every measurement runs in a process of its own, forked from a server that has imported torch, nanochat,
# transformers and TRL and run nothing. A process's peak RSS is then its workload's alone: in one long process,
# memory freed by one workload stays resident (the allocator keeps it) and hides the next one's.

def worker(conn, threads, ours):
    torch.set_num_threads(threads)
    if ours:  # as our stages run (dist_init on the CPU)
        keep_freed_memory()
    start = reset_peak_rss()
    while (job := conn.recv()) is not None:
        fn, fn_args = job
        try:
            conn.send(("ok", fn(*fn_args)))
        except Exception:  # the parent re-raises it with the worker's traceback
            conn.send(("error", traceback.format_exc()))
    conn.send({"rss_start_bytes": start, "peak_rss_bytes": peak_rss_bytes()})


class Worker:
    """
    One process that runs measurements on request, one at a time, and at the end reports its peak RSS. `ours`: it
    keeps the memory a step frees, as our stages do (nanochat.common.keep_freed_memory); a peer's keeps glibc's
    defaults.
    """

    def __init__(self, context, name, threads, ours=True):
        self.name = name
        self.conn, child = context.Pipe()
        # not a daemon: the density workload starts processes of its own
        self.process = context.Process(target=worker, args=(child, threads, ours), name=f"bench {name}")
        self.process.start()

    def run(self, fn, *fn_args):
        self.conn.send((fn, fn_args))
        status, out = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"bench worker {self.name!r} failed:\n{out}")
        return out

    def close(self):
        self.conn.send(None)
        memory = self.conn.recv()
        self.process.join()
        memory["peak_extra_bytes"] = max(0, memory["peak_rss_bytes"] - memory["rss_start_bytes"])
        return memory


def load_now():
    return os.getloadavg()[0]


def measure(sides, repeats):
    """
    {side: [{"result": ..., "load": (before, after)}, ...]} of `sides` {side: (worker, fn, fn_args)}: each repeat
    runs every side once, in turn (A B A B ...), so a neighbour's load hits all of them alike.
    """
    runs = {side: [] for side in sides}
    for _ in range(repeats):
        for side, (w, fn, fn_args) in sides.items():
            before = load_now()
            result = w.run(fn, *fn_args)
            runs[side].append({"result": result, "load": (before, load_now())})
    return runs


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def load_verdict(ours_loads, peer_loads, threads):
    """
    Why a ratio must not be quoted, or None. Each measurement's load is the mean of the 1-minute load average just
    before and just after it. Refused: any load above --threads + LOAD_TOLERANCE (other jobs took cores), or our
    measurements' mean load and the peer's differing by more than LOAD_TOLERANCE (they ran under different load).
    """
    worst = max(max(pair) for pair in ours_loads + peer_loads)
    if worst > threads + LOAD_TOLERANCE:
        return f"not quoted: load {worst:.2f} > {threads} threads + {LOAD_TOLERANCE}"
    ours, peer = (statistics.mean(sum(pair) / 2 for pair in loads) for loads in (ours_loads, peer_loads))
    if abs(ours - peer) > LOAD_TOLERANCE:
        return f"not quoted: load {ours:.2f} (ours) vs {peer:.2f} (peer)"
    return None


def compare(ours, peer, ours_loads, peer_loads, threads, higher_is_better):
    """
    Our and the peer's values (one per measurement, in the order the repeats ran) -> their spreads and speedup = how
    many times faster ours is, from the medians: ours / peer for a rate, peer / ours for seconds. None with the reason
    when the load rule refuses it, or without a peer. `repeat_speedups` are each repeat's own ratio, and `noisy`
    says so when one lies more than NOISE_TOLERANCE from the quoted ratio.
    """
    result = {"ours": spread(ours), "higher_is_better": higher_is_better,
              "ours_load": [list(pair) for pair in ours_loads]}
    if peer is None:
        return {**result, "peer": None, "speedup": None, "not_quoted": INSTALL_PEERS, "noisy": None}
    result |= {"peer": spread(peer), "peer_load": [list(pair) for pair in peer_loads]}
    ours_median, peer_median = statistics.median(ours), statistics.median(peer)
    speedup = ours_median / peer_median if higher_is_better else peer_median / ours_median
    # each repeat's own ratio, of the two measurements taken one after the other (measure() interleaves the sides)
    repeats = [o / p if higher_is_better else p / o for o, p in zip(ours, peer)]
    result["repeat_speedups"] = repeats
    reason = load_verdict(ours_loads, peer_loads, threads)
    if reason:
        return {**result, "speedup": None, "not_quoted": reason, "noisy": None}
    noisy = None
    if min(repeats) < (1 - NOISE_TOLERANCE) * speedup or max(repeats) > (1 + NOISE_TOLERANCE) * speedup:
        noisy = (f"noisy: repeats {min(repeats):.2f}-{max(repeats):.2f}x, more than {NOISE_TOLERANCE:.0%} from the "
                 "median ratio; a rerun may differ as much")
    return {**result, "speedup": speedup, "not_quoted": None, "noisy": noisy}


def matmul_peak():
    """Measured fp32 FLOP/s of a MATMUL_N square torch.mm at the worker's thread count: the best of 5 after a warmup."""
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b), torch.device("cpu"))[1] for _ in range(5))
    return {"flops": 2 * MATMUL_N ** 3 / best}


def train_flops_per_step(matmul_params, args, config):
    """6 * matmul params * tokens (forward and backward) + attention's 12 * layers * width * context per token."""
    tokens = args.train_batch * args.seq_len
    return tokens * (6 * matmul_params + 12 * config.n_layer * config.n_embd * args.seq_len)


def median_run(runs, key):
    """The run whose `key` is the median one: its details (parts, no-cache speed) stand for all runs."""
    return sorted((r["result"] for r in runs), key=key)[(len(runs) - 1) // 2]


def run_peer_workload(name, context, args, config, device, peers):
    """
    One workload beside its peers: each side in its own worker, --repeats interleaved measurements. Returns our
    median run's details, each side's runs, loads and memory, and the comparisons.
    """
    ours = {"train": bench_train, "generate": bench_generate, "rm": bench_rm, "dpo": bench_dpo,
            "grpo": bench_grpo}[name]
    sides = {"ours": (ours, (args, config, device))}
    if peers:
        sides |= {"train": {"hf": (bench_peers.train, (args,))},
                  "generate": {"hf": (bench_peers.generate, (args, PROMPT_LEN))},
                  "rm": {"trl": (bench_peers.rm, (args,))}, "dpo": {"trl": (bench_peers.dpo, (args,))},
                  "grpo": {"trl": (bench_peers.grpo, (args,))}}[name]
    workers = {side: Worker(context, f"{name} {side}", args.threads, ours=side == "ours") for side in sides}
    try:
        runs = measure({side: (workers[side], *job) for side, job in sides.items()}, args.repeats)
    finally:
        memory = {side: w.close() for side, w in workers.items()}
    peer = next((side for side in sides if side != "ours"), None)

    def values(side, get):
        return [get(r["result"]) for r in runs[side]]

    def pair(label, ours_get, peer_side, peer_get, higher_is_better=True):
        peer = values(peer_side, peer_get) if peer_side else None
        peer_loads = [r["load"] for r in runs[peer_side]] if peer_side else None
        return label, compare(values("ours", ours_get), peer, [r["load"] for r in runs["ours"]], peer_loads,
                              args.threads, higher_is_better)

    if name in ("train", "rm"):
        unit = "tokens" if name == "train" else "pairs"
        comparisons = dict(pair(f"{name} {opt}", lambda r, opt=opt: r[opt][f"{unit}_per_s_median_step"], peer,
                                lambda r: r[f"{unit}_per_s_median_step"]) for opt in OPTIMIZERS)
        detail = median_run(runs["ours"], lambda r: r["adamw"][f"{unit}_per_s_median_step"])
    elif name == "generate":
        comparisons = dict(pair(f"generate b{b}", lambda r, b=b: r["batches"][b]["kv_cache"]["tokens_per_s"], peer,
                                lambda r, b=b: r["batches"][b]["tokens_per_s"]) for b in args.gen_batches)
        detail = median_run(runs["ours"], lambda r: r["batches"][args.gen_batches[0]]["kv_cache"]["tokens_per_s"])
    elif name == "dpo":
        comparisons = dict([pair("dpo", lambda r: r["pairs_per_s_median_step"], peer,
                                 lambda r: r["pairs_per_s_median_step"])])
        detail = median_run(runs["ours"], lambda r: r["pairs_per_s_median_step"])
    else:
        comparisons = dict([pair("grpo", lambda r: r["median_seconds"]["total"], peer, lambda r: r["median_seconds"],
                                 higher_is_better=False)])
        detail = median_run(runs["ours"], lambda r: r["median_seconds"]["total"])
    return {**detail, "repeats": args.repeats, "peers": INSTALL_PEERS if not peers else bench_peers.__name__,
            "comparisons": comparisons, "memory": memory,
            "runs": {side: [{"load": r["load"], **({} if side == "ours" else r["result"])} for r in side_runs]
                     for side, side_runs in runs.items()}}


def run_alone(name, context, args, fn, fn_args):
    """A workload without peers: once, in its own worker, for its peak RSS."""
    w = Worker(context, name, args.threads)
    try:
        before = load_now()
        result = w.run(fn, *fn_args)
        load = (before, load_now())
    finally:
        memory = w.close()
    return {**result, "load": load, "memory": memory}


# -----------------------------------------------------------------------------

def environment(device):
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_average_start": os.getloadavg(),
            "peers": {name: getattr(module, "__version__", None) for name, module in
                      (("transformers", getattr(bench_peers, "transformers", None)),
                       ("trl", getattr(bench_peers, "trl", None)))}}


def mib(n):
    return f"{n / 2**20:,.0f} MiB"


def fmt(s, unit, digits):
    return f"{s['median']:,.{digits}f} [{s['min']:,.{digits}f}-{s['max']:,.{digits}f}] {unit}"


def comparison_rows(r, unit, digits, peer, target=""):
    """workload | ours | peer | ours vs peer | load | peak RSS (ours / peer) rows of a peer workload."""
    rows = []
    for label, c in r["comparisons"].items():
        loads = [x for pair in c["ours_load"] + c.get("peer_load", []) for x in pair]
        memory = mib(r["memory"]["ours"]["peak_extra_bytes"])
        if c["peer"] is not None:
            memory += " / " + mib(r["memory"][peer]["peak_extra_bytes"])
        ratio = c["not_quoted"]
        if c["speedup"] is not None:
            ratio = f"{c['speedup']:.2f}x" + (f" ({c['noisy']})" if c["noisy"] else "")
        rows.append((label, fmt(c["ours"], unit, digits), fmt(c["peer"], unit, digits) if c["peer"] else "",
                     ratio + (f" ({target})" if target else ""), f"{min(loads):.2f}-{max(loads):.2f}", memory))
    return rows


def flops_row(label, r):
    f = r["flops"]
    return (label, f"ours {f['achieved'] / 1e9:,.1f} G ({f['achieved'] / f['matmul_peak']:.0%}), "
                   f"{f['flops_per_step'] / 1e9:,.1f} GFLOP a step", "", "", "", "")


def table(results):
    rows = [("workload", "ours: median [min-max]", "peer: median [min-max]", "ours vs peer", "load 1-min",
             "peak RSS +")]
    if "train" in results:
        r = results["train"]
        rows += comparison_rows(r, "tok/s", 0, "hf", f"target >= {TARGET_SPEEDUP['train']}x")
        f = r["flops"]
        rows.append(("train FLOP/s", ", ".join(f"{k} {v / 1e9:,.1f} G ({v / f['matmul_peak']:.0%})"
                                               for k, v in f["achieved"].items()),
                     f"fp32 mm peak {f['matmul_peak'] / 1e9:,.1f} G", "", "", ""))
    if "generate" in results:
        r = results["generate"]
        rows += comparison_rows(r, "tok/s", 0, "hf", f"target >= {TARGET_SPEEDUP['generate']}x")
        for batch, g in r["batches"].items():
            rows.append((f"generate b{batch} no cache ({r['naive_new_tokens']} tok)",
                         f"{g['no_cache']['tokens_per_s']:,.0f} tok/s, cache {g['cache_speedup']:.1f}x faster",
                         "", "", "", ""))
    if "optimizers" in results:
        r = results["optimizers"]
        for name in OPTIMIZERS:
            o = r[name]
            rows.append((f"optimizers {name} {r['budget_seconds']:g} s ({o['steps']} steps)",
                         f"train {o['train_loss']:.3f} / held-out {o['heldout_loss']:.3f}",
                         "winner" if name == r["winner"] else "", "", "", mib(r["memory"]["peak_extra_bytes"])))
    if "rm" in results:
        rows += comparison_rows(results["rm"], "pairs/s", 1, "trl", f"target >= {TARGET_SPEEDUP['rm']}x")
        rows.append(flops_row("rm FLOP/s (adamw)", results["rm"]))
    if "dpo" in results:
        rows += comparison_rows(results["dpo"], "pairs/s", 1, "trl", f"target >= {TARGET_SPEEDUP['dpo']}x")
        rows.append(flops_row("dpo FLOP/s", results["dpo"]))
    if "grpo" in results:
        r = results["grpo"]
        rows += comparison_rows(r, "s/step", 2, "trl", f"target >= {TARGET_SPEEDUP['grpo']}x")
        rows += [(f"grpo   {part} (median run)", f"{r['median_seconds'][part]:.2f} s", "", "", "", "")
                 for part in GRPO_PARTS]
        rows.append(flops_row("grpo   train FLOP/s", r))
    if "autodeco" in results:
        r = results["autodeco"]
        for batch, b in r["batches"].items():
            for name, m in b.items():
                rows.append((f"autodeco b{batch} {name} ({r['new_tokens']} tok)",
                             f"{m['median_seconds']:.3f} s" + (f" ({m['overhead']:+.1%})" if name != "plain" else ""),
                             "", "target <= +5%" if name != "plain" else "", "", ""))
    if "workflow" in results:
        r = results["workflow"]
        median, share, counts = r["median_seconds"], r["share"], r["per_step"]
        rows.append((f"workflow step {r['tasks']}x{r['samples']}, {r['new_tokens']} tok",
                     f"{r['step_seconds']:.2f} s (sum of the medians)", "", "", "",
                     mib(r["memory"]["peak_extra_bytes"])))
        rows.append(("workflow   sampling", f"{median['sampling']:.2f} s ({share['sampling']:.0%})", "", "", "", ""))
        rows.append(("workflow   execution", f"{median['execution']:.2f} s ({share['execution']:.0%})",
                     f"{counts['executor_calls']:g} executor calls, {counts['executor_prompts']:g} prompts, "
                     f"{counts['sandbox_runs']:g} sandbox runs", "", "", ""))
        rows.append(("workflow   update", f"{median['update']:.2f} s ({share['update']:.0%})",
                     f"grpo_step {median['training']:.2f} s - sampling", "", "", ""))
    if "density" in results:
        r = results["density"]
        for run in r["runs"]:
            theory = run["working_bytes_theory"]
            rows.append((f"density {run['method']} N={run['n']}",
                         f"{run['seconds']:.2f} s, peak +{mib(run['peak_extra_bytes'])} (theory {mib(theory)})",
                         "", "", "", ""))
        rows.append((f"density blocked = brute N={r['compared_at_n']}", f"identical: {str(r['identical']).lower()}",
                     "", "", "", ""))
        if r["brute_skipped"]:
            rows.append(("density brute", f"skipped, {r['brute_skipped']}", "", "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=str, default=",".join(WORKLOADS), help="comma-separated subset of "
                        + ", ".join(WORKLOADS))
    parser.add_argument("--depth", type=int, default=4, help="layers; width = 64 * depth, heads of 64 dims")
    parser.add_argument("--vocab_size", type=int, default=4096,
                        help="of the random tokens and the models (the optimizers race: --opt_vocab_size)")
    parser.add_argument("--seq_len", type=int, default=512, help="train rows and the model's context")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--threads", type=int, default=cores,
                        help="torch intra-op threads, density's processes too (default: every core this process "
                             "may use)")
    parser.add_argument("--device", type=str, default="cpu", help="the peers are measured on the CPU")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved measurements of ours and each peer (train, generate, rm, dpo, grpo)")
    parser.add_argument("--peers", type=str2bool, default=True,
                        help="measure HF transformers and TRL beside ours when they are installed")
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
    # rm and dpo
    parser.add_argument("--pairs", type=int, default=16, help="preference pairs per rm and dpo step")
    parser.add_argument("--pair_device_batch_size", type=int, default=8,
                        help="pairs per forward/backward (kat_train_rm's and kat_train_dpo's --device_batch_size)")
    parser.add_argument("--pair_warmup", type=int, default=1, help="untimed rm and dpo steps")
    parser.add_argument("--pair_steps", type=int, default=5, help="timed rm and dpo steps")
    parser.add_argument("--rm_len", type=int, default=128, help="tokens of each chosen and each rejected rm row")
    parser.add_argument("--dpo_prompt_len", type=int, default=64, help="prompt tokens of each dpo pair")
    parser.add_argument("--dpo_reply_len", type=int, default=64, help="tokens of each chosen and rejected dpo reply")
    # grpo
    parser.add_argument("--grpo_prompts", type=int, default=16, help="prompts per grpo step")
    parser.add_argument("--grpo_samples", type=int, default=8, help="completions per prompt")
    parser.add_argument("--grpo_prompt_len", type=int, default=64, help="tokens of every random prompt")
    parser.add_argument("--grpo_new_tokens", type=int, default=64, help="tokens of every completion")
    parser.add_argument("--grpo_device_batch_size", type=int, default=32,
                        help="rows per reference and policy forward (kat_train_grpo's --device_batch_size)")
    parser.add_argument("--grpo_steps", type=int, default=2, help="timed grpo steps, after one untimed step")
    # autodeco
    parser.add_argument("--autodeco_runs", type=int, default=5, help="timed generate runs per variant")
    # workflow
    parser.add_argument("--workflow_tasks", type=int, default=8, help="tasks per workflow GRPO step")
    parser.add_argument("--workflow_new_tokens", type=int, default=40, help="tokens of each sampled workflow, at most")
    parser.add_argument("--workflow_executor_tokens", type=int, default=48, help="tokens of each executor reply")
    parser.add_argument("--workflow_vocab_size", type=int, default=1024,
                        help="the tokenizer's and the workflow models' vocabulary")
    parser.add_argument("--workflow_runs", type=int, default=3, help="timed workflow steps, after one untimed step")
    # density
    parser.add_argument("--density_n", type=int, default=100000, help="random 256-dim unit vectors")
    parser.add_argument("--density_brute_n", type=int, default=20000,
                        help="size at which both run when brute force at --density_n does not fit --brute_max_gib")
    parser.add_argument("--brute_max_gib", type=float, default=4.0,
                        help="memory budget of the brute-force N x N similarity matrix")
    parser.add_argument("--density_block_size", type=int, default=2048,
                        help="blocked kNN tile side (kat_density's --block_size)")
    parser.add_argument("--compile", type=str2bool, default=False,
                        help="grpo as kat_train_grpo runs with --compile=True (compiling happens in the "
                             "untimed warmup steps)")
    parser.add_argument("--out", type=str, default="outs/bench.json")
    args = parse_flags(parser, argv)
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    if not only or set(only) - set(WORKLOADS):
        raise SystemExit(f"--only takes a comma-separated subset of {', '.join(WORKLOADS)}, got {args.only!r}")
    args.gen_batches = [int(b) for b in args.gen_batches.split(",")]
    if "density" in only:  # before the other workloads: a budget error should not wait for them
        density_n = density_compare_n(args)

    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    peers = args.peers and bench_peers.MISSING is None
    if args.peers and not peers:
        print(f"{INSTALL_PEERS} ({bench_peers.MISSING}): measuring ours alone", flush=True)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {"environment": environment(device), "flags": dict(vars(args))}
    config = config_from_depth(args.depth, args.vocab_size, args.seq_len)
    # workers fork from a server that imported these once (transformers and TRL take seconds) and ran nothing; not
    # this module: a worker imports it again itself (as __mp_main__ under `python -m`), in well under a second
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["scripts.bench_peers", "nanochat.engine", "nanochat.grpo"])
    for name in (w for w in WORKLOADS if w in only):
        if name in PEER_WORKLOADS:
            results[name] = run_peer_workload(name, context, args, config, device, peers)
        elif name == "optimizers":
            results[name] = run_alone(name, context, args, bench_optimizers, (args, device))
        elif name == "autodeco":
            results[name] = run_alone(name, context, args, bench_autodeco, (args, config, device))
        elif name == "workflow":
            results[name] = run_alone(name, context, args, bench_workflow, (args, device))
        else:
            results[name] = run_alone(name, context, args, bench_density, (args, density_n))
    if any(name in results for name in TRAINING_WORKLOADS):
        peak = run_alone("matmul peak", context, args, matmul_peak, ())
    if "train" in results:
        r = results["train"]
        flops = {"ours": train_flops_per_step(r["matmul_params"], args, config)}
        achieved = {name.split()[1]: c["ours"]["median"] / (args.train_batch * args.seq_len) * flops["ours"]
                    for name, c in r["comparisons"].items()}
        if peers:
            flops["hf"] = train_flops_per_step(r["runs"]["hf"][0]["matmul_params"], args, config)
            achieved["hf"] = r["comparisons"]["train adamw"]["peer"]["median"] / (args.train_batch * args.seq_len) \
                * flops["hf"]
        r["flops"] = {"formula": "tokens * (6 * matmul params + 12 * layers * width * context)",
                      "flops_per_step": flops, "achieved": achieved, "matmul_peak": peak["flops"],
                      "matmul_n": MATMUL_N}
    # ours alone (see the docstring): the counted step's FLOPs over its median seconds
    for name, comparison in (("rm", "rm adamw"), ("dpo", "dpo")):
        if name in results:
            r = results[name]
            seconds = r["pairs"] / r["comparisons"][comparison]["ours"]["median"]
            r["flops"] = {"flops_per_step": r["flops_per_step"], "achieved": r["flops_per_step"] / seconds,
                          "matmul_peak": peak["flops"]}
    if "grpo" in results:
        r = results["grpo"]
        r["flops"] = {"flops_per_step": r["train_flops_per_step"], "matmul_peak": peak["flops"],
                      "achieved": r["train_flops_per_step"] / r["median_seconds"]["train"]}
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
