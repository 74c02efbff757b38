"""
RLHF stage: the diversity / mode-collapse report. Samples any named set of models on held-out prompts and compares
them with nanochat/diversity.py: each against a reference model, and one contrast pair against each other. By
default the density-aware GRPO arm and the uniform-sampling GRPO arm (every training seed of each), against the SFT
model. The report opens with the pre-registered primary outcome; everything after it is exploratory.

    python -m scripts.kat_eval_diversity                    # sft=outs/sft, density=outs/grpo_density_s*, baseline=...
    python -m scripts.kat_eval_diversity --num_prompts=200 --samples_per_prompt=8 --temperature=0.7
    python -m scripts.kat_eval_diversity --models=sft=outs/sft,density=outs/dpo_density,baseline=outs/dpo_baseline
    python -m scripts.kat_eval_diversity --models='density=outs/grpo_density_s*,baseline=outs/grpo_baseline_s*' \
        --rm_ckpt_path=                                     # no SFT column, no reward
    python -m scripts.kat_eval_diversity --models=sft=outs/sft --models=grpo=outs/grpo_density_s0,dpo=outs/dpo_density \
        --contrast=dpo,grpo                                 # any names; --models may repeat
    python -m scripts.kat_eval_diversity --out_dir=outs/diversity_t07 --temperature=0.7

Models: --models NAME=PATH,... (repeatable), NAME an identifier, the label of the model's column (sft, density and
baseline get nicer ones). PATH may be a glob (quote it from the shell): every directory or .pt file it matches, in
sorted order, is one training run of that arm, and its seed is its checkpoint's flags["seed"] (an arm's runs need
distinct seeds); a pattern matching nothing is an error naming it. A model's value is the mean over its runs.
--reference NAME: every other model minus it ("changes from the reference"); default sft when it is named, else
none. --contrast A,B: the difference A − B of the primary outcome; default density,baseline when both are named, else
none (a note says so). An empty --reference= or --contrast= turns it off. A reference outside the contrast whose
(plain, not glob) checkpoint does not exist is left out with a note (as a missing SFT model always was); every
other model must load.

Primary outcome (pre-registered): --primary_metric (default artifact_rate, the planted-artifact rate) on the sparsest
training-density quartile q1, contrast A − B, inferred across training seeds: the per-seed effects (runs paired by
seed when both arms have the same seeds, else unpaired, Welch), their mean and Student-t 95% CI; beside it the
evaluation CI (paired half-sample bootstrap over prompts), the minimum detectable effects, degenerate flags and the
within-prompt distinct-n of the same contrast on q1 and on all prompts. With one run per arm the CI across seeds is
n/a and the report says its verdict covers evaluation noise only. The sidecar's "primary" holds these numbers.

Prompts: a seeded sample (nanochat.pairs.heldout_sample, --seed, stratified by source) of --num_prompts distinct
conversations of --prompts_path (held-out pairs_test.jsonl by default) among those that no compared model trained
on (checked against the --pairs_path saved in its checkpoint) and whose render plus --max_new_tokens fits every
model's context; the others are skipped and counted. Every run of every model answers each prompt
--samples_per_prompt times at --temperature (sampling exposes mode collapse; greedy would hide it), from the same
--seed, so all runs draw from the same random streams.

Density quartiles: read from --density_path (default .cache/data/density_test.jsonl, written by
scripts.kat_density) when it covers every evaluated prompt: each prompt's kNN density against the TRAINING prompts
and its "quartile" field, its quartile among the training prompts' densities (q1 = sparsest .. q4 = densest), so
"rare" means rare in training. Otherwise (missing, or not covering them) the densities are computed among the
evaluated prompts (1 / mean cosine distance to their --density_k nearest neighbours, see nanochat/density.py,
embedded by the reference model, or the first model's first run when there is none) and the quartiles are theirs;
the report then warns that "rare" means rare among the evaluated prompts.

Training prompt mix: each run directory of the contrast's arms may hold drawn_prompts.json (written by
scripts.kat_train_grpo: {"draws", "distinct_prompts", "by_quartile": {"q1".."q4": count}, "by_cluster": {name:
count}}); the report shows per arm the mean over its runs of the share of draws per training-density quartile and
per cluster, and the distinct prompts drawn. A missing file is a note.

Quality: the reward of --rm_ckpt_path (skipped with a note when missing), and for prompts of the synthetic world
its gold score and correctness. The world is the one the checkpoints record (seed 0, size 1 when they record none),
or --world_seed / --synthetic_size; models that record different worlds are refused before anything is sampled.

Writes into --out_dir: diversity_report.md (markdown: the primary outcome, the runs, notes, the training prompt
mix, then the exploratory summary table, rare-vs-dense section and per-quartile tables, sample responses),
diversity_report.json (every number, the prompts, densities, quartiles and every run's responses), PNG bar charts
diversity_report_summary.png (every metric with a direction) and diversity_report_quantiles.png (the primary
metric per density quartile), and report.md, the stage's section of the run's report (outs/report.md for
outs/diversity): the primary outcome and a link. One process; no torchrun.
"""

