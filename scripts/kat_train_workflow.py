"""
Workflow GRPO (issue 15): a policy model writes an operator workflow for each task (nanochat/workflow.py's
language), an executor model runs it (nanochat/operators.py), and the answer's five-tier reward
(nanochat/workflow_tasks.py) trains the policy with the library GRPO step (nanochat/grpo.py).

    python -m scripts.kat_train_workflow                                   # synthetic world, outs/workflow_sft
    python -m scripts.kat_train_workflow --lora_rank=8 --lora_alpha=16 --max_steps=200
    python -m scripts.kat_train_workflow --dataset_names=gsm8k,squad_v2,mbpp --from_dir=/data/hub \\
        --executor_base_url=http://localhost:8000/v1 --executor_model=Qwen2.5-7B-Instruct
    torchrun --standalone --nproc_per_node=2 -m scripts.kat_train_workflow -- --rollout_batch_size=8
    python -m scripts.kat_train_workflow --resume=True                     # continue after an interruption

Each step draws --rollout_batch_size training tasks, domains in --domain_ratios (a pure function of --seed and the
step), and samples --num_return_sequences_in_group workflows for each with the policy (workflow_data.policy_prompt;
--temperature, or the --temperature_schedule, --top_k, --top_p, --max_tokens). All workflows of the step run
together (workflow.run_workflows: each round's executor calls in one batch, code in the sandbox of
nanochat/execution.py with --execution_timeout, never in this process); an invalid workflow, a timeout or a failed
run scores 0, an answer its tier. The update is grpo.grpo_step: group-relative advantages, the clipped ratio on
the workflow tokens only (the prompt is masked), and with --use_kl_loss the k3 KL to the frozen starting model
(weight --kl_loss_coef). With --lora_rank > 0 only LoRA adapters train (--lora_alpha, --lora_dropout,
--lora_target_modules); they are merged into the weights at the end, so the checkpoint is a plain GPT.

The executor: a frozen copy of --executor_checkpoint (default: the policy's own starting checkpoint, whose SFT
taught it the operators' formats) through the batched engine, or any OpenAI-compatible endpoint with
--executor_base_url (key from $OPENAI_API_KEY or --executor_api_key_env).

Logged every --log_every steps: reward mean/min/max and its group spread, accuracy (reward >= 0.75) overall and
per domain, the tier histogram, the invalid-workflow share, operator usage per domain, the temperature. Every
--eval_every steps (and at the start and the end): greedy workflows for --num_eval_tasks held-out tasks, the same
numbers. Resumable every --save_every steps (the draws are a function of the step, so a resumed run draws the
same tasks); torchrun splits each step's tasks over ranks.

Tasks: the synthetic world's math, QA and code tasks (offline, the default; workflow_data.synthetic_split keeps the
held-out ones apart), or hub data sets by name (--dataset_names, through workflow_tasks.load_tasks with --from_dir).
"""

import argparse
import math
import os
import random
from collections import Counter

import torch

from nanochat import workflow_data, workflow_tasks
from nanochat.batching import cut_left
from nanochat.checkpoint import load_model, load_tokenizer, tokenizer_dir
from nanochat.common import (InputError, add_common_flags, all_reduce_sum, check_completion_budget, dist_cleanup,
                             dist_init, nonnegative_float, nonnegative_int, open_fraction, parse_flags, positive_float,
                             positive_int, print0, run_script, seed_everything, str2bool)
from nanochat.diversity import t_quantile
from nanochat.engine import Engine
from nanochat.executor import LocalExecutor, OpenAIExecutor
from nanochat.gpt import lr_multiplier, remember_initial_lr, set_lr
from nanochat.grpo import GRPOConfig, grpo_step
from nanochat.lora import TARGETS, apply_lora, merge_lora
from nanochat.operators import OPERATORS
from nanochat.stage import Stage
from nanochat.workflow import WorkflowError, operators_used, parse, run_workflows

