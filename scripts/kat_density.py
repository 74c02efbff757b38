"""
RLHF stage 3: density weights of the training prompts, the one source of weights for density-aware sampling in RM,
DPO and GRPO, and the training-distribution density of every held-out prompt, for the reports' "rare prompts".

    python -m scripts.kat_density                                  # .cache/data/prompts_all.jsonl, model outs/sft
    python -m scripts.kat_density --density_alpha=0.5 --density_max_ratio=20 --density_mix=0.1
    python -m scripts.kat_density --sft_ckpt_path=outs/base --prompts_path=my_prompts.jsonl \
        --density_path=my_density.jsonl --test_density_path=my_density_test.jsonl

Embeds every prompt with --sft_ckpt_path (mean-pooled final hidden states, cached under --cache_dir), finds its
--density_k nearest neighbours by cosine distance, and writes --density_path atomically, one row per prompt in
prompt order:
    {"prompt_id", "density", "weight", "knn_mean_distance", "quartile"}
density = 1 / (mean kNN distance + 1e-4); weight is proportional to density^-alpha, capped at
--density_max_ratio x the median (0 disables the cap), mixed with uniform (--density_mix), mean 1 over all prompts;
quartile is "q1" (sparsest) .. "q4" (densest) among the training prompts. Beside it, density.meta.json records the
model's weight fingerprint and the flags, so GRPO can refuse weights built from another SFT model.

The distinct conversations of --test_pairs_path (held out) are embedded by the same model and each gets the density
of its --density_k nearest TRAINING prompts and its quartile by the training quartile edges, written to
--test_density_path: {"prompt_id", "density", "knn_mean_distance", "quartile"}. A missing test file is a note.

The summary (weight histogram, effective sample size, densest and sparsest prompts, and the mean weight per
cluster when the synthetic pairs name clusters) goes to stdout and --report_dir/report.md.

The blocked kNN's time and peak memory beside a brute-force N x N similarity matrix:
python -m scripts.bench --only=density.
"""

import argparse
import json
import os
import time

import torch

from nanochat.checkpoint import load_model, load_tokenizer
from nanochat.common import InputError, atomic_path, atomic_write_json, autodetect_device, parse_flags
from nanochat.data import jsonl_rows
from nanochat.density import (DENSITY_EPS, compute_density, densities, density_quartiles, embed_token_ids, knn_to,
                              meta_path, model_fingerprint, quartile_edges, render_prompts, weight_histogram)
from nanochat.pairs import extract_prompts, prompt_set_id, prompt_set_mismatch, read_pairs
from nanochat.report import write_report


def read_prompts(path):
    """
    The prompt rows of a prompts_all.jsonl; a bad line stops the stage with its line and field, and so do a
    stats.txt or prompt_id_map.tsv beside it that belong to another prompt set (an interrupted kat_make_prompts).
    """
    writer = "python -m scripts.kat_make_prompts"
    if not os.path.exists(path):
        raise SystemExit(f"kat_density: {path} not found; write it with {writer}")
    prompts, first_line = [], {}
    try:
        for lineno, row in jsonl_rows(path):
            where = f"kat_density: {path} line {lineno}"
            if not isinstance(row.get("id"), str):
                raise SystemExit(f"{where}: field 'id' must be a string")
            if not isinstance(row.get("messages"), list) or not row["messages"]:
                raise SystemExit(f"{where}: field 'messages' must be a non-empty list")
            if row["id"] in first_line:
                raise SystemExit(f"{where}: id {row['id']} already on line {first_line[row['id']]}")
            first_line[row["id"]] = lineno
            prompts.append(row)
    except InputError as e:  # jsonl_rows: a line that is not UTF-8, not JSON or not an object
        raise SystemExit(f"kat_density: {e}") from None
    if not prompts:
        raise SystemExit(f"kat_density: {path} has no prompts; write it again with {writer}")
    mismatch = prompt_set_mismatch(path, [p["id"] for p in prompts])
    if mismatch:
        raise SystemExit(f"kat_density: the prompt files disagree: {mismatch} (kat_make_prompts was interrupted "
                         f"while replacing them?); write them again with {writer}")
    return prompts