import argparse
import glob
import json
import math
import os
import shlex
import sys
import time

import numpy as np
import torch

from nanochat.checkpoint import CheckpointError, load_model, load_tokenizer, resolve_path
from nanochat.common import (InputError, atomic_write, atomic_write_json, autodetect_device, parse_flags, print0,
                             run_script)
from nanochat.density import QUARTILES, compute_density, read_heldout_densities
from nanochat.diversity import METRICS, collect_metrics, model_label, render_report, write_charts
from nanochat.evaluate import generate_responses
from nanochat.pairs import extract_prompts, heldout_sample, read_pairs
from nanochat.rm import load_reward_model, score
from nanochat.report import write_report
from nanochat.synthetic import make_world

NUM_QUANTILES = len(QUARTILES)
DEFAULT_MODELS = "sft=outs/sft,density=outs/grpo_density_s*,baseline=outs/grpo_baseline_s*"
DENSITY_WRITER = "python -m scripts.kat_density"
DRAWN_NAME = "drawn_prompts.json"  # beside a GRPO run's ckpt.pt


def parse_models(parser, specs):
    """{name: path or glob} in order from --models NAME=PATH,... (each occurrence of the flag adds its entries)."""
    paths = {}
    for entry in ",".join(specs).split(","):
        name, _, path = entry.strip().partition("=")
        if not name.isidentifier() or not path:
            parser.error(f"--models: {entry.strip()!r} is not NAME=PATH with NAME an identifier (e.g. dpo_density)")
        if name in paths:
            parser.error(f"--models: {name} is named twice")
        paths[name] = path
    return paths


def expand_runs(paths):
    """{name: [run path, ...]}: a glob stands for every directory or .pt file it matches, sorted; a plain path for
    itself. A glob that matches nothing is an error naming it."""
    runs = {}
    for name, path in paths.items():
        if not glob.has_magic(path):
            runs[name] = [path]
            continue
        runs[name] = sorted(m for m in glob.glob(path) if os.path.isdir(m) or m.endswith(".pt"))
        if not runs[name]:
            raise SystemExit(f"kat_eval_diversity: --models {name}={path}: the pattern matches no run directory or "
                             f"checkpoint")
    return runs


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


def load_models(runs, reference, contrast, device):
    """
    {name: [{"seed", "model", "tok", "payload"} per run, in run order]} in --models order, the reference (None when
    left out) and notes. A run's seed is its checkpoint's flags["seed"]; the runs of an arm need distinct seeds, by
    which they are paired with another arm's.
    """
    models, notes = {}, []
    for name, paths in runs.items():
        # the reference only adds the "changes from" columns, so a missing one costs those, not the report
        if (name == reference and name not in (contrast or ()) and len(paths) == 1
                and not os.path.exists(resolve_path(paths[0]))):
            notes.append(f"no reference model ({paths[0]} not found): no {model_label(name)} column and no changes "
                         f"from it")
            reference = None
            continue
        models[name] = []
        for path in paths:
            try:
                model, payload = load_model(path, device)
                tok = load_tokenizer(payload)
            except CheckpointError as e:
                raise SystemExit(f"kat_eval_diversity: --models {name}={path}: {e}")
            models[name].append({"seed": (payload.get("flags") or {}).get("seed"), "model": model, "tok": tok,
                                 "payload": payload})
        seeds = [run["seed"] for run in models[name]]
        if len(seeds) > 1 and (None in seeds or len(set(seeds)) < len(seeds)):
            raise SystemExit(f"kat_eval_diversity: --models {name}: its runs {', '.join(paths)} record the seeds "
                             f"{seeds}; the runs of an arm need distinct recorded seeds (flags['seed'])")
    return models, reference, notes


def all_runs(models):
    return [(name, run) for name, runs in models.items() for run in runs]


