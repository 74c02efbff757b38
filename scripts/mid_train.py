"""
Mid-training: teach the base model the conversation format and its special tokens.

    python -m scripts.mid_train                                   # synthetic conversations (cpu profile)
    python -m scripts.mid_train --source=smoltalk --from_dir=DIR  # SmolTalk from a local copy of the hub repo
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --source=smoltalk --device_batch_size=32

Conversations are rendered with the chat template and packed into rows of `--max_len` tokens, as in
pretraining, with the loss on every token. Reads outs/base/, writes outs/mid/.
"""

import argparse

from nanochat.common import parse_flags, run_script
from nanochat.finetune import add_finetune_flags, finetune
from nanochat.loaders import PackedLoader


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_finetune_flags(parser, ckpt_path="outs/base", out_dir="outs/mid", num_conversations=8000, stream=0,
                       artifact_rate=0.15)
    args = parse_flags(parser, argv)

    def make_loader(conversations, tok, global_rows, rank, world_size, train):
        def render(convs):
            return [tok.render_conversation(c, max_tokens=args.max_len + 1)[0] for c in convs]
        return PackedLoader(conversations, tok, global_rows, args.max_len, rank, world_size, train=train,
                            seed=args.seed, encode=render)

    def conversations_per_row(convs, tok):
        sample = convs[:200]
        mean_tokens = sum(len(tok.render_conversation(c)[0]) for c in sample) / max(len(sample), 1)
        return max(1.0, (args.max_len + 1) / mean_tokens)

    finetune(args, "mid_train", make_loader, conversations_per_row)


if __name__ == "__main__":
    run_script(main)
