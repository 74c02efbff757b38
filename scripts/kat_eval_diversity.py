"""
RLHF stage: the diversity / mode-collapse report. Samples any named set of models on held-out prompts and compares
them with nanochat/diversity.py: each against a reference model, and one headline pair against each other. By
default the density-aware GRPO model and the uniform-sampling GRPO baseline, against the SFT model.

    python -m scripts.kat_eval_diversity                    # sft=outs/sft, density=outs/grpo_density, baseline=...
    python -m scripts.kat_eval_diversity --num_prompts=200 --samples_per_prompt=8 --temperature=0.7
    python -m scripts.kat_eval_diversity --models=sft=outs/sft,density=outs/dpo_density,baseline=outs/dpo_baseline
    python -m scripts.kat_eval_diversity --models=density=outs/grpo_density,baseline=outs/grpo_baseline \
        --rm_ckpt_path=                                     # no SFT column, no reward
    python -m scripts.kat_eval_diversity --models=sft=outs/sft --models=grpo=outs/grpo_density,dpo=outs/dpo_density \
        --contrast=dpo,grpo                                 # any names; --models may repeat
    python -m scripts.kat_eval_diversity --output_report=.cache/diversity_t07.md --temperature=0.7

Models: --models NAME=PATH,... (repeatable), NAME an identifier, the label of the model's column (sft, density and
baseline get nicer ones). --reference NAME: every other model minus it ("changes from the reference"); default sft
when it is named, else none. --contrast A,B: the headline difference A − B, whose rare-versus-dense gap the report
answers in words; default density,baseline when both are named, else none (a note says so). An empty --reference=
or --contrast= turns it off. A reference outside the contrast whose checkpoint does not exist is left out with a
note (as a missing SFT model always was); every other model must load.

Prompts: the first --num_prompts distinct conversations of --prompts_path (held-out pairs_test.jsonl by default)
that no compared model trained on (checked against the --pairs_path saved in its checkpoint) and whose render plus
--max_new_tokens fits every model's context; the others are skipped and counted. Each model answers each prompt
--samples_per_prompt times at --temperature (sampling exposes mode collapse; greedy would hide it), from the same
--seed, so the models draw from the same random streams.

Density quantiles: each prompt's density (1 / mean cosine distance to its --density_k nearest neighbours, see
nanochat/density.py) among the evaluated prompts, embedded by the reference model (the first model when there is
none), or read from --density_path when that file covers every evaluated prompt. Quartiles of those densities:
q1 = sparsest (the rare clusters) .. q4 = densest.

Quality: the reward of --rm_ckpt_path (skipped with a note when missing), and for prompts of the synthetic world
its gold score and correctness. The world is the one the checkpoints record (seed 0, size 1 when they record none),
or --world_seed / --synthetic_size; models that record different worlds are refused before anything is sampled.

Writes --output_report (markdown: summary table, rare-vs-dense answer with CIs, per-quantile tables, sample
responses), a JSON sidecar beside it (same name, .json: every number, the prompts, densities and responses) and
PNG bar charts beside it: <report name>_summary.png (every metric with a direction) and <report name>_quantiles.png
(the headline metric per density quantile). One process; no torchrun.
"""

import argparse
import os
import shlex
import sys
import time

import numpy as np
import torch

from nanochat.checkpoint import CheckpointError, load_model, load_tokenizer, resolve_path
from nanochat.common import atomic_write, atomic_write_json, autodetect_device, parse_flags, print0, run_script
from nanochat.density import compute_density, read_densities
from nanochat.diversity import METRICS, collect_metrics, model_label, render_report, write_charts
from nanochat.evaluate import generate_responses
from nanochat.pairs import extract_prompts, read_pairs
from nanochat.rm import load_reward_model, score
from nanochat.synthetic import make_world

NUM_QUANTILES = 4
DEFAULT_MODELS = "sft=outs/sft,density=outs/grpo_density,baseline=outs/grpo_baseline"


