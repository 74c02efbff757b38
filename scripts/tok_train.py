"""
Train the byte-level BPE tokenizer on the pretraining source and report its compression.

    python -m scripts.tok_train                                   # synthetic world, vocab 4096 (cpu profile)
    python -m scripts.tok_train --source=fineweb --vocab_size=65536 --max_chars=2000000000   # gpu profile
    python -m scripts.tok_train --source=local --data_dir=my_texts/

Writes outs/tokenizer/ (tokenizer.model, tokenizer.json, report.md).
"""

import argparse
import time

from nanochat.common import add_common_flags, parse_flags, print0, run_script
from nanochat.data import pretrain_documents
from nanochat.report import write_report
from nanochat.tokenizer import train_tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab_size", type=int, default=4096, help="total vocabulary, special tokens included")
    parser.add_argument("--source", type=str, default="synthetic", choices=["synthetic", "local", "fineweb"])
    parser.add_argument("--data_dir", type=str, default=None, help="directory of .txt/.jsonl/.parquet (local)")
    parser.add_argument("--num_shards", type=int, default=2, help="fineweb shards to download/read")
    parser.add_argument("--synthetic_size", type=int, default=1, help="the synthetic world's size knob")
    parser.add_argument("--max_chars", type=int, default=20_000_000, help="train on at most this many characters")
    parser.add_argument("--doc_cap", type=int, default=10_000, help="crop each document to this many characters")
    parser.add_argument("--out_dir", type=str, default="outs/tokenizer")
    add_common_flags(parser)
    args = parse_flags(parser, argv)

    t0 = time.time()
    docs = pretrain_documents(args.source, "train", data_dir=args.data_dir, seed=args.seed,
                              synthetic_size=args.synthetic_size, num_shards=args.num_shards)

    def text_iterator():
        remaining = args.max_chars
        for doc in docs:
            piece = doc[:args.doc_cap]
            yield piece
            remaining -= len(piece)
            if remaining <= 0:
                return

    tok = train_tokenizer(text_iterator(), args.vocab_size)
    train_time = time.time() - t0
    tok.save(args.out_dir)

    # compression on held-out text: UTF-8 bytes per token (higher is better)
    val_docs = pretrain_documents(args.source, "val", data_dir=args.data_dir, seed=args.seed,
                                  synthetic_size=args.synthetic_size, num_shards=args.num_shards, num_docs=1000)
    num_bytes = sum(len(d.encode("utf-8")) for d in val_docs)
    num_tokens = sum(len(ids) for ids in tok.encode(val_docs))
    ratio = num_bytes / max(num_tokens, 1)
    print0(f"Trained a {tok.vocab_size}-token tokenizer in {train_time:.1f}s; compression on {len(val_docs)} "
           f"val documents: {ratio:.2f} bytes/token. Saved to {args.out_dir}")
    write_report(args.out_dir, {"vocab_size": tok.vocab_size, "val_bytes_per_token": ratio,
                               "val_documents": len(val_docs)},
                 {"train_seconds": train_time}, vars(args))


if __name__ == "__main__":
    run_script(main)
