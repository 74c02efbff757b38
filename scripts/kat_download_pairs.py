"""
RLHF stage 1: preference pairs from the public sources (and the synthetic world), normalised into one format.

    python -m scripts.kat_download_pairs --only synthetic                 # offline, the cpu profile
    python -m scripts.kat_download_pairs                                  # hh + uf + se from the hub (gpu profile)
    python -m scripts.kat_download_pairs --only hh,uf --max_per_source=20000
    huggingface-cli download Anthropic/hh-rlhf --repo-type dataset --local-dir hub/Anthropic/hh-rlhf  # (each source)
    python -m scripts.kat_download_pairs --from_dir=hub --no-se           # read such local copies, same code path

Sources: hh = Anthropic/hh-rlhf, uf = HuggingFaceH4/ultrafeedback_binarized, se =
HuggingFaceH4/stack-exchange-preferences, synthetic = the world of nanochat/synthetic.py. `--only` takes one or
more names (repeated or comma-separated); the default is the three hub sources.

`--seed` (42, the training default) is also the synthetic world's seed: the world the models were pretrained on
is make_world(seed=<their --seed>), so a pair about a different world would ask about people they never met.

Writes .cache/data/pairs_all.jsonl (train) and .cache/data/pairs_test.jsonl (held out: hh `test`, uf `test_prefs`,
and a --test_share of SE and synthetic conversations; no conversation is in both), and outs/pairs/report.md with
the per-source table of kept and skipped rows. The row format is in nanochat/pairs.py.

It also measures a length bias a reward model could learn: `shorter_wins` in the report's metrics (and
`<source>_shorter_wins`, and a column of the table) is the share of the written pairs whose chosen reply is the
shorter one, in characters, among pairs whose two replies differ in length; `length_ties` counts the others.
Near 0.5 means brevity alone does not predict the preferred reply (the synthetic pairs are built that way).

All or nothing: both files are written to temporary files and renamed into place only when every source has
given at least one pair and there is at least one training pair. Otherwise (a local copy of another schema, a
source whose every row is skipped, an interrupted read) the run exits 1 naming the source and its first skipped
rows, and the previous pairs_all.jsonl and pairs_test.jsonl are left as they were. A local hh copy that lacks some
of the four subsets is read as far as it goes, with a note naming the missing files.
"""

import argparse
import os
import time

from nanochat.common import InputError, atomic_path, parse_flags, str2bool
from nanochat.pair_sources import (HUB_IDS, SRC_NAMES, SourceError, Stream, hh_missing, hh_stream, hub_unreachable,
                                   se_stream, source_table, synthetic_stream, uf_stream, write_pairs)
from nanochat.pairs import shorter_wins
from nanochat.report import write_report

# without --max_per_source. The reward model learns a fact from the wrong-fact pairs that name it (run I, held-out
# wrong-fact pairs whose right reply is in the training pairs: 0.75 accuracy, the others 0.56), so more pairs is
# more facts learnt: pairs_test accuracy 0.881-0.885 at 6,000 (3 runs), 0.896 / 0.901 at 12,000, 0.891 / 0.906 at
# 24,000 (with ~100 s more evaluation). Five seconds to generate
SYNTHETIC_PAIRS = 12000


def selected_sources(args):
    names = [n.strip() for group in (args.only or ["hh,uf,se"]) for n in group.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SRC_NAMES))
    if unknown:
        raise SystemExit(f"--only: unknown source(s) {', '.join(unknown)} (choose from {', '.join(SRC_NAMES)})")
    dropped = {name for name in HUB_IDS if getattr(args, f"no_{name}")}
    sources = [n for n in SRC_NAMES if n in names and n not in dropped]
    if not sources:
        raise SystemExit("no source left to read: check --only and --no-hh/--no-uf/--no-se")
    return sources


def build_streams(args, sources):
    def location(name):
        return os.path.join(args.from_dir, HUB_IDS[name]) if args.from_dir else HUB_IDS[name]

    cap = args.max_per_source
    streams = []
    if "hh" in sources:
        streams += [Stream(SRC_NAMES["hh"], split, cap, hh_stream(location("hh"), split))
                    for split in ("test", "train")]
    if "uf" in sources:
        streams += [Stream(SRC_NAMES["uf"], route, cap, uf_stream(location("uf"), f"{route}_prefs"))
                    for route in ("test", "train")]
    if "se" in sources:
        se_cap = args.se_max_pairs if cap is None else min(cap, args.se_max_pairs)
        streams.append(Stream(SRC_NAMES["se"], "hashed", se_cap, se_stream(
            location("se"), args.seed, args.se_min_gap, args.se_max_pairs_per_question, args.se_max_per_file)))
    if "synthetic" in sources:
        n = cap if cap is not None else SYNTHETIC_PAIRS
        streams.append(Stream(SRC_NAMES["synthetic"], "hashed", n, synthetic_stream(args.seed, args.synthetic_size, n)))
    return streams


