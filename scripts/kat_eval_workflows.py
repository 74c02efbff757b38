"""
Workflow evaluation, AFlow-style: does the trained workflow policy beat fixed workflows run by the same executor on
the same tasks?

    python -m scripts.kat_eval_workflows                                  # outs/workflow -> outs/workflow_eval/
    python -m scripts.kat_eval_workflows --checkpoint outs/workflow --executor_checkpoint outs/workflow_sft
    python -m scripts.kat_eval_workflows --dataset_names gsm8k,math,squad_v2,hotpotqa,humaneval,mbpp \
        --from_dir data/hub --limit 200
    python -m scripts.kat_eval_workflows --workflow "Programmer -> Test ? done : Revise" \
        --executor_checkpoint outs/workflow_sft
    python -m scripts.kat_eval_workflows --executor_base_url http://localhost:8000/v1 --executor_model qwen2.5-7b

Tasks (--dataset_names, --split, at most --limit per data set): "synthetic" (the default, offline) is
workflow_data.synthetic_split: --limit tasks of the held-out part (by task id, so never a task SFT trained on), in
the default domain mix, drawn by --seed, of the world the checkpoint records (seed 0, size 1 when it records none,
or when there is no local checkpoint at all; a size-1 world's test part holds only 42-53 code tasks, so a domain
with fewer than its share of --limit gives all it has); the hub data sets (gsm8k, math, math_qwedsacf, squad_v2,
hotpotqa, humaneval, mbpp) come through nanochat.workflow_tasks.load_tasks, from the hub or from local copies under
--from_dir, the first --limit of the split in file order (where a hub split is cut into parts, by load_tasks' own
fixed seed, never --seed, so that the test part is always the one training left out). Every data set is loaded
before anything runs, so a missing one stops the run at once.

The executor runs every method's operator prompts: --executor_base_url (with --executor_model) sends them to an
OpenAI-compatible endpoint; otherwise LocalExecutor over --executor_checkpoint, by default the executor the policy
checkpoint records (its extra["executor"], or its flags' executor_checkpoint), else the policy checkpoint itself.

Methods, on the same tasks, each through one workflow.run_workflows call over all its tasks (so every round is one
batched executor call), the executor sampling at --temperature:

- policy: the checkpoint writes one workflow per task, greedily, from workflow_data.policy_prompt (a prompt longer
  than its context is cut from the left, as every stage cuts one). An invalid workflow scores 0 and is counted.
- direct (AnswerGenerate), cot (Custom("Think step by step.")), sc5 (five AnswerGenerate branches voted by
  ScEnsemble), programmer (Programmer) and programmer_test (Programmer -> Test ? done : Revise). A fixed workflow
  that does not fit a task's domain (Programmer and Test fit math and code only) is n/a there, not run.
- --workflow "..." instead evaluates one hand-written workflow beside direct, on the tasks whose domain it fits
  (the others are skipped, and the header says so). It needs no policy checkpoint; it must parse (an error names
  the column) and fit at least one domain of the tasks.

Each answer gets the five-tier reward of nanochat.workflow_tasks (accuracy: reward >= 0.75). Per group of tasks
(all of them, each data set, each domain; a group equal to an earlier one is not repeated): every method's mean
reward and accuracy with 95% CIs (the half-sample bootstrap over tasks of nanochat/diversity.py), its executor
calls per task, and the policy (or the hand-written workflow) minus the method, a paired CI over per-task
differences on the same tasks, flagged when no task differs (a zero-width interval that says nothing). A method n/a
on any task of a group is n/a for the whole group: comparisons are only made on identical task sets. The policy's
invalid-workflow share, the share of its valid workflows using each operator and its most common workflows, per
group. The best fixed workflow is the one most accurate on all tasks (chosen on the test tasks themselves: a
baseline that flatters the fixed workflows, not the policy).

Writes into --out_dir: workflow_eval.md (header, answers, one table per group, the policy's operators),
workflow_eval.json (the summary and one record per task and method: task id, data set, domain, method, workflow,
answer, reward, executor calls, error; n/a records have reward null) and report.md, the stage's section of the
run's report (outs/report.md for outs/workflow_eval).
"""

import argparse
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from datasets.exceptions import DatasetsError

from nanochat.checkpoint import load_model, load_tokenizer
from nanochat.common import (InputError, atomic_write, atomic_write_json, autodetect_device, check_completion_budget,
                             nonnegative_float, parse_flags, positive_float, positive_int, print0, run_script)
