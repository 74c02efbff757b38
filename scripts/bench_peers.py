"""
The peers of scripts/bench.py's workloads, built and timed here: HF transformers' GPT-2 for train and generate, TRL's
RewardTrainer, DPOTrainer and GRPOTrainer for rm, dpo and grpo. scripts/bench.py imports this module, interleaves
these measurements with its own and prints the ratios; its docstring says what is and isn't identical between the
two sides. Nothing here touches the Hugging Face hub: the models are random-init GPT-2s built from a config, the
tokenizer is a word-level one built in memory (token i is the word "t{i}"; the last id is <eos>, also the pad).

    pip install -e '.[peers]'       # transformers 5 and trl 1.16.0; without them bench.py runs ours alone
    python -m scripts.bench_peers   # which peers bench.py will measure: their versions, or what is missing
"""

import os
import statistics
import tempfile
import time
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally: a hub call would be a bug, fail fast
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # bench.py forks its workers after this import
try:
    import datasets
    import tokenizers
    import transformers
    import trl
    MISSING = None
    # the trainers' progress bars, dataset maps and deprecation notices would bury bench.py's own output
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
except ImportError as e:  # bench.py says so in its table instead of a ratio
    MISSING = f"{e.name} is missing"

EOS = "<eos>"


def gpt2_config(args, n_positions=None, **kwargs):
    """GPT-2 at the bench's size, fp32, dropout off (ours has none): only the architecture's details differ."""
    return transformers.GPT2Config(vocab_size=args.vocab_size, n_positions=n_positions or args.seq_len,
                                   n_embd=64 * args.depth, n_layer=args.depth, n_head=max(1, args.depth),
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=args.vocab_size - 1,
                                   eos_token_id=args.vocab_size - 1, pad_token_id=args.vocab_size - 1, **kwargs)


def gpt2(args, cls_name="GPT2LMHeadModel", seed_offset=0, **kwargs):
    transformers.set_seed(args.seed + seed_offset)
    return getattr(transformers, cls_name)(gpt2_config(args, **kwargs)).float()


def word_tokenizer(vocab_size):
    """Word-level tokenizer: "t0 t1 ..." encodes to [0, 1, ...] and back, one token a word, no hub download."""
    vocab = {f"t{i}": i for i in range(vocab_size - 1)} | {EOS: vocab_size - 1}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS])
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with single spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def random_words(gen, vocab_size, rows, length):
    """Random token texts that are never <eos> (the trainers must not stop or mask on one)."""
    ids = torch.randint(0, vocab_size - 1, (rows, length), generator=gen).tolist()
    return [" ".join(f"t{i}" for i in row) for row in ids]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# -----------------------------------------------------------------------------
# transformers: a training step and generate

def train(args):
    """Seconds of each timed GPT-2 step: forward, loss, backward, grad clip 1, AdamW (as our train_step)."""
    model = gpt2(args).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab_size, (args.train_batch, args.seq_len), generator=gen)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = [timed(step)[1] for _ in range(args.train_warmup + args.train_steps)][args.train_warmup:]
    return {"step_seconds": seconds,
            "tokens_per_s_median_step": args.train_batch * args.seq_len / statistics.median(seconds),
            "matmul_params": sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "wpe" not in n)}


@torch.no_grad()
def generate(args, prompt_len):
    """Greedy `generate` with the KV cache at each batch size, never stopping early: tokens/s of one timed run."""
    # learned positions: room for prompt and reply even where a tiny test's context is shorter (ours has rotary)
    model = gpt2(args, n_positions=max(args.seq_len, prompt_len + args.new_tokens)).eval()
    gen = torch.Generator().manual_seed(args.seed)
    results = {}
    for batch in args.gen_batches:
        prompts = torch.randint(0, args.vocab_size - 1, (batch, prompt_len), generator=gen)

        def run(n):
            return model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, use_cache=True,
                                  max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)

        run(4)  # warmup, as ours
        out, seconds = timed(lambda: run(args.new_tokens))
        assert out.shape == (batch, prompt_len + args.new_tokens)
        results[batch] = {"tokens_per_s": batch * args.new_tokens / seconds, "seconds": seconds}
    return {"batches": results}


# -----------------------------------------------------------------------------
# TRL: each trainer's own optimizer steps

class StepClock(transformers.TrainerCallback if MISSING is None else object):
    """Wall time of each optimizer step, from on_step_begin to on_step_end (gradient accumulation included)."""

    def __init__(self):
        self.seconds, self._t0 = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._t0)


def trainer_args(cls, args, out_dir, steps, **kwargs):
    """Quiet, CPU, fp32, no saving, no eval, no logging: the trainer's steps and little else."""
    return cls(output_dir=out_dir, max_steps=steps, report_to="none", save_strategy="no", eval_strategy="no",
               logging_strategy="no", disable_tqdm=True, use_cpu=True, bf16=False, fp16=False,
               dataloader_num_workers=0, seed=args.seed, data_seed=args.seed, **kwargs)


def run_trainer(trainer, clock, warmup):
    trainer.remove_callback(transformers.PrinterCallback)  # it prints the final metrics dict
    trainer.train()
    return clock.seconds[warmup:]


def pair_rates(seconds, pairs):
    return {"step_seconds": seconds, "pairs_per_s_median_step": pairs / statistics.median(seconds)}


