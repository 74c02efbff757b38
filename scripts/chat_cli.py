"""
Chat with a model in the terminal, or answer prompts in one shot or from a file.

    python -m scripts.chat_cli --ckpt_path outs/sft                            # interactive, streamed
    python -m scripts.chat_cli --ckpt_path outs/sft --prompt "What is 7 + 5?"  # one answer, then exit
    python -m scripts.chat_cli --ckpt_path outs/sft/ckpt.pt --prompts_file p.txt > outputs.txt

Interactive: the conversation carries over from turn to turn; /clear starts a new one, /quit (or EOF, Ctrl-D)
exits. Tokens are printed as they are sampled. When the conversation outgrows the model's context, its oldest
exchanges are dropped.

--prompt and --prompts_file (one prompt per line, blank lines skipped; prompts generated in batches) write one
response per line, to stdout or --out, with backslashes and newlines escaped (\\\\ and \\n) so a response is always
exactly one line; logs go to stderr, so stdout holds only responses.

Sampling: --temperature (0 is greedy), --top_k, --max_new_tokens, --seed.
"""

import argparse
import sys

from nanochat.checkpoint import CheckpointError, load_model, load_tokenizer
from nanochat.common import autodetect_device, parse_flags, run_script
from nanochat.engine import Engine
from nanochat.evaluate import generate_responses


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def escape(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def answer_prompts(args, model, tok, prompts):
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    log(f"generating {len(prompts)} response(s)...")
    try:
        responses = generate_responses(model, tok, conversations, args.max_new_tokens, args.batch_size,
                                       args.temperature, args.seed, top_k=args.top_k)
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


def chat(args, model, tok):
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
        for token in engine.stream(prompt, args.max_new_tokens, args.temperature, top_k=args.top_k,
                                   seed=args.seed + turn, stop_tokens=stop):
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
    parser.add_argument("--ckpt_path", type=str, default="outs/sft", help="a stage directory or its ckpt.pt")
    parser.add_argument("--prompt", type=str, default=None, help="answer this one prompt and exit")
    parser.add_argument("--prompts_file", type=str, default=None, help="answer every line of this file and exit")
    parser.add_argument("--out", type=str, default=None, help="write --prompt/--prompts_file answers here")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32, help="prompts generated together (--prompts_file)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", type=str, default=None, help="cuda | mps | cpu (default: autodetect)")
    args = parse_flags(parser, argv)
    if args.prompt is not None and args.prompts_file is not None:
        raise SystemExit("chat_cli: pass --prompt or --prompts_file, not both")

    device = autodetect_device(args.device)
    try:
        model, payload = load_model(args.ckpt_path, device)
        tok = load_tokenizer(payload)
    except CheckpointError as e:
        raise SystemExit(f"chat_cli: {e}")
    log(f"loaded {payload['path']} (step {payload.get('step')}) on {device}")

    if args.prompt is not None:
        answer_prompts(args, model, tok, [args.prompt])
    elif args.prompts_file is not None:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise SystemExit(f"chat_cli: cannot read --prompts_file: {e}")
        answer_prompts(args, model, tok, prompts)
    else:
        try:
            chat(args, model, tok)
        except KeyboardInterrupt:
            print()


if __name__ == "__main__":
    run_script(main)