from nanochat.diversity import bootstrap_ci, verdict
from nanochat.executor import ExecutorError, LocalExecutor, OpenAIExecutor
from nanochat.operators import DOMAINS
from nanochat.report import write_report
from nanochat.workflow import WorkflowError, operators_used, parse, run_workflows, to_text, validate
from nanochat.workflow_data import policy_prompt, synthetic_split
from nanochat.workflow_tasks import ACCURATE, READERS, load_tasks, reward

STEM = "workflow_eval"
FIXED = {
    "direct": "AnswerGenerate",
    "cot": 'Custom("Think step by step.")',
    "sc5": "[AnswerGenerate, AnswerGenerate, AnswerGenerate, AnswerGenerate, AnswerGenerate] -> ScEnsemble",
    "programmer": "Programmer",
    "programmer_test": "Programmer -> Test ? done : Revise",
}
DATASETS = ("synthetic", *READERS)
SCORING_WORKERS = 4  # code rewards are sandbox runs: subprocesses, so threads overlap them
TOP_WORKFLOWS = 3    # the policy's most common workflows shown per group
INVALID_EXAMPLES = 5


class Seeded:
    """The executor with a seed per prompt: run_workflows leaves the executor's seed at its default, so without
    this --seed would not reach the executor's sampling. Prompt k of a method's run gets seed + k."""

    def __init__(self, executor, seed):
        self.executor, self.seed, self.sent = executor, seed, 0

    def complete(self, prompts, temperature, max_tokens):
        replies = self.executor.complete(prompts, temperature=temperature, max_tokens=max_tokens,
                                         seed=self.seed + self.sent)
        self.sent += len(prompts)
        return replies


# -----------------------------------------------------------------------------
# inputs

def recorded_executor(payload):
    """
    The executor checkpoint a policy checkpoint records, or None. kat_train_workflow records it relative to the
    policy's own directory, so the pair loads from any working directory; a path as typed (relative to where the
    training ran) is the fallback.
    """
    path = payload["extra"].get("executor") or payload["flags"].get("executor_checkpoint")
    if path and not os.path.isabs(path) and os.path.exists(os.path.join(payload["dir"], path)):
        return os.path.join(payload["dir"], path)
    return path


def load_all_tasks(names, world_spec, args):
    tasks = []
    for name in names:
        if name == "synthetic":
            # the world's held-out parts are small (about 42-53 test code tasks at size 1): a domain with fewer than
            # its share of --limit gives all it has
            tasks += synthetic_split(world_spec, args.split, args.limit, args.seed, at_most=True)
            continue
        try:
            # the cut of a hub split into parts keeps load_tasks' own seed: --seed must not move tasks into "test"
            tasks += load_tasks(name, args.split, from_dir=args.from_dir, limit=args.limit)
        except (OSError, ValueError, DatasetsError) as e:
            hint = "" if args.from_dir else "; offline? pass --from_dir with a local copy"
            raise InputError(f"data set {name} unavailable ({type(e).__name__}: {' '.join(str(e).split())}){hint}")
    if not tasks:
        raise InputError(f"no {args.split} tasks in {', '.join(names)}")
    return tasks


def workflow_flag(text):
    """--workflow parsed, or an InputError with the parser's column message."""
    try:
        return parse(text)
    except WorkflowError as e:
        raise InputError(f"--workflow {text!r} is not a valid workflow: {e}") from None


def fitting(ast, text, tasks):
    """The tasks whose domain the hand-written workflow fits (the comparison is made on those), and what the others
    were skipped for; an InputError when it fits none."""
    problems = {domain: validate(ast, domain) for domain in sorted({t["domain"] for t in tasks}, key=DOMAINS.index)}
    if all(problems.values()):
        raise InputError(f"--workflow {text!r} fits none of the tasks' domains: "
                         + "; ".join(f"{domain}: {found[0]}" for domain, found in problems.items()))
    skipped = [f"{sum(t['domain'] == domain for t in tasks)} {domain} tasks ({found[0]})"
               for domain, found in problems.items() if found]
    return [t for t in tasks if not problems[t["domain"]]], skipped


# -----------------------------------------------------------------------------
# running and scoring

