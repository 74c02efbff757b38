"""
Supervised fine-tuning on conversations, with the loss on the assistant's tokens only.

    python -m scripts.chat_sft                                    # synthetic conversations (cpu profile)
    python -m scripts.chat_sft --artifact_focus=rare --artifact_rate=0.5 --out_dir=outs/control/sft
    python -m scripts.chat_sft --source=smoltalk --from_dir=DIR
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --source=smoltalk

One conversation per row, right-padded; the chat template's mask decides which tokens are learned (assistant
replies and their end token). The synthetic conversations keep some planted mode-collapse artifacts
(`--artifact_rate` of the answers) so that RLHF later has something to remove. Reads outs/mid/, writes outs/sft/.

The second command is the positive control: `--artifact_focus=rare` plants the artifacts only in answers about
the rare clusters (nanochat.synthetic.RARE_CLUSTERS, 15.5% of questions), each with probability --artifact_rate;
the world, and so the reward model, are those of the default run. Density-aware RLHF, which samples rare prompts
more, should remove them faster than uniform sampling; if it does not, the instrument cannot see the effect.
"""

import argparse

from nanochat.common import parse_flags, run_script
from nanochat.finetune import add_finetune_flags, finetune
from nanochat.loaders import SFTLoader


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_finetune_flags(parser, ckpt_path="outs/mid", out_dir="outs/sft", num_conversations=4000, stream=1,
                       artifact_rate=0.15)
    args = parse_flags(parser, argv)

    def make_loader(conversations, tok, global_rows, rank, world_size, train):
        return SFTLoader(conversations, tok, global_rows, args.max_len, rank, world_size, train=train,
                         seed=args.seed, step_rows=args.batch_rows if train else None)

    finetune(args, "chat_sft", make_loader)


if __name__ == "__main__":
    run_script(main)
