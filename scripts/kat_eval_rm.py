"""
Evaluate a reward model on preference pairs: accuracy (margin > 0; a tie counts 0, as TRL) and mean margin
r_chosen - r_rejected, overall and by source, by synthetic cluster and rejected kind, by length, and by quartile of
the prompt's density. Length control: accuracy on the pairs whose chosen reply is shorter (in characters) than the
rejected one, on those where it is longer, and their mean, the length-balanced accuracy (a reward that only prefers
short replies scores ~1, ~0 and 0.5); pairs of equal length are counted apart.

    python -m scripts.kat_eval_rm                                   # outs/rm on .cache/data/pairs_test.jsonl
    python -m scripts.kat_eval_rm --rm_ckpt_path outs/rm/ckpt.pt --pairs_path .cache/data/pairs_test.jsonl \
        --density_path .cache/data/density.jsonl
    python -m scripts.kat_eval_rm --pairs_path .cache/data/pairs_all.jsonl --split=val   # the RM's validation split
    torchrun --standalone --nproc_per_node=2 -m scripts.kat_eval_rm -- --out_dir=outs/rm_eval

Density quartiles need the prompts' densities: density.jsonl (scripts.kat_density) covers the prompts of
pairs_all.jsonl only, so on pairs_test.jsonl the table says how many pairs it covers (none, normally); --split=val
evaluates the validation split the RM held out of pairs_all (same --val_share and --seed as its training run,
read from the checkpoint), where every prompt has a density.

Prints the table and writes --out_dir (default outs/rm_eval): results.json and report.md.
"""

import argparse
import os

from nanochat.checkpoint import CheckpointError, load_tokenizer
from nanochat.common import atomic_write_json, dist_cleanup, dist_init, is_master, parse_flags, print0, run_script
from nanochat.density import read_densities
from nanochat.pairs import read_pairs
from nanochat.preference import split_by_prompt
from nanochat.report import write_report
from nanochat.rm import flat_metrics, load_reward_model, metrics_table, pair_margins, preference_metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rm_ckpt_path", type=str, default="outs/rm/ckpt.pt")
    parser.add_argument("--pairs_path", type=str, default=".cache/data/pairs_test.jsonl")
    parser.add_argument("--split", type=str, default="all", choices=["all", "val"],
                        help="all rows of the file, or only the RM's validation split of them")
    parser.add_argument("--density_path", type=str, default=".cache/data/density.jsonl",
                        help="prompt densities for the quartile table (skipped when the file is missing)")
    parser.add_argument("--max_len", type=int, default=0, help="0: the length the RM was trained with")
    parser.add_argument("--batch_size", type=int, default=64, help="rows per forward")
    parser.add_argument("--out_dir", type=str, default="outs/rm_eval")
    parser.add_argument("--device", type=str, default=None, help="cuda | mps | cpu (default: autodetect)")
    args = parse_flags(parser, argv)

    rank, world_size, device = dist_init(args.device)
    try:
        rm, payload = load_reward_model(args.rm_ckpt_path, device)
        tok = load_tokenizer(payload)
    except CheckpointError as e:
        raise SystemExit(f"kat_eval_rm: {e}")
    trained = payload.get("flags") or {}
    max_len = args.max_len or payload.get("extra", {}).get("max_len") or rm.config.sequence_len
    rows, log = read_pairs(args.pairs_path, "--pairs_path")
    if log.total():
        print0(log.note(args.pairs_path))
    if args.split == "val":
        rows = split_by_prompt(rows, trained.get("val_share", 0.05), trained.get("seed", 42))[1]
    if not rows:
        raise SystemExit(f"kat_eval_rm: no pairs to evaluate in {args.pairs_path} (split {args.split})")
    densities = None
    if os.path.exists(args.density_path):
        densities = read_densities(args.density_path)
    else:
        print0(f"note: {args.density_path} not found; no density quartiles")

    print0(f"reward model {payload['path']} (step {payload.get('step')}) on {len(rows)} pairs of {args.pairs_path} "
           f"(split {args.split}), max_len {max_len}, {device} x {world_size}")
    margins = pair_margins(rm, tok, rows, args.batch_size, max_len)
    metrics = preference_metrics(margins, rows, densities)
    table = metrics_table(metrics)
    print0("\n" + table)
    if is_master():
        atomic_write_json(os.path.join(args.out_dir, "results.json"), {
            "checkpoint": payload["path"], "step": payload.get("step"), "pairs_path": args.pairs_path,
            "split": args.split, "max_len": max_len, "flags": vars(args), "metrics": metrics})
        notes = f"Reward model `{payload['path']}` on `{args.pairs_path}` (split {args.split}):\n\n```\n{table}\n```"
        write_report(args.out_dir, flat_metrics(metrics, "pairs"), {}, vars(args), device, notes=notes)
        print0(f"\nwrote {os.path.join(args.out_dir, 'results.json')} and {os.path.join(args.out_dir, 'report.md')}")
    dist_cleanup()


if __name__ == "__main__":
    run_script(main)
