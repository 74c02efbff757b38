"""
Print AutoDeco's temperature diagnostics (the step_NNNNNNN.json files scripts.kat_train_autodeco writes) readably.

    python -m scripts.kat_pretty_print_temp_diag --path outs/autodeco/temp_diagnostics --num-files 2 --topk 8
    python -m scripts.kat_pretty_print_temp_diag --path outs/autodeco/temp_diagnostics --all
    python -m scripts.kat_pretty_print_temp_diag --path outs/autodeco/temp_diagnostics/step_0000050.json

For each file: the step, the knobs, the token counts and realised easy fraction, the T_req quantiles, then each
example token: its context (the last --max-context-chars characters), the ground truth with its rank and
probability, predicted vs required temperature and the hinge gap (required - predicted: > 0 means min-p at the
predicted temperature cuts the right token), the min-p check, and the top tokens before and after the temperature.
"""

import argparse
import glob
import json
import os

from nanochat.common import InputError, nonnegative_int, parse_flags, positive_int, run_script


def diag_files(path, num_files):
    """The files to print, oldest first: `path` itself, or the latest `num_files` step_*.json in it (None: all)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise InputError(f"--path {path}: no such file or directory")
    files = sorted(glob.glob(os.path.join(path, "step_*.json")))
    if not files:
        raise InputError(f"--path {path}: no step_*.json diagnostics files (training writes them every "
                         f"--temp_diag_steps steps with --temp_diag_enabled true)")
    return files if num_files is None else files[-num_files:]


def _tokens(entries, topk):
    return "  ".join(f"{e['token']!r} {e['prob']:.3f}" for e in entries[:topk])


def _quantiles(q):
    if not q.get("n"):
        return "no tokens"
    parts = [f"{k} {v:.3f}" for k, v in q.items() if k.startswith("p")]
    return f"n {q['n']}, mean {q['mean']:.3f}, " + ", ".join(parts) + f", max {q['max']:.3f}, " \
        f"zero {q['zero_share']:.1%}"


def render(record, path, topk, max_context_chars):
    knobs = ", ".join(f"{k}={v}" for k, v in record["knobs"].items())
    lines = [f"=== {os.path.basename(path)}: step {record['step']} ===", f"knobs: {knobs}",
             f"tokens: {record['selected_tokens']} selected of {record['valid_tokens']} valid (global batch), "
             f"realised easy fraction {record['realised_easy_frac']:.3f}, mean predicted T "
             f"{record['mean_predicted_temperature']:.3f}, temperature loss {record['temp_loss']:.4f}",
             f"T_req over valid tokens ({record['t_req_scope']}): {_quantiles(record['t_req']['valid'])}",
             f"T_req over selected tokens: {_quantiles(record['t_req']['selected'])}"]
    for n, ex in enumerate(record["examples"], 1):
        context = ex["context_text"]
        if len(context) > max_context_chars:
            context = "..." + context[len(context) - max_context_chars:]
        gt, mp = ex["ground_truth"], ex["min_p"]
        verdict = "kept" if mp["satisfied"] else "CUT"
        lines += [f"--- example {n} (row {ex['row']}, position {ex['position']}) ---",
                  f"context: {context!r}",
                  f"ground truth: {gt['token']!r} (id {gt['id']}), rank {gt['rank_unscaled']}, p "
                  f"{gt['prob_unscaled']:.4f} unscaled, {gt['prob_at_predicted_t']:.4f} at the predicted T",
                  f"T predicted {ex['predicted_temperature']:.3f} | required {ex['required_temperature']:.3f} | "
                  f"hinge gap {ex['hinge_gap']:+.3f}",
                  f"min-p {mp['ratio']}: max p {mp['max_prob']:.4f}, threshold {mp['threshold']:.4f} -> ground truth "
                  f"{verdict}",
                  f"top unscaled:      {_tokens(ex['top_unscaled'], topk)}",
                  f"top at predicted T: {_tokens(ex['top_at_predicted_t'], topk)}"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", type=str, default="outs/autodeco/temp_diagnostics",
                        help="a diagnostics file, or a directory of step_*.json files")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--num-files", "--num_files", dest="num_files", type=positive_int, default=1,
                       help="print the latest N files of a directory (default 1)")
    which.add_argument("--all", action="store_true", help="print every file of a directory")
    parser.add_argument("--topk", type=positive_int, default=5,
                        help="top tokens shown per example (at most as many as training recorded)")
    parser.add_argument("--max-context-chars", "--max_context_chars", dest="max_context_chars",
                        type=nonnegative_int, default=300, help="show the last N characters of each context")
    args = parse_flags(parser, argv)
    for path in diag_files(args.path, None if args.all else args.num_files):
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            text = render(record, path, args.topk, args.max_context_chars)
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}: not a temperature diagnostics file ({type(e).__name__}: {e})") from None
        print(text + "\n")


if __name__ == "__main__":
    run_script(main)