DOMAINS = workflow_tasks.DOMAINS
TIERS = (0.0, 0.25, 0.5, 0.75, 1.0)
OPERATOR_NAMES = tuple(OPERATORS)


def step_seed(seed, step):
    """The seed of a step's task draw and sampling: every rank draws the same batch, and --resume needs no RNG."""
    return seed * 1_000_003 + step


def draw_tasks(pools, ratios, n, seed, step):
    """The step's global task batch: domain counts by ratio, tasks drawn with replacement within each domain."""
    rng = random.Random(step_seed(seed, step))
    counts = workflow_tasks.domain_counts(n, {d: r for d, r in ratios.items() if pools.get(d)})
    tasks = [task for domain, k in counts.items() for task in rng.choices(pools[domain], k=k)]
    rng.shuffle(tasks)  # ranks take contiguous slices: each gets a mix of domains
    return tasks


def temperature_at(step, args):
    """The sampling temperature of a step: --temperature, or the schedule from --initial_temperature to it."""
    if args.temperature_schedule == "constant" or args.temperature_warmup_steps == 0:
        return args.temperature
    t = min(step / args.temperature_warmup_steps, 1.0)
    if args.temperature_schedule == "cosine":
        t = (1 - math.cos(math.pi * t)) / 2
    return args.initial_temperature + t * (args.temperature - args.initial_temperature)


class SeededExecutor:
    """Each executor batch gets its own seed (step, rank, round), so sampled operator replies differ between steps
    and ranks yet repeat exactly on a resumed run."""

    def __init__(self, executor, seed):
        self.executor, self.seed, self.rounds = executor, seed, 0

    def complete(self, prompts, **kwargs):
        self.rounds += 1
        return self.executor.complete(prompts, seed=self.seed * 1000 + self.rounds, **kwargs)


def score_workflows(texts, tasks, executor, args, seed):
    """Run each workflow text on its task; one record per workflow: domain, reward, validity, operators, error."""
    results = run_workflows(list(zip(texts, tasks)), SeededExecutor(executor, seed),
                            temperature=args.executor_temperature, max_tokens=args.executor_max_tokens,
                            execution_timeout=args.execution_timeout)
    records = []
    for text, task, result in zip(texts, tasks, results):
        reward = 0.0 if result.error else workflow_tasks.reward(task, result.answer, args.execution_timeout)
        try:
            ops = operators_used(parse(text))
        except WorkflowError:
            ops = []
        invalid = (result.error or "").startswith("invalid")
        records.append({"domain": task["domain"], "reward": reward, "invalid": invalid, "operators": ops,
                        "workflow": text, "error": result.error})
    return records


def summary(records, device):
    """Means over all ranks' records: reward (mean, min, max), accuracy and invalid share overall and per domain,
    the tier histogram, and the share of each domain's workflows that use each operator."""
    counts = []
    for domain in DOMAINS:
        mine = [r for r in records if r["domain"] == domain]
        counts += [len(mine), sum(r["reward"] for r in mine), sum(r["reward"] >= workflow_tasks.ACCURATE for r in mine),
                   sum(r["invalid"] for r in mine)]
        counts += [sum(name in r["operators"] for r in mine) for name in OPERATOR_NAMES]
    counts += [sum(r["reward"] == tier for r in records) for tier in TIERS]
    totals = all_reduce_sum(torch.tensor(counts, dtype=torch.float64, device=device)).tolist()
    stats, width, n_all, sums = {}, 4 + len(OPERATOR_NAMES), 0, [0.0, 0.0, 0.0]
    for i, domain in enumerate(DOMAINS):
        n, reward, correct, invalid, *ops = totals[i * width:(i + 1) * width]
        n_all += n
        sums = [sums[0] + reward, sums[1] + correct, sums[2] + invalid]
        if n:
            stats |= {f"reward/{domain}": reward / n, f"accuracy/{domain}": correct / n,
                      f"invalid/{domain}": invalid / n}
            stats |= {f"operators/{domain}/{name}": k / n for name, k in zip(OPERATOR_NAMES, ops) if k}
    tiers = totals[len(DOMAINS) * width:]
    seen = [tier for tier, k in zip(TIERS, tiers) if k]  # rewards are tiers: the histogram gives min and max
    stats |= {f"tier/{tier:g}": k / max(n_all, 1) for tier, k in zip(TIERS, tiers)}
    stats |= {"reward": sums[0] / max(n_all, 1), "reward_min": min(seen, default=math.nan),
              "reward_max": max(seen, default=math.nan), "accuracy": sums[1] / max(n_all, 1),
              "invalid_share": sums[2] / max(n_all, 1)}
    return stats