def prompt_clusters(prompts, pairs_path):
    """
    {prompt id: cluster} from the prompts themselves or, for synthetic prompts, from the pairs rows, which carry
    the cluster; real sources have none, so a big real pairs file is never read. Returns (clusters, unreadable
    pairs lines).
    """
    clusters = {p["id"]: p["cluster"] for p in prompts if "cluster" in p}
    if not any(p.get("src") == "synthetic" for p in prompts) or not os.path.exists(pairs_path):
        return clusters, 0
    unreadable = 0
    with open(pairs_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                unreadable += 1
                continue
            if isinstance(row, dict) and "cluster" in row and "prompt_id" in row:
                clusters.setdefault(row["prompt_id"], row["cluster"])
    return clusters, unreadable


def _snippet(text, width=90):
    """One markdown table cell: one line, pipes escaped, cut to width."""
    text = " ".join(text.split())
    text = text if len(text) <= width else text[:width - 3] + "..."
    return text.replace("|", "\\|")


def summary_markdown(prompts, result, clusters, n_shown=5):
    density, weight, n = result["density"], result["weight"], len(prompts)
    parts = ["### Weight histogram\n", "```", weight_histogram(weight), "```\n"]
    order = torch.argsort(density, descending=True).tolist()
    for title, rows in (("Densest prompts", order[:n_shown]), ("Sparsest prompts", order[::-1][:n_shown])):
        parts += [f"### {title}\n", "| density | weight | id | prompt |", "|---|---|---|---|"]
        parts += [f"| {density[i]:.4g} | {weight[i]:.4g} | {prompts[i]['id']} | "
                  f"{_snippet(prompts[i].get('prompt') or prompts[i]['messages'][-1]['content'])} |"
                  for i in rows]
        parts.append("")
    if clusters:
        per = {}
        for i, p in enumerate(prompts):
            per.setdefault(clusters.get(p["id"], "(none)"), []).append(weight[i].item())
        parts += ["### Weight per cluster\n",
                  "share of prompts vs share of the sampling mass: density weighting moves mass to sparse clusters\n",
                  "| cluster | prompts | mean weight | share of prompts | share of mass |", "|---|---|---|---|---|"]
        for name, ws in sorted(per.items(), key=lambda item: -len(item[1])):
            parts.append(f"| {name} | {len(ws)} | {sum(ws) / len(ws):.4g} | {len(ws) / n:.2%} | {sum(ws) / n:.2%} |")
        parts.append("")
    return "\n".join(parts)


def write_rows(path, rows):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def heldout_densities(args, model, tok, prompts, result, edges):
    """
    Write --test_density_path: each held-out prompt's density among the TRAINING prompts (its k nearest of them,
    same embedding) and its training quartile. Returns a line for the report.
    """
    if not os.path.exists(args.test_pairs_path):
        return f"No held-out densities: {args.test_pairs_path} not found."
    try:
        test_prompts, _ = extract_prompts(read_pairs(args.test_pairs_path, "--test_pairs_path")[0])
    except InputError as e:
        raise SystemExit(f"kat_density: {e}") from None
    rendered = render_prompts(tok, [p["messages"] for p in test_prompts], args.max_len)
    embeddings = embed_token_ids(model, rendered, args.batch_size)
    distances, _ = knn_to(embeddings, result["embeddings"], result["k"], args.block_size)
    mean_distance = distances.double().mean(1)
    density = densities(mean_distance)
    quartiles = density_quartiles(density, edges)
    write_rows(args.test_density_path, [{"prompt_id": p["id"], "density": density[i].item(),
                                         "knn_mean_distance": mean_distance[i].item(), "quartile": quartiles[i]}
                                        for i, p in enumerate(test_prompts)])
    shares = ", ".join(f"{q} {quartiles.count(q) / len(quartiles):.0%}" for q in ("q1", "q2", "q3", "q4"))
    return (f"{len(test_prompts)} held-out prompts of {args.test_pairs_path}: training-density quartiles {shares}; "
            f"wrote {args.test_density_path}")


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts_path", type=str, default=".cache/data/prompts_all.jsonl")
    parser.add_argument("--pairs_path", type=str, default=".cache/data/pairs_all.jsonl",
                        help="read only for the clusters of synthetic prompts (report only)")
    parser.add_argument("--sft_ckpt_path", type=str, default="outs/sft", help="checkpoint whose hidden states embed")
    parser.add_argument("--density_k", type=int, default=10, help="neighbours per prompt")
    parser.add_argument("--density_alpha", type=float, default=1.0, help="weight ~ density^-alpha; 0 is uniform")
    parser.add_argument("--density_max_ratio", type=float, default=10.0,
                        help="cap weights at this multiple of the median; 0 disables")
    parser.add_argument("--density_mix", type=float, default=0.0, help="share of uniform mixed into the weights")
    parser.add_argument("--batch_size", type=int, default=64, help="prompts per embedding forward")
    parser.add_argument("--max_len", type=int, default=256, help="keep the last max_len tokens of each prompt")
    parser.add_argument("--block_size", type=int, default=2048, help="kNN tile side: memory ~ block_size^2 floats")
    parser.add_argument("--cache_dir", type=str, default=".cache/data", help="where embeddings are cached")
    parser.add_argument("--density_path", type=str, default=".cache/data/density.jsonl", help="where to write")
    parser.add_argument("--test_pairs_path", type=str, default=".cache/data/pairs_test.jsonl",
                        help="held-out pairs whose prompts get a training-distribution density")
    parser.add_argument("--test_density_path", type=str, default=".cache/data/density_test.jsonl",
                        help="where the held-out prompts' densities go")
    parser.add_argument("--report_dir", type=str, default="outs/density")
    parser.add_argument("--device", type=str, default=None, help="cuda | mps | cpu (default: autodetect)")
    args = parse_flags(parser, argv)

    t0 = time.time()
    prompts = read_prompts(args.prompts_path)
    device = autodetect_device(args.device)
    model, payload = load_model(args.sft_ckpt_path, device)
    tok = load_tokenizer(payload)
    max_ratio = args.density_max_ratio if args.density_max_ratio > 0 else None
    try:
        result = compute_density(model, tok, prompts, k=args.density_k, alpha=args.density_alpha,
                                 max_ratio=max_ratio, mix=args.density_mix, cache_dir=args.cache_dir,
                                 batch_size=args.batch_size, max_len=args.max_len, block_size=args.block_size)
    except ValueError as e:
        raise SystemExit(f"kat_density: {args.prompts_path}: {e}") from None

    edges = quartile_edges(result["density"])
    quartiles = density_quartiles(result["density"], edges)
    write_rows(args.density_path, [{"prompt_id": p["id"], "density": result["density"][i].item(),
                                    "weight": result["weight"][i].item(),
                                    "knn_mean_distance": result["knn_mean_distance"][i].item(),
                                    "quartile": quartiles[i]} for i, p in enumerate(prompts)])
    atomic_write_json(meta_path(args.density_path), {
        "sft_ckpt_path": payload["path"], "model_fingerprint": model_fingerprint(model),
        "prompts_path": args.prompts_path, "prompt_set": prompt_set_id([p["id"] for p in prompts]),
        "prompts": len(prompts), "k": result["k"], "alpha": args.density_alpha, "max_ratio": max_ratio,
        "mix": args.density_mix, "max_len": args.max_len, "quartile_edges": edges})
    test_note = heldout_densities(args, model, tok, prompts, result, edges)

    stats = result["weight_stats"]
    clusters, unreadable = prompt_clusters(prompts, args.pairs_path)
    notes = summary_markdown(prompts, result, clusters) + "\n" + test_note + "\n"
    if unreadable:
        notes += f"\n{unreadable} lines of {args.pairs_path} were not JSON and gave no cluster.\n"
    metrics = {"prompts": len(prompts), "k": result["k"], **stats, "density_min": result["density"].min().item(),
               "density_median": result["density"].median().item(), "density_max": result["density"].max().item(),
               "density_eps": DENSITY_EPS, "embedding_cache_hit": result["cache_hit"]}
    timings = {**result["timings"], "total_seconds": time.time() - t0}
    print(notes)
    print(f"{len(prompts)} prompts, k={result['k']}: ESS {stats['ess']:.1f} ({stats['ess_fraction']:.1%} of N), "
          f"weights min {stats['weight_min']:.4g} median {stats['weight_median']:.4g} max {stats['weight_max']:.4g}")
    print(test_note)
    print(f"Wrote {args.density_path} and {meta_path(args.density_path)}")
    write_report(args.report_dir, metrics, timings, vars(args), device, notes)
    return result


if __name__ == "__main__":
    main()
