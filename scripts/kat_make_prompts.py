"""
RLHF stage 2: the deduplicated prompts of the training pairs.

    python -m scripts.kat_make_prompts                                   # .cache/data/pairs_all.jsonl -> .cache/data/
    python -m scripts.kat_make_prompts --pairs_path=my_pairs.jsonl --out_dir=my_data

Reads the pairs file line by line (a bad line is skipped and listed with its line number in outs/prompts/report.md)
and writes into --out_dir:
    prompts_all.jsonl   {"id", "prompt", "messages", "src", "n_pairs"} per distinct conversation, in order of first
                        appearance; id is the pairs' prompt_id, a hash of the whole whitespace-normalised
                        conversation, so it is the same on every run and machine
    prompt_id_map.tsv   id <TAB> prompt, with backslash, tab, newline and CR escaped as \\\\ \\t \\n \\r; no header
    stats.txt           "key: value" lines: total_pairs, unique_prompts, prompt_set (the fingerprint below),
                        src_<name> (pairs per source), dropped_total and dropped_<reason>, shorter_wins (the
                        share of pairs whose chosen reply is the shorter, in characters, among those whose replies
                        differ in length: near 0.5 when length tells nothing) and length_ties

The three files describe one prompt set and are committed together: all three are written to temporary files in
--out_dir and synced first, so a full disk or a kill while writing leaves the previous three untouched; then they
are renamed into place, stats.txt, prompt_id_map.tsv and prompts_all.jsonl last. A kill between two renames (a
window of microseconds) is caught by the readers: the prompt set's fingerprint (nanochat.pairs.prompt_set_id, a
hash of the ordered prompt ids) is recorded in stats.txt and recomputed from the ids of the other two files, and
kat_density refuses files whose fingerprints differ (nanochat.pairs.prompt_set_mismatch).
"""

import argparse
import json
import os
import time
from collections import Counter

from nanochat.common import InputError, atomic_path, parse_flags
from nanochat.pairs import (SkipLog, escape_tsv, extract_prompts, iter_pairs, length_order, no_pairs_error,
                            prompts_stats, shorter_wins)
from nanochat.report import write_report


def write_synced(path, lines):
    """Write the strings `lines` to path and sync it to disk, so a full disk shows here, before any rename."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


def count_lengths(rows, lengths):
    """Pass rows through, counting in `lengths` whether each chosen reply is shorter, longer or as long (characters)."""
    for row in rows:
        lengths[length_order(row)] += 1
        yield row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs_path", type=str, default=".cache/data/pairs_all.jsonl")
    parser.add_argument("--out_dir", type=str, default=".cache/data")
    parser.add_argument("--report_dir", type=str, default="outs/prompts")
    args = parse_flags(parser, argv)

    t0 = time.time()
    log = SkipLog()
    try:
        lengths = Counter()  # how often the chosen reply is the shorter: the length leak a reward model could learn
        prompts, per_src = extract_prompts(count_lengths(iter_pairs(args.pairs_path, log, "--pairs_path"), lengths))
        if not prompts:
            raise no_pairs_error(args.pairs_path, log, "--pairs_path")
    except InputError as e:
        raise SystemExit(f"kat_make_prompts: {e}") from None
    stats = prompts_stats(prompts, per_src, log)
    share = shorter_wins(lengths)
    stats.update({"shorter_wins": "n/a" if share is None else round(share, 4), "length_ties": lengths["length_ties"]})

    paths = [os.path.join(args.out_dir, name) for name in ("prompts_all.jsonl", "prompt_id_map.tsv", "stats.txt")]
    # atomic_path renames on leaving its block, innermost first: stats.txt, then the map, then prompts_all.jsonl
    with atomic_path(paths[0]) as prompts_tmp, atomic_path(paths[1]) as map_tmp, atomic_path(paths[2]) as stats_tmp:
        write_synced(stats_tmp, (f"{k}: {v}\n" for k, v in stats.items()))
        write_synced(map_tmp, (f"{p['id']}\t{escape_tsv(p['prompt'])}\n" for p in prompts))
        write_synced(prompts_tmp, (json.dumps(p, ensure_ascii=False) + "\n" for p in prompts))
    seconds = time.time() - t0

    if log.counts:
        print(f"{log.note(args.pairs_path)} (all places in {args.report_dir}/report.md)")
    print(f"Wrote {paths[0]}, {paths[1]}, and {paths[2]}")
    write_report(args.report_dir, stats, {"seconds": seconds}, vars(args),
                 notes=log.markdown(f"Skipped lines of {args.pairs_path}"))


if __name__ == "__main__":
    main()