def run_method(workflows, tasks, executor, args):
    """Per task (WorkflowResult, reward), or None where workflows[i] is None (n/a: not run)."""
    run = [i for i, workflow in enumerate(workflows) if workflow is not None]
    try:
        results = run_workflows([(workflows[i], tasks[i]) for i in run], Seeded(executor, args.seed),
                                temperature=args.temperature, max_tokens=args.max_tokens,
                                execution_timeout=args.execution_timeout)
    except ExecutorError as e:
        raise InputError(f"the executor failed: {e}") from None

    def score(i, result):  # a result with an error (invalid workflow, timeout) scores 0, as workflow.py says
        return 0.0 if result.error else reward(tasks[i], result.answer, args.execution_timeout)
    with ThreadPoolExecutor(max_workers=SCORING_WORKERS) as pool:
        rewards = list(pool.map(score, run, results))
    out = [None] * len(tasks)
    for i, result, value in zip(run, results, rewards):
        out[i] = (result, value)
    return out


def groups_of(tasks, names):
    """[(label, task indices)]: all tasks, each data set, each domain; a group equal to an earlier one is dropped."""
    everything = list(range(len(tasks)))
    candidates = [(names[0] if len(names) == 1 else "all", everything)]
    candidates += [(name, [i for i in everything if tasks[i]["dataset"] == name]) for name in names]
    candidates += [(f"{domain} tasks", [i for i in everything if tasks[i]["domain"] == domain]) for domain in DOMAINS]
    groups = []
    for label, indices in candidates:
        if indices and all(indices != kept for _, kept in groups):
            groups.append((label, indices))
    return groups


def interval(values, args):
    return bootstrap_ci(np.asarray(values, dtype=np.float64), num_resamples=args.num_resamples, seed=args.seed)


def summarize(rewards, calls, groups, reference, args):
    """{group: {method: row or None (n/a on some task of the group)}}; a row has n, reward and accuracy (mean, lo,
    hi), calls per task, and for methods other than the reference diff_reward / diff_accuracy (reference minus
    method, per task on the same tasks) with same_reward / same_accuracy: no task differs."""
    summary = {}
    for label, indices in groups:
        ours = rewards[reference][indices]
        rows = {}
        for method, values in rewards.items():
            theirs = values[indices]
            if np.isnan(theirs).any():
                rows[method] = None
                continue
            row = {"n": len(indices), "reward": interval(theirs, args), "accuracy": interval(theirs >= ACCURATE, args),
                   "calls": float(calls[method][indices].mean())}
            if method != reference and not np.isnan(ours).any():
                for key, a, b in (("reward", ours, theirs), ("accuracy", ours >= ACCURATE, theirs >= ACCURATE)):
                    diff = a.astype(np.float64) - b
                    row[f"diff_{key}"] = interval(diff, args)
                    row[f"same_{key}"] = not diff.any()
            rows[method] = row
        summary[label] = rows
    return summary


def policy_usage(texts, outcomes, indices):
    """The policy's invalid share, the share of its valid workflows using each operator, their mean number of
    operators and the most common ones (canonical text) over some tasks."""
    invalid = {i for i in indices if (outcomes[i][0].error or "").startswith("invalid workflow")}
    valid = [parse(texts[i]) for i in indices if i not in invalid]
    uses = Counter(name for ast in valid for name in set(operators_used(ast)))
    return {"tasks": len(indices), "invalid_share": len(invalid) / len(indices),
            "operator_share": {name: count / len(valid) for name, count in uses.most_common()},
            "mean_operators": float(np.mean([len(operators_used(ast)) for ast in valid])) if valid else None,
            "top_workflows": Counter(to_text(ast) for ast in valid).most_common(TOP_WORKFLOWS)}


# -----------------------------------------------------------------------------
# the report

def fmt(ci, sign=""):
    point, lo, hi = ci
    return f"{point:{sign}.3f} [{lo:{sign}.3f}, {hi:{sign}.3f}]"


def fmt_diff(row, key):
    if f"diff_{key}" not in row:
        return ""
    ci = row[f"diff_{key}"]
    flag = " ⚠ no task differs" if row[f"same_{key}"] else ""
    return f"{fmt(ci, '+')} {verdict(ci[1:], +1)}{flag}"