def check_kept(stats, out):
    """InputError unless every source kept a pair and some pair is for training: the files are not replaced then."""
    problems = []
    for src, st in stats.items():
        if st["train"] + st["test"] == 0:
            log = st["skips"]
            problems.append(f"{src} gave no pair ({log.total()} rows skipped: {log.summary()}"
                            + (f"; first: {log.first()})" if log.first() else ")"))
    if not problems and sum(st["train"] for st in stats.values()) == 0:
        problems.append("no pair went to the training file (every conversation is held out)")
    if problems:
        raise InputError("; ".join(problems) + f". Check the sources (the table above); {out} and its test file "
                         f"are left as they were")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=None, metavar="NAMES",
                        help="sources to read: hh, uf, se, synthetic; repeat or comma-separate (default: hh,uf,se)")
    for name in HUB_IDS:
        parser.add_argument(f"--no-{name}", f"--no_{name}", dest=f"no_{name}", type=str2bool, nargs="?", const=True,
                            default=False, help=f"leave out {HUB_IDS[name]}")
    parser.add_argument("--from_dir", type=str, default=None,
                        help="read DIR/<hub id>/, local copies of the hub repos, instead of the hub")
    parser.add_argument("--max_per_source", type=int, default=None,
                        help="keep at most N pairs per source and split (SE, synthetic: in all); synthetic default "
                             f"{SYNTHETIC_PAIRS}")
    parser.add_argument("--seed", type=int, default=42,
                        help="the synthetic world's seed (match the models' --seed), SE file order, held-out hash")
    parser.add_argument("--synthetic_size", type=int, default=1, help="the synthetic world's size knob")
    parser.add_argument("--test_share", type=float, default=0.1,
                        help="share of SE and synthetic conversations held out in the test file")
    parser.add_argument("--se_min_gap", type=int, default=2,
                        help="minimum pm_score gap between paired SE answers (2: about four times the upvotes)")
    parser.add_argument("--se_max_pairs_per_question", type=int, default=3)
    parser.add_argument("--se_max_pairs", type=int, default=50_000, help="SE pairs in all, train and test")
    parser.add_argument("--se_max_per_file", type=int, default=1000,
                        help="at most this many SE pairs from one parquet file, to spread them over sites")
    parser.add_argument("--pairs_path", type=str, default=".cache/data/pairs_all.jsonl",
                        help="training pairs written here")
    parser.add_argument("--test_pairs_path", type=str, default=".cache/data/pairs_test.jsonl",
                        help="held-out pairs written here")
    parser.add_argument("--report_dir", type=str, default="outs/pairs")
    args = parse_flags(parser, argv)

    sources = selected_sources(args)
    hub_sources = [HUB_IDS[n] for n in sources if n in HUB_IDS]
    if hub_sources and args.from_dir is None:
        reason = hub_unreachable()
        if reason is not None:
            raise SystemExit(f"kat_download_pairs: cannot use the Hugging Face hub ({reason}). Run with --only "
                             f"synthetic for the offline world, or with --from_dir DIR to read local copies "
                             f"(huggingface-cli download <hub id> --repo-type dataset --local-dir DIR/<hub id>).")
    for hub_id in hub_sources if args.from_dir else ():
        if not os.path.isdir(os.path.join(args.from_dir, hub_id)):
            raise SystemExit(f"--from_dir: {os.path.join(args.from_dir, hub_id)} is not a directory; expected a copy "
                             f"of the hub repo made by huggingface-cli download {hub_id} --repo-type dataset "
                             f"--local-dir {os.path.join(args.from_dir, hub_id)}")
    notes = []
    if "hh" in sources and args.from_dir:
        location = os.path.join(args.from_dir, HUB_IDS["hh"])
        missing = hh_missing(location)
        if missing:
            notes.append(f"note: {location} lacks {len(missing)} hh-rlhf subset file(s): {', '.join(missing)}; "
                         f"the pairs come from the files present")
            print(notes[-1])

    t0 = time.time()
    try:
        # the test file is renamed into place first, so a pairs_all.jsonl that exists always has its test file;
        # an exception inside the block (check_kept's too) renames neither
        with atomic_path(args.pairs_path) as train_tmp, atomic_path(args.test_pairs_path) as test_tmp:
            with open(train_tmp, "wb") as train_file, open(test_tmp, "wb") as test_file:
                stats = write_pairs(build_streams(args, sources), train_file, test_file, args.seed, args.test_share)
            table = source_table(stats)
            print(table, end="")
            check_kept(stats, args.pairs_path)
    except (SourceError, InputError) as e:
        raise SystemExit(f"kat_download_pairs: {e}") from None
    seconds = time.time() - t0

    n_train = sum(st["train"] for st in stats.values())
    n_test = sum(st["test"] for st in stats.values())
    print(f"Wrote {args.pairs_path} with {n_train} pairs")
    print(f"Wrote {args.test_pairs_path} with {n_test} held-out pairs")
    share, ties = shorter_wins(*stats.values()), sum(st["length_ties"] for st in stats.values())
    print(f"The chosen reply is the shorter in {'-' if share is None else f'{share:.1%}'} of the pairs whose replies "
          f"differ in length ({ties} length ties)")
    metrics = {"pairs_train": n_train, "pairs_test": n_test, "shorter_wins": share, "length_ties": ties}
    for src, st in stats.items():
        metrics.update({f"{src}_train": st["train"], f"{src}_test": st["test"], f"{src}_skipped": st["skips"].total(),
                        f"{src}_shorter_wins": shorter_wins(st), f"{src}_length_ties": st["length_ties"]})
    places = "\n".join(st["skips"].markdown(f"Skipped rows: {src}") for src, st in stats.items())
    write_report(args.report_dir, metrics, {"seconds": seconds}, vars(args),
                 notes="".join(n + "\n\n" for n in notes) + table + "\n" + places)


if __name__ == "__main__":
    main()