def window_mean(values):
    """(mean, lo, hi): a Student-t 95% interval over steps (each step's mean over its P x G workflows)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    half = t_quantile(0.975, n - 1) * sd / n ** 0.5
    return mean, mean - half, mean + half


def load_pools(args, split, world, limit):
    """{domain: tasks} of one split: the synthetic world's (of the policy's checkpoint) or the named hub data sets."""
    tasks = []
    for name in args.dataset_names.split(","):
        if name == "synthetic":
            if world is None:
                raise InputError(f"--dataset_names=synthetic: {args.model_name} was not trained on the synthetic "
                                 f"world (its checkpoint names none); name hub data sets")
            try:  # every domain of --domain_ratios, as many distinct tasks as the world has up to the limit
                tasks += workflow_data.synthetic_split(world, split, limit, seed=0, domain_ratios=args.domain_ratios,
                                                       at_most=True)
            except ValueError as e:
                raise InputError(f"--dataset_names=synthetic: {e}") from e
        else:
            try:
                tasks += workflow_tasks.load_tasks(name, split, from_dir=args.from_dir, limit=limit, seed=0)
            except (ValueError, FileNotFoundError) as e:
                raise InputError(f"--dataset_names: {e}") from e
    pools = {d: [t for t in tasks if t["domain"] == d] for d in DOMAINS}
    if not any(pools[d] for d in args.domain_ratios if args.domain_ratios[d] > 0):
        raise InputError(f"--dataset_names={args.dataset_names}: no {split} tasks in the domains of --domain_ratios")
    return pools


def domain_ratios(text):
    try:
        return workflow_tasks.parse_domain_ratios(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", type=str, default="outs/workflow_sft", help="the policy's starting checkpoint")
    parser.add_argument("--executor_checkpoint", type=str, default=None,
                        help="the executor model (default: --model_name, frozen)")
    parser.add_argument("--executor_base_url", type=str, default=None,
                        help="an OpenAI-compatible endpoint as executor instead, e.g. http://localhost:8000/v1")
    parser.add_argument("--executor_model", type=str, default=None, help="the endpoint's model name")
    parser.add_argument("--executor_api_key_env", type=str, default="OPENAI_API_KEY",
                        help="environment variable holding the endpoint's key")
    parser.add_argument("--executor_temperature", type=nonnegative_float, default=0.7,
                        help="of the executor's replies (> 0: a parallel ensemble's branches differ)")
    parser.add_argument("--executor_max_tokens", type=positive_int, default=96, help="per executor reply")
    parser.add_argument("--dataset_names", type=str, default="synthetic",
                        help=f"synthetic, or hub data sets separated by commas: {', '.join(workflow_tasks.READERS)}")
    parser.add_argument("--from_dir", type=str, default=None, help="local copies of the hub data sets")
    parser.add_argument("--domain_ratios", type=domain_ratios, default="math=0.4,qa=0.3,code=0.3",
                        help="the domain mix of each step's tasks")
    parser.add_argument("--num_train_tasks", type=positive_int, default=2000, help="training pool, per data set")
    parser.add_argument("--num_eval_tasks", type=positive_int, default=60, help="held-out tasks per evaluation")
    parser.add_argument("--max_steps", type=positive_int, default=40)
    parser.add_argument("--rollout_batch_size", type=positive_int, default=8, help="P: tasks per step")
    parser.add_argument("--num_return_sequences_in_group", type=positive_int, default=4,
                        help="G: workflows per task (at least 2: advantages compare a workflow with its group)")
    parser.add_argument("--learning_rate", type=positive_float, default=1e-4)
    parser.add_argument("--warmup_steps", type=nonnegative_int, default=2)
    parser.add_argument("--weight_decay", type=nonnegative_float, default=0.0)
    parser.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                        help="micro-batches per step: each holds the P x G / N workflows of ceil(P / N) tasks")
    parser.add_argument("--clip_range", type=open_fraction, default=0.2, help="the ratio's clip range")
    parser.add_argument("--max_grad_norm", type=nonnegative_float, default=1.0, help="0 disables clipping")
    parser.add_argument("--use_kl_loss", type=str2bool, default=True, help="k3 KL to the frozen starting model")
    parser.add_argument("--kl_loss_coef", type=nonnegative_float, default=0.04)
    parser.add_argument("--temperature", type=positive_float, default=1.0,
                        help="the policy's sampling temperature (the schedule's final value)")
    parser.add_argument("--temperature_schedule", type=str, default="constant",
                        choices=["constant", "linear", "cosine"])
    parser.add_argument("--initial_temperature", type=positive_float, default=1.2, help="the schedule's first value")
    parser.add_argument("--temperature_warmup_steps", type=nonnegative_int, default=0,
                        help="steps from --initial_temperature to --temperature")
    parser.add_argument("--top_k", type=positive_int, default=None)
    parser.add_argument("--top_p", type=open_fraction, default=None,
                        help="nucleus sampling of workflows (the ratio is still of the plain softmax: TRL's way)")
    parser.add_argument("--max_tokens", type=positive_int, default=40, help="workflow tokens per sample")
    parser.add_argument("--execution_timeout", type=positive_float, default=5.0, help="seconds per sandbox run")
    parser.add_argument("--lora_rank", type=nonnegative_int, default=0, help="LoRA rank (0: full fine-tune)")
    parser.add_argument("--lora_alpha", type=positive_float, default=None, help="LoRA scale alpha / rank (default "
                        "alpha = rank)")
    parser.add_argument("--lora_dropout", type=nonnegative_float, default=0.0)
    parser.add_argument("--lora_target_modules", type=str, default=",".join(TARGETS),
                        help="the blocks' Linear layers to adapt, comma-separated")
    parser.add_argument("--log_every", type=positive_int, default=1, help="print every N steps")
    parser.add_argument("--save_every", type=nonnegative_int, default=10, help="resume state every N steps")
    parser.add_argument("--eval_every", type=nonnegative_int, default=20,
                        help="evaluation every N steps (0: at the start and the end only)")
    parser.add_argument("--resume", type=str2bool, default=False)
    parser.add_argument("--out_dir", type=str, default="outs/workflow")
    add_common_flags(parser)
    args = parse_flags(parser, argv)
    if args.num_return_sequences_in_group < 2:
        raise InputError("--num_return_sequences_in_group must be at least 2 (a workflow is judged against its "
                         "group; alone its advantage is 0/0)")
    if args.executor_base_url and not args.executor_model:
        raise InputError("--executor_base_url needs --executor_model (the endpoint's model name)")

    rank, world_size, device = dist_init(args.device)
    if args.rollout_batch_size % world_size:
        raise InputError(f"--rollout_batch_size={args.rollout_batch_size} must divide by the world size {world_size}")
    stage = Stage(args.out_dir, args, script="kat_train_workflow")
    if stage.finished:
        return dist_cleanup()
    seed_everything(args.seed)
    policy, payload = load_model(args.model_name, device)
    reference, _ = load_model(args.model_name, device)
    reference.eval().requires_grad_(False)
    tok = load_tokenizer(payload)
    if args.executor_base_url:
        executor = OpenAIExecutor(args.executor_base_url, args.executor_model, api_key_env=args.executor_api_key_env,
                                  timeout=60.0)
    else:  # the starting model is frozen anyway (the KL's reference): it doubles as the executor
        executor_model = reference
        if args.executor_checkpoint and args.executor_checkpoint != args.model_name:
            executor_model = load_model(args.executor_checkpoint, device)[0].eval().requires_grad_(False)
        check_completion_budget("executor_max_tokens", args.executor_max_tokens, executor_model, "executor")
        executor = LocalExecutor(executor_model, tok)
    print0(f"executor: {executor.describe()}")
    stop_tokens = [tok.encode_special("<|assistant_end|>"), tok.bos_token_id]
    check_completion_budget("max_tokens", args.max_tokens, policy, "policy")
    max_prompt = policy.config.sequence_len - args.max_tokens

    def prompt_ids(task):
        return cut_left(tok.render_for_completion([{"role": "user", "content": workflow_data.policy_prompt(task)}]),
                        max_prompt)

    world = payload["world"]
    pools = load_pools(args, "train", world, args.num_train_tasks)
    eval_pools = load_pools(args, "val", world, args.num_eval_tasks)
    eval_tasks = [t for d in DOMAINS for t in eval_pools[d]][:args.num_eval_tasks]
    print0("training tasks: " + ", ".join(f"{d} {len(pools[d])}" for d in DOMAINS) + f"; {len(eval_tasks)} held out")

    targets = tuple(t.strip() for t in args.lora_target_modules.split(",") if t.strip())
    try:
        params = apply_lora(policy, args.lora_rank, args.lora_alpha, args.lora_dropout, targets)
    except ValueError as e:
        raise InputError(f"--lora_target_modules: {e}") from e
    adamw = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    optimizers = remember_initial_lr([adamw])
    start_step, _ = stage.resume(policy, optimizers, args.max_steps, tokenizer_dir(payload), device)
    engine = Engine(policy)
    per_rank = args.rollout_batch_size // world_size
    group = args.num_return_sequences_in_group
    config = GRPOConfig(num_generations=group, max_new_tokens=args.max_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, scale_rewards="group", clip_eps=args.clip_range,
                        beta=args.kl_loss_coef if args.use_kl_loss else 0.0, loss_type="token",
                        grad_clip=args.max_grad_norm,
                        device_batch_size=max(-(-per_rank // args.gradient_accumulation_steps), 1) * group)

    def decode(ids):
        return tok.decode([t for t in ids if t not in stop_tokens]).strip()

    @torch.no_grad()
    def evaluate(step):
        """Greedy workflows for the held-out tasks (split over ranks): the summary's numbers."""
        policy.eval()
        mine = eval_tasks[rank::world_size]
        texts = []
        if mine:
            gen = engine.generate([prompt_ids(t) for t in mine], max_new_tokens=args.max_tokens, temperature=0.0,
                                  stop_tokens=stop_tokens)
            texts = [decode(c) for c in gen.completions()]
        records = score_workflows(texts, mine, executor, args, seed=step_seed(args.seed, step) * 100 + rank + 50)
        policy.train()
        return summary(records, device)

    policy.train()
    for step in range(start_step, args.max_steps):
        if step == 0 or (args.eval_every > 0 and step % args.eval_every == 0):
            stage.log_eval(step, evaluate(step), prefix="eval")
        lr = lr_multiplier(step, args.max_steps, args.warmup_steps, 1.0)
        set_lr(optimizers, lr)
        config.temperature = temperature_at(step, args)
        tasks = draw_tasks(pools, args.domain_ratios, args.rollout_batch_size, args.seed, step)
        mine = tasks[rank * per_rank:(rank + 1) * per_rank]
        step_records = []

        def reward_fn(batch):
            # completion row i is the i % G-th workflow of task i // G; scored on exactly the sampled ids
            texts = [decode(ids[mask].tolist()) for ids, mask in zip(batch.completion_ids, batch.completion_mask)]
            records = score_workflows(texts, [t for t in mine for _ in range(group)], executor, args,
                                      seed=step_seed(args.seed, step) * 100 + rank)
            step_records.extend(records)
            return torch.tensor([r["reward"] for r in records])

        stats, _, _ = grpo_step(policy, reference, optimizers, engine, [prompt_ids(t) for t in mine], reward_fn,
                                config, stop_tokens, seed=step_seed(args.seed, step), pad_id=tok.bos_token_id)
        stats |= summary(step_records, device) | {"temperature": config.temperature, "lr_multiplier": lr}
        stage.log(step + 1, stats,
                  f"reward {stats['reward']:.3f} [{stats['reward_min']:g}, {stats['reward_max']:g}] ± "
                  f"{stats['reward_std']:.3f} | accuracy {stats['accuracy']:.3f} ("
                  + ", ".join(f"{d} {stats[f'accuracy/{d}']:.2f}" for d in DOMAINS if f"accuracy/{d}" in stats)
                  + f") | invalid {stats['invalid_share']:.0%} | KL {stats['kl']:.4f} | T {config.temperature:.2f}")
        stage.maybe_save(step + 1, policy, optimizers)

    stage.log_eval(args.max_steps, evaluate(args.max_steps), prefix="eval")
    merge_lora(policy)  # a plain GPT: what chat_cli, the evaluation and the next stage load
    evals = [h for h in stage.history if "eval/reward" in h]
    metrics = {f"{k}_{when}": h[f"eval/{k}"] for when, h in (("start", evals[0]), ("final", evals[-1]))
               for k in ("reward", "accuracy", "invalid_share")}
    metrics |= {f"final_{k.removeprefix('eval/')}": v for k, v in evals[-1].items() if k.startswith("eval/")}
    metrics |= {"steps": args.max_steps, "executor": executor.describe()}
    # the training curve's two ends: the first and the last third of the steps (at most 10 each), a t interval over
    # steps, so a rise is told apart from step-to-step noise (the held-out evaluation above is greedy and small)
    train = [h for h in stage.history if "train/reward" in h]
    k = max(1, min(10, len(train) // 3))
    ends = {}
    for key in ("reward", "accuracy", "invalid_share"):
        for when, part in (("first", train[:k]), ("last", train[-k:])):
            ends[key, when] = window_mean([h[f"train/{key}"] for h in part])
            metrics[f"train_{key}_{when}"] = ends[key, when][0]
    usage = {d: Counter({k.rsplit("/", 1)[1]: round(v, 3) for k, v in evals[-1].items()
                         if k.startswith(f"eval/operators/{d}/")}) for d in DOMAINS}
    notes = ("Held-out evaluation (greedy workflows), start -> end:\n\n| | start | end |\n|---|---|---|\n"
             + "\n".join(f"| {k.removeprefix('eval/')} | {evals[0].get(k, math.nan):.3f} | {evals[-1][k]:.3f} |"
                         for k in evals[-1] if k.startswith("eval/") and "/operators/" not in k)
             + f"\n\nSampled workflows in training, the first {k} steps -> the last {k} (mean over steps, 95% t "
             f"interval over steps):\n\n| | first | last |\n|---|---|---|\n"
             + "\n".join(f"| {key} | " + " | ".join("{:.3f} [{:.3f}, {:.3f}]".format(*ends[key, when])
                                                   for when in ("first", "last")) + " |"
                         for key in ("reward", "accuracy", "invalid_share"))
             + "\n\nOperator usage per domain at the end (share of workflows using each):\n\n"
             + "\n".join(f"- {d}: " + ", ".join(f"{name} {v:.2f}" for name, v in usage[d].most_common())
                         for d in DOMAINS if usage[d]))
    stage.finish(policy, tokenizer_dir(payload), metrics, {"train_seconds": stage.elapsed()}, notes=notes,
                 # the executor, relative to this checkpoint's directory: the pair loads from any working directory
                 extra={"method": "workflow_grpo", "executor": None if args.executor_base_url else
                        os.path.relpath(os.path.abspath(args.executor_checkpoint or args.model_name),
                                        os.path.abspath(args.out_dir))},
                 parents=[payload], world=world, device=device)
    dist_cleanup()


if __name__ == "__main__":
    run_script(main)
