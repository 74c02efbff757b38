"""
Chat with a model in the terminal, or answer prompts in one shot or from a file.

    python -m scripts.chat_cli --ckpt_path outs/sft                            # interactive, streamed
    python -m scripts.chat_cli --ckpt_path outs/sft --prompt "What is 7 + 5?"  # one answer, then exit
    python -m scripts.chat_cli --ckpt_path outs/sft/ckpt.pt --prompts_file p.txt > outputs.txt
    python -m scripts.chat_cli --autodeco_path outs/autodeco                  # the heads choose T (and top-p)

Interactive: the conversation carries over from turn to turn; /clear starts a new one, /quit (or EOF, Ctrl-D)
exits. Tokens are printed as they are sampled. When the conversation outgrows the model's context, its oldest
exchanges are dropped.

--prompt and --prompts_file (one prompt per line, blank lines skipped; prompts generated in batches) write one
response per line, to stdout or --out, with backslashes and newlines escaped (\\\\ and \\n) so a response is always
exactly one line; logs go to stderr, so stdout holds only responses.

Sampling: --temperature (0 is greedy), --top_k, --max_new_tokens, --seed. Or --autodeco_path DIR: AutoDeco heads
(scripts.kat_train_autodeco) choose each token's temperature, and its top-p when they were trained to, with min-p
at the ratio they were trained for; the model is the base the heads sit on, so --ckpt_path, --temperature and
--top_k do not go with it.
"""

import argparse
import sys

from nanochat.autodeco import decode_hook, load_autodeco
from nanochat.checkpoint import CheckpointError, load_model, load_tokenizer
from nanochat.common import autodetect_device, parse_flags, run_script
from nanochat.engine import Engine
from nanochat.evaluate import generate_responses


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def escape(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def answer_prompts(args, model, tok, prompts, sampling):
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    log(f"generating {len(prompts)} response(s)...")
    try:
        responses = generate_responses(model, tok, conversations, args.max_new_tokens, args.batch_size,
                                       seed=args.seed, **sampling)
    except ValueError as e:  # a prompt too long for the model
        raise SystemExit(f"chat_cli: {e}")
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        for response in responses:
            out.write(escape(response) + "\n")
    finally:
        if args.out:
            out.close()
            log(f"wrote {len(responses)} response(s) to {args.out}")


def chat(args, model, tok, sampling):
    engine = Engine(model)
    stop = [tok.encode_special("<|assistant_end|>"), tok.bos_token_id]
    messages, turn = [], 0
    print("Chat with the model. /clear starts over, /quit or Ctrl-D exits.")
    while True:
        try:
            user = input("\nUser: ").strip()
        except EOFError:
            print()
            return
        if user == "/quit":
            return
        if user == "/clear":
            messages = []
            print("(conversation cleared)")
            continue
        if not user:
            continue
        messages.append({"role": "user", "content": user})
        prompt = tok.render_for_completion(messages)
        while len(prompt) + args.max_new_tokens > model.rotary_len and len(messages) > 1:
            messages = messages[2:]
            prompt = tok.render_for_completion(messages)
            log("(dropped the oldest exchange: the conversation outgrew the model's context)")
        if len(prompt) + args.max_new_tokens > model.rotary_len:
            log(f"(message too long: {len(prompt)} tokens + --max_new_tokens {args.max_new_tokens} exceed "
                f"{model.rotary_len})")
            messages.pop()
            continue
        print("Assistant: ", end="", flush=True)
        ids, shown = [], ""
        for token in engine.stream(prompt, args.max_new_tokens, seed=args.seed + turn, stop_tokens=stop, **sampling):
            ids.append(token)
            text = tok.decode(ids)
            # a character split across tokens decodes to U+FFFD until its last byte arrives
            if not text.endswith("\ufffd"):
                print(text[len(shown):], end="", flush=True)
                shown = text
        text = tok.decode(ids)
        print(text[len(shown):])
        messages.append({"role": "assistant", "content": text})
        turn += 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", type=str, default=None, help="a stage directory or its ckpt.pt (default "
                        "outs/sft)")
    parser.add_argument("--autodeco_path", type=str, default=None,
                        help="AutoDeco heads (a stage directory or its ckpt.pt): sample with their temperature and "
                             "top-p on the base model they name, instead of --ckpt_path, --temperature and --top_k")
    parser.add_argument("--prompt", type=str, default=None, help="answer this one prompt and exit")
    parser.add_argument("--prompts_file", type=str, default=None, help="answer every line of this file and exit")
    parser.add_argument("--out", type=str, default=None, help="write --prompt/--prompts_file answers here")
    parser.add_argument("--temperature", type=float, default=None, help="default 0.6; 0 is greedy")
    parser.add_argument("--top_k", type=int, default=None, help="default 50")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32, help="prompts generated together (--prompts_file)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", type=str, default=None, help="cuda | mps | cpu (default: autodetect)")
    args = parse_flags(parser, argv)
    if args.prompt is not None and args.prompts_file is not None:
        raise SystemExit("chat_cli: pass --prompt or --prompts_file, not both")
    fixed = [f"--{name}" for name in ("ckpt_path", "temperature", "top_k") if getattr(args, name) is not None]
    if args.autodeco_path is not None and fixed:
        raise SystemExit(f"chat_cli: --autodeco_path brings its own base model and sampling settings; drop "
                         f"{', '.join(fixed)}")

    device = autodetect_device(args.device)
    try:
        if args.autodeco_path is None:
            model, payload = load_model(args.ckpt_path or "outs/sft", device)
            sampling = {"temperature": 0.6 if args.temperature is None else args.temperature,
                        "top_k": 50 if args.top_k is None else args.top_k}
        else:
            model, heads, payload = load_autodeco(args.autodeco_path, device)
            sampling = {"decode_hook": decode_hook(heads, payload["train_top_p"]), "min_p": payload["min_p_ratio"]}
        tok = load_tokenizer(payload)
    except CheckpointError as e:
        raise SystemExit(f"chat_cli: {e}")
    log(f"loaded {payload['path']} (step {payload.get('step')}) on {device}")
    if args.autodeco_path is not None:
        log(f"AutoDeco: the heads choose the temperature{' and top-p' if payload['train_top_p'] else ''}, min-p "
            f"{payload['min_p_ratio']:g}, base {payload['base_payload']['path']}")

    if args.prompt is not None:
        answer_prompts(args, model, tok, [args.prompt], sampling)
    elif args.prompts_file is not None:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise SystemExit(f"chat_cli: cannot read --prompts_file: {e}")
        answer_prompts(args, model, tok, prompts, sampling)
    else:
        try:
            chat(args, model, tok, sampling)
        except KeyboardInterrupt:
            print()


if __name__ == "__main__":
    run_script(main)
