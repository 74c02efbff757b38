"""
RLHF stage 2: the deduplicated prompts of the training pairs.

    python -m scripts.kat_make_prompts                                   # .cache/data/pairs_all.jsonl -> .cache/data/
    python -m scripts.kat_make_prompts --pairs=my_pairs.jsonl --out_dir=my_data

Reads the pairs file line by line (a bad line is skipped and listed with its line number in outs/prompts/report.md)
and writes, each atomically, into --out_dir:
    prompts_all.jsonl   {"id", "prompt", "messages", "src", "n_pairs"} per distinct conversation, in order of first
                        appearance; id is the pairs' prompt_id, a hash of the whole whitespace-normalised
                        conversation, so it is the same on every run and machine
    prompt_id_map.tsv   id <TAB> prompt, with backslash, tab, newline and CR escaped as \\\\ \\t \\n \\r; no header
    stats.txt           "key: value" lines: total_pairs, unique_prompts, src_<name> (pairs per source),
                        dropped_total and dropped_<reason>
prompts_all.jsonl is written last, so when it exists the other two are complete.
"""

import argparse
import json
import os
import time

from nanochat.common import atomic_path, atomic_write, parse_flags
from nanochat.pairs import SkipLog, escape_tsv, extract_prompts, iter_pairs, prompts_stats
from nanochat.report import write_report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=str, default=".cache/data/pairs_all.jsonl")
    parser.add_argument("--out_dir", type=str, default=".cache/data")
    parser.add_argument("--report_dir", type=str, default="outs/prompts")
    args = parse_flags(parser, argv)

    t0 = time.time()
    log = SkipLog()
    try:
        prompts, per_src = extract_prompts(iter_pairs(args.pairs, log))
    except FileNotFoundError:
        raise SystemExit(f"kat_make_prompts: {args.pairs} not found; write it with python -m "
                         f"scripts.kat_download_pairs") from None
    if not prompts:
        raise SystemExit(f"kat_make_prompts: {args.pairs} has no usable pair ({log.summary()}); first problems: "
                         + "; ".join(p for places in log.places.values() for p in places[:1]))
    stats = prompts_stats(prompts, per_src, log)

    paths = [os.path.join(args.out_dir, name) for name in ("prompts_all.jsonl", "prompt_id_map.tsv", "stats.txt")]
    atomic_write(paths[2], "".join(f"{k}: {v}\n" for k, v in stats.items()))
    atomic_write(paths[1], "".join(f"{p['id']}\t{escape_tsv(p['prompt'])}\n" for p in prompts))
    with atomic_path(paths[0]) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts)
    seconds = time.time() - t0

    if log.counts:
        print(f"Skipped {log.total()} lines of {args.pairs}: {log.summary()} (places in {args.report_dir}/report.md)")
    print(f"Wrote {paths[0]}, {paths[1]}, and {paths[2]}")
    write_report(args.report_dir, stats, {"seconds": seconds}, vars(args),
                 notes=log.markdown(f"Skipped lines of {args.pairs}"))


if __name__ == "__main__":
    main()