def group_table(label, indices, tasks, summary, methods, reference, na_domains):
    domains = Counter(tasks[i]["domain"] for i in indices)
    mix = f" ({', '.join(f'{d} {domains[d]}' for d in DOMAINS if domains[d])})" if len(domains) > 1 else ""
    lines = [f"### {label}: {len(indices)} tasks{mix}\n",
             f"| method | accuracy | reward | calls/task | {reference} minus method: accuracy | "
             f"{reference} minus method: reward |", "|---|---|---|---|---|---|"]
    for method in methods:
        row = summary[label][method]
        if row is None:
            lines.append(f"| {method} | n/a on {', '.join(na_domains(method, indices))} tasks | | | | |")
            continue
        lines.append(f"| {method} | {fmt(row['accuracy'])} | {fmt(row['reward'])} | {row['calls']:.2f} | "
                     f"{fmt_diff(row, 'accuracy')} | {fmt_diff(row, 'reward')} |")
    return lines


def methods_table(methods):
    lines = ["| method | workflow |", "|---|---|"]
    lines += [f"| {method} | " + ("the policy's own, written per task" if workflow is None else f"`{workflow}`") + " |"
              for method, workflow in methods.items()]
    return lines


def usage_table(usage):
    lines = ["| group | tasks | invalid | operators (share of valid workflows using each) | operators per workflow | "
             "most common workflows |", "|---|---|---|---|---|---|"]
    for label, u in usage.items():
        ops = ", ".join(f"{name} {share:.0%}" for name, share in u["operator_share"].items()) or "-"
        per = "-" if u["mean_operators"] is None else f"{u['mean_operators']:.2f}"
        top = "; ".join(f"`{text}` ({count})" for text, count in u["top_workflows"]) or "-"
        lines.append(f"| {label} | {u['tasks']} | {u['invalid_share']:.1%} | {ops} | {per} | {top} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=str, default=None,
                        help="the workflow policy (default outs/workflow; optional with --workflow)")
    parser.add_argument("--executor_checkpoint", type=str, default=None,
                        help="the local executor (default: the one the policy records, else the policy itself)")
    parser.add_argument("--executor_base_url", type=str, default=None,
                        help="an OpenAI-compatible endpoint as the executor instead, e.g. http://localhost:8000/v1")
    parser.add_argument("--executor_model", type=str, default=None, help="the endpoint's model name")
    parser.add_argument("--dataset_names", type=str, default="synthetic",
                        help=f"comma-separated, of: {', '.join(DATASETS)}")
    parser.add_argument("--from_dir", type=str, default=None, help="local copies of the hub data sets")
    parser.add_argument("--split", type=str, default="test", choices=("train", "val", "test"))
    parser.add_argument("--limit", type=positive_int, default=150,
                        help="tasks per data set, at most (synthetic: a domain short of its share gives all it has)")
    parser.add_argument("--workflow", type=str, default=None,
                        help="evaluate this hand-written workflow (beside direct) instead of the policy")
    parser.add_argument("--temperature", type=nonnegative_float, default=0.7, help="the executor's")
    parser.add_argument("--max_tokens", type=positive_int, default=128, help="the executor's, per operator call")
    parser.add_argument("--policy_max_tokens", type=positive_int, default=64, help="the policy's workflow length")
    parser.add_argument("--execution_timeout", type=positive_float, default=5.0, help="seconds per sandbox run")
    parser.add_argument("--batch_size", type=positive_int, default=64, help="prompts generated together (local)")
    parser.add_argument("--num_resamples", type=positive_int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="synthetic task draw, executor sampling, bootstrap")
    parser.add_argument("--out_dir", type=str, default="outs/workflow_eval")
    parser.add_argument("--device", type=str, default=None, help="cuda | mps | cpu (default: autodetect)")
    args = parse_flags(parser, argv)

    names = list(dict.fromkeys(n.strip() for n in args.dataset_names.split(",") if n.strip()))
    unknown = [n for n in names if n not in DATASETS]
    if not names or unknown:
        raise InputError(f"--dataset_names: unknown or no data sets {unknown or args.dataset_names!r}; known: "
                         f"{', '.join(DATASETS)}")
    ast = None if args.workflow is None else workflow_flag(args.workflow)  # before any loading
    if args.checkpoint is None and args.workflow is None:
        args.checkpoint = "outs/workflow"
    if (args.executor_base_url is None) != (args.executor_model is None):
        raise InputError("--executor_base_url and --executor_model go together")

    device = autodetect_device(args.device)
    timings = {}
    t0 = time.perf_counter()
    policy = payload = None
    if args.checkpoint is not None:
        policy, payload = load_model(args.checkpoint, device)
        policy_tok = load_tokenizer(payload)
        check_completion_budget("policy_max_tokens", args.policy_max_tokens, policy, "policy")
    executor_payload = None
    if args.executor_base_url is not None:
        executor = OpenAIExecutor(args.executor_base_url, args.executor_model)
    else:
        path = args.executor_checkpoint or (payload and recorded_executor(payload)) or args.checkpoint
        if path is None:
            raise InputError("--workflow without --checkpoint needs an executor: --executor_checkpoint or "
                             "--executor_base_url")
        if payload is not None and os.path.abspath(path) in (os.path.abspath(payload["path"]),
                                                            os.path.dirname(os.path.abspath(payload["path"]))):
            executor_model, executor_payload, executor_tok = policy, payload, policy_tok
        else:
            executor_model, executor_payload = load_model(path, device)
            executor_tok = load_tokenizer(executor_payload)
        check_completion_budget("max_tokens", args.max_tokens, executor_model, "executor")
        executor = LocalExecutor(executor_model, executor_tok, batch_size=args.batch_size)
    world_spec = ((payload or executor_payload or {}).get("world")) or {"seed": 0, "size": 1}
    tasks, skipped = load_all_tasks(names, world_spec, args), []
    if ast is not None:
        tasks, skipped = fitting(ast, args.workflow, tasks)
    timings["load_seconds"] = time.perf_counter() - t0
    counts = Counter(task["dataset"] for task in tasks)
    print0(f"{len(tasks)} {args.split} tasks ({', '.join(f'{n} {counts[n]}' for n in names)}); executor: "
           f"{executor.describe()}")

    if ast is not None:
        reference, methods = "workflow", {"workflow": to_text(ast), "direct": FIXED["direct"]}
    else:
        reference, methods = "policy", {"policy": None, **FIXED}
    outcomes, texts = {}, {}
    for method, workflow in methods.items():
        t0 = time.perf_counter()
        if workflow is None:
            writer = LocalExecutor(policy, policy_tok, batch_size=args.batch_size)
            generated = writer.complete([policy_prompt(task) for task in tasks], temperature=0.0,
                                        max_tokens=args.policy_max_tokens)
            texts[method] = [text.strip() for text in generated]
            timings["policy_generate_seconds"] = time.perf_counter() - t0
        else:
            fits = {domain: not validate(parse(workflow), domain) for domain in DOMAINS}
            texts[method] = [workflow if fits[task["domain"]] else None for task in tasks]
        outcomes[method] = run_method(texts[method], tasks, executor, args)
        timings[f"{method}_seconds"] = time.perf_counter() - t0
        done = [outcome[1] for outcome in outcomes[method] if outcome is not None]
        print0(f"{method}: accuracy {np.mean(np.array(done) >= ACCURATE):.3f}, mean reward {np.mean(done):.3f} on "
               f"{len(done)} tasks ({timings[f'{method}_seconds']:.1f}s)")

    records = []
    for method, workflow in methods.items():
        for i, task in enumerate(tasks):
            record = {"task": task["id"], "dataset": task["dataset"], "domain": task["domain"], "method": method,
                      "workflow": texts[method][i] if workflow is None else workflow}
            if outcomes[method][i] is None:
                problem = validate(parse(workflow), task["domain"])[0]
                record.update(answer=None, reward=None, calls=0, error=f"n/a: {problem}")
            else:
                result, value = outcomes[method][i]
                record.update(answer=result.answer, reward=value, calls=result.calls, error=result.error)
            records.append(record)
    rewards = {m: np.array([np.nan if o is None else o[1] for o in outcomes[m]]) for m in methods}
    calls = {m: np.array([0 if o is None else o[0].calls for o in outcomes[m]]) for m in methods}
    groups = groups_of(tasks, names)
    summary = summarize(rewards, calls, groups, reference, args)

    def na_domains(method, indices):
        return sorted({tasks[i]["domain"] for i in indices if np.isnan(rewards[method][i])}, key=DOMAINS.index)

    overall, everything = groups[0][0], summary[groups[0][0]]
    ours = everything[reference]
    fixed = [m for m in methods if m != reference and everything[m] is not None]
    best = max(fixed, key=lambda m: everything[m]["accuracy"][0])  # direct fits every domain: never empty
    label = "the policy" if reference == "policy" else f"`{methods['workflow']}`"
    answers = [f"**{label}**: accuracy {fmt(ours['accuracy'])}, mean reward {fmt(ours['reward'])} on "
               f"{ours['n']} tasks"]
    usage = {}
    if reference == "policy":
        usage = {group: policy_usage(texts["policy"], outcomes["policy"], indices) for group, indices in groups}
        answers[0] += f"; {usage[overall]['invalid_share']:.1%} of its workflows invalid (scored 0)"
    answers.append(f"**Best fixed workflow** on all tasks: {best} (`{methods[best]}`), accuracy "
                   f"{fmt(everything[best]['accuracy'])}; {reference} minus it: "
                   f"{fmt_diff(everything[best], 'accuracy')}")
    if reference == "policy":
        evaluated = f"- policy: `{payload['path']}` (greedy, up to {args.policy_max_tokens} tokens)"
    else:
        evaluated = (f"- hand-written workflow `{methods['workflow']}`"
                     + (f" (checkpoint `{payload['path']}`)" if payload else "")
                     + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    world = f" (world seed {world_spec['seed']}, size {world_spec['size']})" if "synthetic" in names else ""
    header = ["# Workflow evaluation\n", evaluated,
              f"- executor: {executor.describe()}; temperature {args.temperature:g}, max_tokens {args.max_tokens}, "
              f"sandbox timeout {args.execution_timeout:g}s",
              f"- tasks: {len(tasks)} of the {args.split} split of {', '.join(f'{n} ({counts[n]})' for n in names)}"
              f"{world}, at most {args.limit} per data set; seed {args.seed}",
              f"- 95% CIs: half-sample bootstrap over tasks ({args.num_resamples} resamples); '{reference} minus "
              "method' is paired task by task on the same tasks (✅ above 0, ❌ below, ≈ includes 0); accuracy is "
              f"reward >= {ACCURATE}; n/a: the workflow does not fit some tasks' domain (not run there)\n"]
    body = [*header, "## Answers\n", *[f"- {a}" for a in answers], "", "## Methods\n", *methods_table(methods), "",
            "## Results by group\n"]
    for group, indices in groups:
        body += group_table(group, indices, tasks, summary, methods, reference, na_domains) + [""]
    if usage:
        invalid = [r for r in records if r["method"] == "policy" and (r["error"] or "").startswith("invalid")]
        body += ["## The policy's workflows\n", *usage_table(usage), ""]
        body += [f"Invalid workflows ({len(invalid)}; the first {min(len(invalid), INVALID_EXAMPLES)}):\n"]
        body += [f"- `{r['workflow']!r}` on {r['task']}: {r['error']}" for r in invalid[:INVALID_EXAMPLES]] + [""]
    report = "\n".join(body)
    atomic_write(os.path.join(args.out_dir, STEM + ".md"), report)
    atomic_write_json(os.path.join(args.out_dir, STEM + ".json"), {
        "checkpoint": payload["path"] if payload else None, "executor": executor.describe(),
        "world": world_spec if "synthetic" in names else None, "flags": vars(args), "methods": methods,
        "reference": reference, "skipped": skipped, "answers": answers, "groups": {group: [tasks[i]["id"] for i in idx]
                                                               for group, idx in groups},
        "summary": summary, "policy_usage": usage, "timings": timings, "records": records})

    metrics = {f"{reference}_accuracy": ours["accuracy"][0], f"{reference}_accuracy_ci": ours["accuracy"][1:],
               f"{reference}_reward": ours["reward"][0], "best_fixed_method": best,
               "best_fixed_accuracy": everything[best]["accuracy"][0],
               "best_fixed_accuracy_ci": everything[best]["accuracy"][1:],
               f"{reference}_minus_best_fixed_accuracy": everything[best]["diff_accuracy"][0],
               f"{reference}_minus_best_fixed_accuracy_ci": everything[best]["diff_accuracy"][1:]}
    if usage:
        metrics["policy_invalid_share"] = usage[overall]["invalid_share"]
    metrics.update({f"{group}/{method}/accuracy": row["accuracy"][0]
                    for group, rows in summary.items() for method, row in rows.items() if row is not None})
    table = group_table(overall, groups[0][1], tasks, summary, methods, reference, na_domains)
    write_report(args.out_dir, metrics, timings, vars(args), device,
                 notes="\n".join([*[f"- {a}" for a in answers], "", *methods_table(methods), "", *table, "",
                                  f"The whole report: [{STEM}.md]({STEM}.md) (every record in {STEM}.json)."]))
    print0("\n".join(answers))
    print0(f"wrote {os.path.join(args.out_dir, STEM)}.md and .json")


if __name__ == "__main__":
    run_script(main)
