"""
AutoDeco step 1: fresh temperature and top-p heads for a base chat model, saved heads-only (nanochat/autodeco.py).

    python -m scripts.kat_construct_autodeco --base_model_name_or_path outs/sft --output_dir outs/autodeco_init
    python -m scripts.kat_construct_autodeco --base_model_name_or_path outs/grpo_density_s0 --seed 1

The heads start at T = 1 and P = 0.5 exactly (their last layers are zero), so sampling with them untrained is plain
temperature-1 sampling. The checkpoint (ckpt.pt of kind "autodeco", tokenizer/, meta.json) holds only the heads'
weights and names its base: the base's ckpt.pt (relative and absolute path) and a fingerprint of its weights, so
training and decoding refuse a base that changed since. Train the heads next with python -m scripts.kat_train_autodeco.
"""

import argparse

import torch

from nanochat.autodeco import AUTODECO_KIND, AutoDecoHeads, HeadsConfig, base_reference, weights_fingerprint
from nanochat.checkpoint import load_model, save_checkpoint, tokenizer_dir
from nanochat.common import open_fraction, parse_flags, print0, run_script


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model_name_or_path", "--ckpt_path", dest="base_model_name_or_path", type=str,
                        default="outs/sft", help="the base chat model's checkpoint (a stage directory or ckpt.pt)")
    parser.add_argument("--output_dir", "--out_dir", dest="output_dir", type=str, default="outs/autodeco_init")
    parser.add_argument("--min_p_ratio", type=open_fraction, default=0.1,
                        help="the min-p ratio decoding uses with these heads until training sets its own")
    parser.add_argument("--seed", type=int, default=42, help="initialises the heads' first layers")
    args = parse_flags(parser, argv)

    base, payload = load_model(args.base_model_name_or_path, "cpu")
    torch.manual_seed(args.seed)
    heads = AutoDecoHeads(HeadsConfig(n_embd=base.config.n_embd))
    extra = base_reference(payload["path"], weights_fingerprint(payload["model"]), args.output_dir)
    extra |= {"min_p_ratio": args.min_p_ratio, "train_temp": False, "train_top_p": False}
    save_checkpoint(args.output_dir, heads, 0, tokenizer_dir(payload), kind=AUTODECO_KIND, flags=vars(args),
                    extra=extra, parents=[payload], world=payload["world"])
    num_params = sum(p.numel() for p in heads.parameters())
    print0(f"wrote {args.output_dir}: AutoDeco heads ({num_params:,} parameters, T = 1 and P = 0.5 at init) on "
           f"{payload['path']} (weights {extra['base_fingerprint']})")


if __name__ == "__main__":
    run_script(main)