def training_prompt_ids(models):
    """Prompt ids of the pairs any compared run trained on (its saved --pairs_path, when it exists)."""
    paths = {(run["payload"].get("flags") or {}).get("pairs_path") for _, run in all_runs(models)}
    ids = set()
    for path in paths:
        if path and os.path.exists(path):
            ids.update(row["prompt_id"] for row in read_pairs(path)[0])
    return ids


def select_prompts(args, models):
    """
    A seeded sample (heldout_sample, --seed, stratified by source) of --num_prompts held-out prompts among those
    that no compared run trained on and that fit every run's context.
    """
    rows, log = read_pairs(args.prompts_path, "--prompts_path")
    notes = [log.note(args.prompts_path)] if log.total() else []
    prompts, _ = extract_prompts(rows)
    trained = training_prompt_ids(models)
    # runs that share a tokenizer render a prompt alike: render once per tokenizer, against its runs' shortest context
    contexts = {}
    for _, run in all_runs(models):
        key = run["payload"]["tokenizer_fingerprint"]
        tok, limit = contexts.get(key, (run["tok"], math.inf))
        contexts[key] = (tok, min(limit, run["model"].config.sequence_len))
    usable, seen_in_training, too_long = [], 0, 0
    for p in prompts:
        if p["id"] in trained:
            seen_in_training += 1
        # generating past the trained context would measure extrapolation, not the model
        elif all(len(tok.render_for_completion(p["messages"])) + args.max_new_tokens <= limit
                 for tok, limit in contexts.values()):
            usable.append(p)
        else:
            too_long += 1
    if seen_in_training:
        notes.append(f"{seen_in_training} prompts skipped: a compared model trained on them (its --pairs_path)")
    if too_long:
        notes.append(f"{too_long} prompts skipped: their render + {args.max_new_tokens} new tokens exceeds a model's "
                     f"context")
    if not usable:
        raise SystemExit(f"kat_eval_diversity: no usable prompts in {args.prompts_path}")
    if len(usable) < args.num_prompts:
        notes.append(f"only {len(usable)} usable prompts in {args.prompts_path} (asked for {args.num_prompts})")
    chosen = heldout_sample(usable, args.num_prompts, args.seed)
    notes.append(f"{len(chosen)} of the {len(usable)} usable prompts, sampled by source (heldout_sample, seed "
                 f"{args.seed})")
    return chosen, notes


def prompt_densities(args, prompts, models, reference):
    """
    (densities (N,) or None, quartiles (N,) ints 0 = q1 sparsest or None, basis, note). From --density_path when it
    covers every prompt: its densities against the training prompts and its "quartile" field as is (basis
    "training"). Otherwise densities among the evaluated prompts and their quartiles (basis "evaluated"), with a
    warning that "rare" then means rare among the evaluated prompts.
    """
    if args.density_path and os.path.exists(args.density_path):
        known = read_heldout_densities(args.density_path)
        covered = sum(p["id"] in known for p in prompts)
        if covered == len(prompts):
            return (np.array([known[p["id"]][0] for p in prompts]),
                    np.array([QUARTILES.index(known[p["id"]][1]) for p in prompts]), "training",
                    f"densities and quartiles read from {args.density_path}: each prompt's density against the "
                    f"training prompts and its quartile among the training prompts' densities")
        why = f"{args.density_path} covers {covered} of the {len(prompts)} evaluated prompts"
    elif args.density_path:
        why = f"{args.density_path} not found (write it with {DENSITY_WRITER})"
    else:
        why = "no --density_path"
    warning = f"⚠ 'rare' means rare among the evaluated prompts, not in training: {why}; "
    if len(prompts) < NUM_QUANTILES:
        return None, None, None, warning + f"{len(prompts)} prompts are too few for density quartiles"
    run = models[reference or next(iter(models))][0]
    k = min(args.density_k, len(prompts) - 1)
    density = compute_density(run["model"], run["tok"], prompts, k=k)["density"].numpy()
    # quartile edges of the evaluated prompts' own densities: q1 = sparsest .. q4 = densest
    edges = np.quantile(density, np.arange(1, NUM_QUANTILES) / NUM_QUANTILES)
    return (density, np.searchsorted(edges, density, side="right"), "evaluated",
            warning + f"densities among the {len(prompts)} evaluated prompts (k={k}, embedded by "
                      f"{run['payload']['path']}) and quartiles of those")