def parse_models(parser, specs):
    """{name: path} in order from --models NAME=PATH,... (each occurrence of the flag adds its entries)."""
    paths = {}
    for entry in ",".join(specs).split(","):
        name, _, path = entry.strip().partition("=")
        if not name.isidentifier() or not path:
            parser.error(f"--models: {entry.strip()!r} is not NAME=PATH with NAME an identifier (e.g. dpo_density)")
        if name in paths:
            parser.error(f"--models: {name} is named twice")
        paths[name] = path
    return paths


def parse_roles(parser, args, names):
    """(reference or None, contrast (a, b) or None) from --reference / --contrast, or their defaults."""
    known = ", ".join(names)
    reference = args.reference if args.reference is not None else "sft" if "sft" in names else ""
    if reference and reference not in names:
        parser.error(f"--reference: {reference} is not one of the models ({known})")
    if args.contrast is None:
        contrast = ["density", "baseline"] if {"density", "baseline"} <= set(names) else []
    else:
        contrast = [name.strip() for name in args.contrast.split(",") if name.strip()]
    if contrast and (len(contrast) != 2 or contrast[0] == contrast[1]):
        parser.error(f"--contrast: {args.contrast!r} is not A,B with two different models")
    for name in contrast:
        if name not in names:
            parser.error(f"--contrast: {name} is not one of the models ({known})")
    return reference or None, tuple(contrast) or None


def load_models(paths, reference, contrast, device):
    """{name: (model, tokenizer, payload)} in --models order, the reference (None when left out) and notes."""
    models, notes = {}, []
    for name, path in paths.items():
        # the reference only adds the "changes from" columns, so a missing one costs those, not the report
        if name == reference and name not in (contrast or ()) and not os.path.exists(resolve_path(path)):
            notes.append(f"no reference model ({path} not found): no {model_label(name)} column and no changes "
                         f"from it")
            reference = None
            continue
        try:
            model, payload = load_model(path, device)
            models[name] = (model, load_tokenizer(payload), payload)
        except CheckpointError as e:
            raise SystemExit(f"kat_eval_diversity: --models {name}={path}: {e}")
    return models, reference, notes


def training_prompt_ids(models):
    """Prompt ids of the pairs any compared model trained on (its saved --pairs_path, when it exists)."""
    ids = set()
    for _, _, payload in models.values():
        path = (payload.get("flags") or {}).get("pairs_path")
        if path and os.path.exists(path):
            ids.update(row["prompt_id"] for row in read_pairs(path)[0])
    return ids


def select_prompts(args, models):
    """The first --num_prompts held-out prompts that no compared model trained on and that fit every model's context."""
    rows, log = read_pairs(args.prompts_path, "--prompts_path")
    notes = [log.note(args.prompts_path)] if log.total() else []
    prompts, _ = extract_prompts(rows)
    trained = training_prompt_ids(models)
    chosen, seen_in_training, too_long = [], 0, 0
    for p in prompts:
        if len(chosen) == args.num_prompts:
            break
        if p["id"] in trained:
            seen_in_training += 1
        # generating past the trained context would measure extrapolation, not the model
        elif all(len(tok.render_for_completion(p["messages"])) + args.max_new_tokens <= model.config.sequence_len
                 for model, tok, _ in models.values()):
            chosen.append(p)
        else:
            too_long += 1
    if seen_in_training:
        notes.append(f"{seen_in_training} prompts skipped: a compared model trained on them (its --pairs_path)")
    if too_long:
        notes.append(f"{too_long} prompts skipped: their render + {args.max_new_tokens} new tokens exceeds a model's "
                     f"context")
    if len(chosen) < args.num_prompts:
        notes.append(f"only {len(chosen)} usable prompts in {args.prompts_path} (asked for {args.num_prompts})")
    if not chosen:
        raise SystemExit(f"kat_eval_diversity: no usable prompts in {args.prompts_path}")
    return chosen, notes