def rm(args):
    """RewardTrainer on pre-tokenized pairs (it adds no <eos> to those): --pairs pairs of --rm_len + --rm_len."""
    steps = args.pair_warmup + args.pair_steps
    gen = torch.Generator().manual_seed(args.seed)
    rows = args.pairs * steps
    data = datasets.Dataset.from_dict({
        "chosen_ids": torch.randint(0, args.vocab_size - 1, (rows, args.rm_len), generator=gen).tolist(),
        "rejected_ids": torch.randint(0, args.vocab_size - 1, (rows, args.rm_len), generator=gen).tolist()})
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out_dir:
        config = trainer_args(trl.RewardConfig, args, out_dir, steps, max_length=None, center_rewards_coefficient=0.01,
                              per_device_train_batch_size=args.pair_device_batch_size, max_grad_norm=1.0,
                              gradient_accumulation_steps=args.pairs // args.pair_device_batch_size)
        trainer = trl.RewardTrainer(gpt2(args, "GPT2ForSequenceClassification", num_labels=1), args=config,
                                    train_dataset=data, processing_class=word_tokenizer(args.vocab_size),
                                    callbacks=[clock])
        return pair_rates(run_trainer(trainer, clock, args.pair_warmup), args.pairs)


def dpo(args):
    """
    DPOTrainer on text pairs that tokenize to --dpo_prompt_len prompt tokens and --dpo_reply_len reply tokens: it
    appends <eos> to each reply, so the replies are one word shorter. A frozen reference model, sigmoid loss, beta 0.1.
    """
    steps = args.pair_warmup + args.pair_steps
    gen = torch.Generator().manual_seed(args.seed)
    rows = args.pairs * steps
    # the trainer tokenizes prompt + reply as one string: the reply starts with the space between them
    data = datasets.Dataset.from_dict({
        "prompt": random_words(gen, args.vocab_size, rows, args.dpo_prompt_len),
        "chosen": [" " + r for r in random_words(gen, args.vocab_size, rows, args.dpo_reply_len - 1)],
        "rejected": [" " + r for r in random_words(gen, args.vocab_size, rows, args.dpo_reply_len - 1)]})
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out_dir:
        config = trainer_args(trl.DPOConfig, args, out_dir, steps, max_length=None, beta=0.1, max_grad_norm=1.0,
                              per_device_train_batch_size=args.pair_device_batch_size,
                              gradient_accumulation_steps=args.pairs // args.pair_device_batch_size)
        trainer = trl.DPOTrainer(gpt2(args), ref_model=gpt2(args), args=config, train_dataset=data,
                                 processing_class=word_tokenizer(args.vocab_size), callbacks=[clock])
        return pair_rates(run_trainer(trainer, clock, args.pair_warmup), args.pairs)


# TRL's GRPO step by micro-batch rows (the bench's step, 2 alternating repeats of 2 timed steps each, 2026-12-01,
# medians in s): 1: 19.9, 2: 16.3, 4: 13.3 and 16.5, 8: 14.3 and 14.3, 16: 14.6, 32: 15.1, 64: 15.7, 128: 19.9. Its
# default of 8 rows is among its fastest (2 to 16 rows alike within the machine's drift) and one micro-batch of every
# row its slowest, so the default alone stands for TRL
GRPO_MICRO_BATCH = 8


def grpo(args):
    """
    Seconds per GRPOTrainer step of --grpo_prompts prompts x --grpo_samples completions at the trainer's default
    micro-batch (GRPO_MICRO_BATCH rows) with gradient accumulation over the step's rows, which it generates in one
    batch. It scores with a random GPT-2 reward model of the same size (as ours) and keeps a reference model (KL beta
    0.04, as ours); completions are forced to full length (min_new_tokens), sampled at temperature 1, top-p 1, no
    top-k.
    """
    rows = args.grpo_prompts * args.grpo_samples
    micro = min(GRPO_MICRO_BATCH, rows)
    steps = 1 + args.grpo_steps  # one untimed step, as ours
    gen = torch.Generator().manual_seed(args.seed)
    data = datasets.Dataset.from_dict(
        {"prompt": random_words(gen, args.vocab_size, args.grpo_prompts * steps, args.grpo_prompt_len)})
    tok = word_tokenizer(args.vocab_size)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out_dir:
        # the trainer builds its reference model from a path: a local copy of the random policy, no hub
        model_dir = os.path.join(out_dir, "policy")
        gpt2(args).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        config = trainer_args(
            trl.GRPOConfig, args, out_dir, steps, num_generations=args.grpo_samples, beta=0.04, learning_rate=1e-4,
            max_completion_length=args.grpo_new_tokens, generation_kwargs={"min_new_tokens": args.grpo_new_tokens},
            temperature=1.0, per_device_train_batch_size=micro, gradient_accumulation_steps=rows // micro,
            max_grad_norm=1.0, shuffle_dataset=False, log_completions=False)
        reward_model = gpt2(args, "GPT2ForSequenceClassification", seed_offset=1, num_labels=1)
        trainer = trl.GRPOTrainer(model_dir, reward_funcs=reward_model, args=config, train_dataset=data,
                                  processing_class=tok, reward_processing_classes=tok, callbacks=[clock])
        seconds = run_trainer(trainer, clock, 1)
    return {"micro_batch_rows": micro, "step_seconds": seconds, "median_seconds": statistics.median(seconds)}


if __name__ == "__main__":
    print(f"peers: {MISSING}: pip install -e '.[peers]'" if MISSING else
          f"peers: transformers {transformers.__version__}, trl {trl.__version__}")