def read_drawn_prompts(path):
    """A run's drawn_prompts.json, checked: {"draws" > 0, "distinct_prompts", "by_quartile", "by_cluster"} counts."""
    try:
        with open(path, encoding="utf-8") as f:
            drawn = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a JSON file ({e})") from None

    def count(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(drawn, dict) or not count(drawn.get("draws")) or not drawn["draws"]:
        raise InputError(f"{path}: field 'draws' must be a positive integer")
    if not count(drawn.get("distinct_prompts")):
        raise InputError(f"{path}: field 'distinct_prompts' must be an integer >= 0")
    for field, keys in (("by_quartile", QUARTILES), ("by_cluster", None)):
        counts = drawn.get(field)
        if not isinstance(counts, dict) or not all(count(v) and (keys is None or k in keys)
                                                    for k, v in counts.items()):
            raise InputError(f"{path}: field {field!r} must map " + (", ".join(keys) if keys else "cluster names")
                             + " to integers >= 0")
    return drawn


def training_mix(models, contrast):
    """
    {arm: {"runs", "missing" (run directories without drawn_prompts.json), "draws", "distinct_prompts" (means over
    the runs with one), "by_quartile", "by_cluster" ({key: mean share of the draws})}} for the contrast's arms; None
    without a contrast.
    """
    if contrast is None:
        return None
    mix = {}
    for arm in contrast:
        found, missing = [], []
        for run in models[arm]:
            path = os.path.join(os.path.dirname(run["payload"]["path"]), DRAWN_NAME)
            if os.path.exists(path):
                found.append(read_drawn_prompts(path))
            else:
                missing.append(os.path.dirname(path))

        def shares(field):
            keys = sorted({key for drawn in found for key in drawn[field]})
            return {key: float(np.mean([d[field].get(key, 0) / d["draws"] for d in found])) for key in keys}

        mix[arm] = {"runs": len(models[arm]), "missing": missing,
                    "draws": float(np.mean([d["draws"] for d in found])) if found else None,
                    "distinct_prompts": float(np.mean([d["distinct_prompts"] for d in found])) if found else None,
                    "by_quartile": shares("by_quartile"), "by_cluster": shares("by_cluster")}
    return mix


def world_for(args, models):
    """
    (world, seed, size, note): the synthetic world the compared models learnt, as their checkpoints record it, unless
    --world_seed / --synthetic_size say otherwise. Models that record different worlds are refused: one world's gold
    scores would misjudge the others.
    """
    (first, first_run), *others = all_runs(models)
    recorded = first_run["payload"]["world"]
    for name, run in others:
        if run["payload"]["world"] != recorded:
            raise SystemExit(f"kat_eval_diversity: {first} ({first_run['payload']['path']}) learnt the synthetic "
                             f"world {recorded}, {name} ({run['payload']['path']}) the world "
                             f"{run['payload']['world']}; compare models of one world")
    world = recorded or {"seed": 0, "size": 1}
    seed = args.world_seed if args.world_seed is not None else world["seed"]
    size = args.synthetic_size or world["size"]
    note = "" if recorded else " (the checkpoints record no synthetic world)"
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
                        help=f"the compared models, in column order; PATH may be a glob of runs; repeatable "
                             f"(default: {DEFAULT_MODELS})")
    parser.add_argument("--reference", type=str, default=None, metavar="NAME",
                        help="every other model minus it (default: sft when named, else none; empty: none)")
    parser.add_argument("--contrast", type=str, default=None, metavar="A,B",
                        help="the primary outcome's difference A - B (default: density,baseline when both are named, "
                             "else none; empty: none)")
    parser.add_argument("--rm_ckpt_path", type=str, default="outs/rm/ckpt.pt",
                        help="reward model for the reward metric; skipped when missing or empty")
    parser.add_argument("--prompts_path", type=str, default=".cache/data/pairs_test.jsonl",
                        help="held-out pairs; their distinct conversations are the prompts")
    parser.add_argument("--out_dir", type=str, default="outs/diversity",
                        help="diversity_report.md, .json and charts go here, and the stage's report.md")
    parser.add_argument("--num_prompts", type=int, default=100)
    parser.add_argument("--samples_per_prompt", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32, help="prompts generated together")
    parser.add_argument("--density_path", type=str, default=".cache/data/density_test.jsonl",
                        help="the held-out prompts' training densities and quartiles (scripts.kat_density), used "
                             "when it covers them all; empty: compute densities among the evaluated prompts")
    parser.add_argument("--density_k", type=int, default=10, help="neighbours when densities are computed here")
    parser.add_argument("--world_seed", type=int, default=None, help="default: the checkpoints' recorded world")
    parser.add_argument("--synthetic_size", type=int, default=None, help="default: the checkpoints' recorded world")
    parser.add_argument("--primary_metric", type=str, default="artifact_rate",
                        choices=[key for key, _, d, _ in METRICS if d],
                        help="the pre-registered primary outcome's metric (on q1, contrast A - B, across seeds)")
    parser.add_argument("--num_resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--num_examples", type=int, default=4, help="prompts whose responses the report shows")
    parser.add_argument("--seed", type=int, default=0, help="prompt sample, sampling and bootstrap seed")
    parser.add_argument("--device", type=str, default=None, help="cuda | mps | cpu (default: autodetect)")
    args = parse_flags(parser, argv)
    if args.samples_per_prompt < 1 or args.num_prompts < 1:
        raise SystemExit("kat_eval_diversity: --num_prompts and --samples_per_prompt must be >= 1")
    args.models = args.models or [DEFAULT_MODELS]
    paths = parse_models(parser, args.models)
    reference, contrast = parse_roles(parser, args, list(paths))
    has_rm = bool(args.rm_ckpt_path) and os.path.exists(args.rm_ckpt_path)
    # the primary metric is fixed in advance: one that cannot be measured is refused, never swapped for another
    if args.primary_metric == "reward" and not has_rm:
        raise SystemExit(f"kat_eval_diversity: --primary_metric=reward needs the reward model; --rm_ckpt_path "
                         f"{args.rm_ckpt_path!r} is not found")

    notes = []
    if reference is None:
        notes.append("no reference model (--reference): no changes from a reference")
    if contrast is None:
        notes.append("no contrast (--contrast A,B): no primary outcome")

    device = autodetect_device(args.device)
    timings = {}
    models, reference, load_notes = load_models(expand_runs(paths), reference, contrast, device)
    mix = training_mix(models, contrast)  # before sampling, so a broken drawn_prompts.json costs no generation
    prompts, prompt_notes = select_prompts(args, models)
    notes += load_notes + prompt_notes
    world = world_seed = world_size = None
    if any(p["src"] == "synthetic" for p in prompts):  # before sampling, so models of two worlds are refused early
        world, world_seed, world_size, world_note = world_for(args, models)
    elif args.primary_metric in ("gold_score", "gold_correct"):
        raise SystemExit(f"kat_eval_diversity: --primary_metric={args.primary_metric} needs prompts of the synthetic "
                         f"world; none of the chosen prompts is one")
    density, quantile, quantile_basis, density_note = prompt_densities(args, prompts, models, reference)
    notes.append(density_note)
    print0(f"{len(prompts)} prompts x {args.samples_per_prompt} samples, runs: "
           + ", ".join(f"{name} {run['payload']['path']}" for name, run in all_runs(models)))

    k = args.samples_per_prompt
    responses = {name: {} for name in models}
    scores = {name: {run["seed"]: {} for run in runs} for name, runs in models.items()}
    for name, run in all_runs(models):
        t0 = time.perf_counter()
        with torch.no_grad():
            flat = generate_responses(run["model"], run["tok"], [p["messages"] for p in prompts], args.max_new_tokens,
                                      args.batch_size, args.temperature, args.seed, k, args.top_k)
        responses[name][run["seed"]] = [flat[i * k:(i + 1) * k] for i in range(len(prompts))]
        label = f"generate_{name}_seed{run['seed']}_seconds"
        timings[label] = time.perf_counter() - t0
        print0(f"{name} seed {run['seed']}: {len(flat)} responses in {timings[label]:.1f}s")

    if has_rm:
        t0 = time.perf_counter()
        try:
            rm, rm_payload = load_reward_model(args.rm_ckpt_path, device)
            rm_tok = load_tokenizer(rm_payload)
        except CheckpointError as e:
            raise SystemExit(f"kat_eval_diversity: --rm_ckpt_path: {e}")
        max_len = rm_payload.get("extra", {}).get("max_len") or rm.config.sequence_len
        for name, run in all_runs(models):
            texts = responses[name][run["seed"]]
            pairs = [(p["messages"], text) for p, samples in zip(prompts, texts) for text in samples]
            reward = score(rm, rm_tok, pairs, args.batch_size, max_len).numpy()
            scores[name][run["seed"]]["reward"] = reward.reshape(-1, k)
        timings["reward_seconds"] = time.perf_counter() - t0
        notes.append(f"reward: {rm_payload['path']} (step {rm_payload.get('step')})")
    else:
        notes.append(f"no reward model ({args.rm_ckpt_path!r} not found): the reward metric is skipped")

    if world is not None:
        for name, run in all_runs(models):
            gold, known = gold_scores(world, prompts, responses[name][run["seed"]], k)
            scores[name][run["seed"]].update(gold)
        notes.append(f"gold: synthetic world seed {world_seed}, size {world_size}{world_note}; {known} of "
                     f"{len(prompts)} prompts are its questions")
        if not known:
            notes.append("no prompt is a question of this world: pass --world_seed / --synthetic_size of the data")
    else:
        notes.append("no synthetic-world prompts: no gold score")

    t0 = time.perf_counter()
    results = collect_metrics(responses, scores, quantile, NUM_QUANTILES, args.num_resamples, args.seed,
                              primary=args.primary_metric, reference=reference, contrast=contrast,
                              quantile_basis=quantile_basis)
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
                         "responses": {name: responses[name][runs[0]["seed"]][i][0]
                                       for name, runs in models.items()}})

    command = "python -m scripts.kat_eval_diversity " + " ".join(shlex.quote(a) for a in
                                                                  (sys.argv[1:] if argv is None else argv))
    header = "\n".join([f"_written {time.strftime('%Y-%m-%d %H:%M:%S')} by `{command.strip()}`_", "",
                        "| model | seed | checkpoint | step |", "|---|---|---|---|"]
                       + [f"| {model_label(name)} | {run['seed']} | `{run['payload']['path']}` | "
                          f"{run['payload'].get('step')} |" for name, run in all_runs(models)]
                       + ["", f"Prompts: `{args.prompts_path}`; sampling: temperature {args.temperature}, top_k "
                              f"{args.top_k}, max_new_tokens {args.max_new_tokens}, seed {args.seed} (every run)."])
    stem = os.path.join(args.out_dir, "diversity_report")
    charts = write_charts(results, stem)
    report = render_report(results, header, examples, notes, mix)
    report += "\n## Charts\n\n" + "\n".join(f"![{os.path.basename(c)}]({os.path.basename(c)})" for c in charts) + "\n"
    atomic_write(stem + ".md", report)
    atomic_write_json(stem + ".json", json_ready({
        **results, "flags": vars(args), "notes": notes, "timings": timings, "training_mix": mix,
        "checkpoints": {name: [{"seed": run["seed"], "path": run["payload"]["path"], "step": run["payload"].get("step")}
                               for run in runs] for name, runs in models.items()},
        "world": {"seed": world_seed, "size": world_size},
        "prompts": [{"id": p["id"], "prompt": p["prompt"], "src": p["src"],
                     "density": None if density is None else float(density[i]),
                     "quantile": None if quantile is None else QUARTILES[quantile[i]]} for i, p in enumerate(prompts)],
        "responses": responses,
        "scores": {name: {seed: {key: v.tolist() for key, v in s.items()} for seed, s in by_run.items()}
                   for name, by_run in scores.items()}}))
    print0("\n".join(f"note: {note}" for note in notes))
    print0("\nPrimary outcome: " + results["primary"]["answer"])
    # the stage's section in the run's report (outs/report.md): the primary outcome and a link to the whole report
    primary = results["primary"]
    metrics = {"primary_metric": primary["metric"], "primary_subset": primary["subset"],
               "primary_verdict": primary["verdict"], "primary_inference": primary["inference"]}
    if primary["interval"] is not None:
        interval, seeds = primary["interval"], primary["interval"].get("seeds") or {}
        metrics.update({"primary_prompts": primary["n_prompts"], "primary_effect": interval["delta"],
                        "primary_ci_eval": [interval["lo"], interval["hi"]], "primary_mde_eval": interval.get("mde"),
                        "primary_ci_seeds": [seeds.get("lo"), seeds.get("hi")],
                        "primary_mde_seeds": seeds.get("mde")})
    write_report(args.out_dir, json_ready(metrics), timings, vars(args), device,
                 notes=f"**Primary outcome:** {primary['answer']}\n\nThe whole report: [diversity_report.md]"
                       f"(diversity_report.md) (every number in diversity_report.json).")
    print0(f"\nwrote {stem}.md and {stem}.json; metrics took {timings['metrics_seconds']:.1f}s")
    print0(f"charts: {', '.join(charts)}")


if __name__ == "__main__":
    run_script(main)