def prompt_densities(args, prompts, models, reference):
    """(densities (N,) or None, note): from --density_path when it covers the prompts, else computed here."""
    if args.density_path and os.path.exists(args.density_path):
        known = read_densities(args.density_path)
        if all(p["id"] in known for p in prompts):
            return np.array([known[p["id"]] for p in prompts]), f"densities read from {args.density_path}"
        note = f"{args.density_path} does not cover the evaluated prompts; densities computed among them instead. "
    else:
        note = ""
    if len(prompts) < NUM_QUANTILES:
        return None, note + f"{len(prompts)} prompts: too few for density quartiles"
    model, tok, payload = models[reference or next(iter(models))]
    k = min(args.density_k, len(prompts) - 1)
    result = compute_density(model, tok, prompts, k=k)
    return result["density"].numpy(), note + (f"densities among the {len(prompts)} evaluated prompts, k={k}, "
                                              f"embedded by {payload['path']}")


def quartiles(density):
    """0 (sparsest) .. NUM_QUANTILES - 1 (densest) per prompt, by the quantiles of the densities."""
    edges = np.quantile(density, np.arange(1, NUM_QUANTILES) / NUM_QUANTILES)
    return np.searchsorted(edges, density, side="right")


def world_for(args, models):
    """
    (world, seed, size, note): the synthetic world the compared models learnt, as their checkpoints record it, unless
    --world_seed / --synthetic_size say otherwise. Models that record different worlds are refused: one world's gold
    scores would misjudge the others.
    """
    recorded = {name: payload["world"] for name, (_, _, payload) in models.items()}
    first = next(iter(recorded))
    for name, world in recorded.items():
        if world != recorded[first]:
            raise SystemExit(f"kat_eval_diversity: {first} ({models[first][2]['path']}) learnt the synthetic world "
                             f"{recorded[first]}, {name} ({models[name][2]['path']}) the world {world}; compare "
                             f"models of one world")
    world = recorded[first] or {"seed": 0, "size": 1}
    seed = args.world_seed if args.world_seed is not None else world["seed"]
    size = args.synthetic_size or world["size"]
    note = "" if recorded[first] else " (the checkpoints record no synthetic world)"
    return make_world(seed=seed, size=size), seed, size, note


def gold_scores(world, prompts, responses, k):
    """{"gold_score", "gold_correct"}: (N, k) arrays, nan rows for prompts the world does not know; and the count."""
    out = {"gold_score": np.full((len(prompts), k), np.nan), "gold_correct": np.full((len(prompts), k), np.nan)}
    known = 0
    for i, p in enumerate(prompts):
        try:
            world.lookup(p["messages"])
        except KeyError:
            continue
        known += 1
        for j, text in enumerate(responses[i]):
            g = world.gold_score(p["messages"], text)
            out["gold_score"][i, j], out["gold_correct"][i, j] = g["score"], g["correct"]
    return out, known


