"""
Evaluate a chat model on tasks: greedy answers, scored by each task's adapter (nanochat/tasks).

    python -m scripts.chat_eval --ckpt_path outs/sft                    # world task, writes outs/eval_sft/
    python -m scripts.chat_eval --ckpt_path outs/base                   # writes outs/eval_base/
    python -m scripts.chat_eval --ckpt_path outs/sft --tasks world,arc_easy,gsm8k --from_dir data/hub --limit 200
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- --ckpt_path outs/sft --tasks mmlu,gsm8k
    python -m scripts.chat_eval --autodeco_path outs/autodeco --num_samples 4  # AutoDeco sampling, outs/eval_autodeco/

Tasks: world (held-out questions about the synthetic world, offline and gold-scored: the default), arc_easy,
arc_challenge, mmlu, gsm8k, humaneval (hub datasets, read from the hub or from local copies under --from_dir; see
nanochat/tasks). A model only knows the world it was trained on, so the world is the checkpoint's own (its
training --seed and --synthetic_size) unless --world_seed / --synthetic_size say otherwise. --limit caps every
task (default: 200 world questions, whole hub splits). Every task is loaded before any is run, so a missing
dataset stops the run at once.

Prints a table; writes <out_dir>/results.json (metrics plus every prompt, response and score) and
<out_dir>/report.md (also a section of outs/report.md). out_dir defaults to eval_<checkpoint dir name> beside the
checkpoint dir: outs/sft -> outs/eval_sft.

--autodeco_path DIR samples with AutoDeco heads (scripts.kat_train_autodeco) instead of fixed settings: the heads
choose each token's temperature, and its top-p when they were trained to, with min-p at the ratio they were trained
for, on the base model they name; so --ckpt_path, --temperature, --top_k, --top_p and --min_p do not go with it.
"""

import argparse
import os
import time

from datasets.exceptions import DatasetsError

from nanochat.autodeco import decode_hook, load_autodeco
from nanochat.checkpoint import CheckpointError, load_model, load_tokenizer
from nanochat.common import (atomic_write_json, dist_cleanup, dist_init, fraction, is_master, nonnegative_float,
                             parse_flags, positive_int, print0, run_script)
from nanochat.evaluate import evaluate_task
from nanochat.report import write_report
from nanochat.tasks import TASKS, world

SAMPLES_IN_REPORT = 5  # responses per task quoted in report.md; results.json has them all


def results_table(results):
    lines = [f"{'task':<14} {'n':>5} {'accuracy':>9} {'gold score':>11} {'artifact rate':>14}"]
    for name, r in results.items():
        extra = f"{r['score']:>11.4f} {r['artifact_rate']:>14.4f}" if "score" in r else f"{'-':>11} {'-':>14}"
        lines.append(f"{name:<14} {r['n']:>5} {r['accuracy']:>9.4f} {extra}")
    return "\n".join(lines)


def cluster_table(per_cluster, records):
    counts = {}
    for r in records:
        counts[r["cluster"]] = counts.get(r["cluster"], 0) + 1
    lines = [f"{'cluster':<16} {'n':>4} {'accuracy':>9}"]
    lines += [f"{c:<16} {counts[c]:>4} {acc:>9.4f}" for c, acc in per_cluster.items()]
    return "\n".join(lines)