def json_ready(obj):
    """nan and inf as null (JSON has no NaN), numpy numbers as Python ones, recursively."""
    if isinstance(obj, dict):
        return {key: json_ready(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(value) for value in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=str, action="append", default=None, metavar="NAME=PATH,...",
                        help=f"the compared models, in column order; repeatable (default: {DEFAULT_MODELS})")
    parser.add_argument("--reference", type=str, default=None, metavar="NAME",
                        help="every other model minus it (default: sft when named, else none; empty: none)")
    parser.add_argument("--contrast", type=str, default=None, metavar="A,B",
                        help="the headline difference A - B (default: density,baseline when both are named, else "
                             "none; empty: none)")
    parser.add_argument("--rm_ckpt_path", type=str, default="outs/rm/ckpt.pt",
                        help="reward model for the reward metric; skipped when missing or empty")
    parser.add_argument("--prompts_path", type=str, default=".cache/data/pairs_test.jsonl",
                        help="held-out pairs; their distinct conversations are the prompts")
    parser.add_argument("--output_report", type=str, default=".cache/diversity_report.md")
    parser.add_argument("--num_prompts", type=int, default=100)
    parser.add_argument("--samples_per_prompt", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32, help="prompts generated together")
    parser.add_argument("--density_path", type=str, default=None,
                        help="density.jsonl with the prompts' densities (used when it covers them all)")
    parser.add_argument("--density_k", type=int, default=10)
    parser.add_argument("--world_seed", type=int, default=None, help="default: the checkpoints' recorded world")
    parser.add_argument("--synthetic_size", type=int, default=None, help="default: the checkpoints' recorded world")
    parser.add_argument("--headline_metric", type=str, default="artifact_rate",
                        choices=[key for key, _, d, _ in METRICS if d], help="the metric of the rare-vs-dense answer")
    parser.add_argument("--num_resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--num_examples", type=int, default=4, help="prompts whose responses the report shows")
    parser.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    parser.add_argument("--device", type=str, default=None, help="cuda | mps | cpu (default: autodetect)")
    args = parse_flags(parser, argv)
    if args.samples_per_prompt < 1 or args.num_prompts < 1:
        raise SystemExit("kat_eval_diversity: --num_prompts and --samples_per_prompt must be >= 1")
    args.models = args.models or [DEFAULT_MODELS]
    paths = parse_models(parser, args.models)
    reference, contrast = parse_roles(parser, args, list(paths))

    notes = []
    if reference is None:
        notes.append("no reference model (--reference): no changes from a reference")
    if contrast is None:
        notes.append("no contrast (--contrast A,B): no headline difference between two models and no rare-vs-dense "
                     "answer")

    device = autodetect_device(args.device)
    timings = {}
    models, reference, load_notes = load_models(paths, reference, contrast, device)
    prompts, prompt_notes = select_prompts(args, models)
    notes += load_notes + prompt_notes
    world = world_seed = world_size = None
    if any(p["src"] == "synthetic" for p in prompts):  # before sampling, so models of two worlds are refused early
        world, world_seed, world_size, world_note = world_for(args, models)
    density, density_note = prompt_densities(args, prompts, models, reference)
    notes.append(density_note)
    quantile = quartiles(density) if density is not None else None
    print0(f"{len(prompts)} prompts x {args.samples_per_prompt} samples, models: "
           + ", ".join(f"{name} {payload['path']}" for name, (_, _, payload) in models.items()))

    k = args.samples_per_prompt
    responses, scores = {}, {name: {} for name in models}
    for name, (model, tok, _) in models.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            flat = generate_responses(model, tok, [p["messages"] for p in prompts], args.max_new_tokens,
                                      args.batch_size, args.temperature, args.seed, k, args.top_k)
        responses[name] = [flat[i * k:(i + 1) * k] for i in range(len(prompts))]
        timings[f"generate_{name}_seconds"] = time.perf_counter() - t0
        print0(f"{name}: {len(flat)} responses in {timings[f'generate_{name}_seconds']:.1f}s")

    if args.rm_ckpt_path and os.path.exists(args.rm_ckpt_path):
        t0 = time.perf_counter()
        try:
            rm, rm_payload = load_reward_model(args.rm_ckpt_path, device)
            rm_tok = load_tokenizer(rm_payload)
        except CheckpointError as e:
            raise SystemExit(f"kat_eval_diversity: --rm_ckpt_path: {e}")
        max_len = rm_payload.get("extra", {}).get("max_len") or rm.config.sequence_len
        for name in models:
            pairs = [(p["messages"], text) for p, texts in zip(prompts, responses[name]) for text in texts]
            scores[name]["reward"] = score(rm, rm_tok, pairs, args.batch_size, max_len).numpy().reshape(-1, k)
        timings["reward_seconds"] = time.perf_counter() - t0
        notes.append(f"reward: {rm_payload['path']} (step {rm_payload.get('step')})")
    else:
        notes.append(f"no reward model ({args.rm_ckpt_path!r} not found): the reward metric is skipped")

    if world is not None:
        for name in models:
            gold, known = gold_scores(world, prompts, responses[name], k)
            scores[name].update(gold)
        notes.append(f"gold: synthetic world seed {world_seed}, size {world_size}{world_note}; {known} of "
                     f"{len(prompts)} prompts are its questions")
        if not known:
            notes.append("no prompt is a question of this world: pass --world_seed / --synthetic_size of the data")
    else:
        notes.append("no synthetic-world prompts: no gold score")

    headline = args.headline_metric
    if headline in ("reward", "gold_score", "gold_correct") and not all(headline in s for s in scores.values()):
        notes.append(f"--headline_metric={headline} is not measured here; the answer uses artifact_rate")
        headline = "artifact_rate"
    t0 = time.perf_counter()
    results = collect_metrics(responses, scores, quantile, NUM_QUANTILES, args.num_resamples, args.seed,
                              headline=headline, reference=reference, contrast=contrast)
    timings["metrics_seconds"] = time.perf_counter() - t0

    examples = []
    names = [n for n in results["subsets"] if n != "all"]
    if names:
        rare, dense = names[0], names[-1]  # subset names are "q1".."q4"
        picks = ([(i, rare) for i in np.flatnonzero(quantile == int(rare[1:]) - 1)[:(args.num_examples + 1) // 2]]
                 + [(i, dense) for i in np.flatnonzero(quantile == int(dense[1:]) - 1)[:args.num_examples // 2]])
    else:
        picks = [(i, "all") for i in range(min(args.num_examples, len(prompts)))]
    for i, subset in picks:
        examples.append({"prompt": prompts[i]["prompt"], "subset": results["subsets"][subset]["label"],
                         "responses": {name: responses[name][i][0] for name in models}})

    command = "python -m scripts.kat_eval_diversity " + " ".join(shlex.quote(a) for a in
                                                                  (sys.argv[1:] if argv is None else argv))
    header = "\n".join([f"_written {time.strftime('%Y-%m-%d %H:%M:%S')} by `{command.strip()}`_", "",
                        "| model | checkpoint | step |", "|---|---|---|"]
                       + [f"| {model_label(name)} | `{payload['path']}` | {payload.get('step')} |"
                          for name, (_, _, payload) in models.items()]
                       + ["", f"Prompts: `{args.prompts_path}`; sampling: temperature {args.temperature}, top_k "
                              f"{args.top_k}, max_new_tokens {args.max_new_tokens}, seed {args.seed}."])
    stem = os.path.splitext(args.output_report)[0]
    charts = write_charts(results, stem)
    report = render_report(results, header, examples, notes)
    report += "\n## Charts\n\n" + "\n".join(f"![{os.path.basename(c)}]({os.path.basename(c)})" for c in charts) + "\n"
    atomic_write(args.output_report, report)
    atomic_write_json(stem + ".json", json_ready({
        **results, "flags": vars(args), "notes": notes, "timings": timings,
        "checkpoints": {name: {"path": payload["path"], "step": payload.get("step")}
                        for name, (_, _, payload) in models.items()},
        "world": {"seed": world_seed, "size": world_size},
        "prompts": [{"id": p["id"], "prompt": p["prompt"], "src": p["src"],
                     "density": None if density is None else float(density[i]),
                     "quantile": None if quantile is None else f"q{quantile[i] + 1}"} for i, p in enumerate(prompts)],
        "responses": responses,
        "scores": {name: {key: v.tolist() for key, v in s.items()}
                   for name, s in scores.items()}}))
    print0("\n".join(f"note: {note}" for note in notes))
    if results["rare_vs_dense"] is not None and results["rare_vs_dense"]["answer"] is not None:
        print0("\n" + results["rare_vs_dense"]["answer"])
    print0(f"\nwrote {args.output_report} and {stem}.json; metrics took {timings['metrics_seconds']:.1f}s")
    print0(f"charts: {', '.join(charts)}")


if __name__ == "__main__":
    run_script(main)