def one_line(error):
    return f"{type(error).__name__}: " + " ".join(str(error).split())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", type=str, default=None, help="a stage directory or its ckpt.pt (default "
                        "outs/sft)")
    parser.add_argument("--autodeco_path", type=str, default=None,
                        help="AutoDeco heads (a stage directory or its ckpt.pt): sample with their temperature and "
                             "top-p on the base model they name, instead of --ckpt_path and the sampling flags")
    parser.add_argument("--tasks", type=str, default="world", help=f"comma-separated, of: {', '.join(TASKS)}")
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: world 200, hub all)")
    parser.add_argument("--from_dir", type=str, default=None, help="local copies of the hub datasets")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=positive_int, default=32, help="prompts generated together")
    parser.add_argument("--num_samples", type=positive_int, default=1,
                        help="responses per item; with k > 1 the results add pass@k (any response right)")
    parser.add_argument("--temperature", type=nonnegative_float, default=None, help="default 0: greedy")
    parser.add_argument("--top_k", type=positive_int, default=None)
    parser.add_argument("--top_p", type=fraction, default=None)
    parser.add_argument("--min_p", type=fraction, default=None)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    parser.add_argument("--world_seed", type=int, default=None, help="default: the checkpoint's training --seed")
    parser.add_argument("--synthetic_size", type=int, default=None,
                        help="world size; default: the checkpoint's training --synthetic_size")
    parser.add_argument("--out_dir", type=str, default=None, help="default: eval_<ckpt dir> beside the ckpt dir")
    parser.add_argument("--device", type=str, default=None, help="cuda | mps | cpu (default: autodetect)")
    args = parse_flags(parser, argv)

    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if not names or unknown:
        raise SystemExit(f"chat_eval: unknown or no tasks {unknown or args.tasks!r}; choose from {', '.join(TASKS)}")
    fixed = [f"--{name}" for name in ("ckpt_path", "temperature", "top_k", "top_p", "min_p")
             if getattr(args, name) is not None]
    if args.autodeco_path is not None and fixed:
        raise SystemExit(f"chat_eval: --autodeco_path brings its own base model and sampling settings; drop "
                         f"{', '.join(fixed)}")
    rank, world_size, device = dist_init(args.device)
    try:
        if args.autodeco_path is None:
            args.ckpt_path = args.ckpt_path or "outs/sft"
            args.temperature = args.temperature or 0.0
            model, payload = load_model(args.ckpt_path, device)
            sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                        "min_p": args.min_p}
        else:
            model, heads, payload = load_autodeco(args.autodeco_path, device)
            sampling = {"decode_hook": decode_hook(heads, payload["train_top_p"]), "min_p": payload["min_p_ratio"]}
        tok = load_tokenizer(payload)
    except CheckpointError as e:
        raise SystemExit(f"chat_eval: {e}")
    stage_dir = os.path.dirname(os.path.abspath(payload["path"]))
    out_dir = args.out_dir or os.path.join(os.path.dirname(stage_dir), f"eval_{os.path.basename(stage_dir)}")
    trained_world = payload["world"] or {"seed": 0, "size": 1}
    world_seed = args.world_seed if args.world_seed is not None else trained_world["seed"]
    synthetic_size = args.synthetic_size or trained_world["size"]
    print0(f"checkpoint {payload['path']} (step {payload.get('step')}) on {device} x {world_size}")

    task_items = {}
    for name in names:
        task = TASKS[name]
        kwargs = {"seed": world_seed, "size": synthetic_size} if task is world else {}
        try:
            task_items[name] = task.load(from_dir=args.from_dir, limit=args.limit, **kwargs)
        except (OSError, ValueError, DatasetsError) as e:
            hint = "" if task is world or args.from_dir else "; offline? pass --from_dir with a local copy"
            raise SystemExit(f"chat_eval: task {name} unavailable ({one_line(e)}){hint}")
    if "world" in names:
        print0(f"world: seed {world_seed}, size {synthetic_size}")

    results, timings = {}, {}
    for name in names:
        t0 = time.time()
        results[name] = evaluate_task(model, tok, TASKS[name], task_items[name], args.max_new_tokens,
                                      args.batch_size, seed=args.seed, num_samples=args.num_samples, **sampling)
        timings[f"{name}_seconds"] = time.time() - t0
        pass_at_k = results[name].get(f"pass@{args.num_samples}")
        print0(f"{name}: accuracy {results[name]['accuracy']:.4f} on {results[name]['n']} responses"
               + (f", pass@{args.num_samples} {pass_at_k:.4f}" if pass_at_k is not None else "")
               + f" ({timings[name + '_seconds']:.1f}s)")

    table = results_table(results)
    notes = [f"Checkpoint `{payload['path']}` (step {payload.get('step')}).", "```\n" + table + "\n```"]
    if args.autodeco_path is not None:
        notes.insert(1, f"AutoDeco sampling: the heads choose the temperature"
                        f"{' and top-p' if payload['train_top_p'] else ''}, min-p {payload['min_p_ratio']:g}; base "
                        f"`{payload['base_payload']['path']}`.")
    print0("\n" + table)
    if "world" in results:
        clusters = cluster_table(results["world"]["per_cluster"], results["world"]["records"])
        print0("\n" + clusters)
        notes.append(f"World (seed {world_seed}, size {synthetic_size}) accuracy per cluster, densest first:\n\n"
                     f"```\n{clusters}\n```")
    for name, r in results.items():
        quoted = [f"- {rec['prompt']!r} -> {rec['response']!r} (score {rec['score']:g})"
                  for rec in r["records"][:SAMPLES_IN_REPORT]]
        notes.append(f"Sample responses, {name}:\n\n" + "\n".join(quoted))

    if is_master():
        metrics = {}
        for name, r in results.items():
            metrics.update({f"{name}/{k}": v for k, v in r.items() if k not in ("records", "per_cluster")})
        atomic_write_json(os.path.join(out_dir, "results.json"), {
            "checkpoint": payload["path"], "step": payload.get("step"),
            "world": {"seed": world_seed, "size": synthetic_size}, "flags": vars(args), "tasks": results})
        write_report(out_dir, metrics, timings, vars(args), device, notes="\n\n".join(notes))
        print0(f"\nwrote {os.path.join(out_dir, 'results.json')} and {os.path.join(out_dir, 'report.md')}")
    dist_cleanup()


if __name__ == "__main__":
    run_script(main)
