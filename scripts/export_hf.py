"""
Export a checkpoint as a Hugging Face transformers model that loads with no custom code (no trust_remote_code).

    pip install -e '.[hf]'
    python -m scripts.export_hf --ckpt_path outs/grpo_density_s1 --out_dir outs/hf/grpo_density_s1
    python -m scripts.export_hf --ckpt_path outs/sft          # writes outs/hf/sft

Then, anywhere with transformers >= 5 (nothing of this repo needed):

    model = AutoModelForCausalLM.from_pretrained("outs/hf/sft")      # NanoChatForCausalLM, float32
    tok = AutoTokenizer.from_pretrained("outs/hf/sft")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model.generate(**ids, max_new_tokens=64, do_sample=False)        # stops at <|assistant_end|> (or <|bos|>)

What is written (into a temp directory beside --out_dir, renamed onto it only once verified):
    config.json, generation_config.json, model.safetensors   transformers' NanoChat architecture, float32
    tokenizer.json           the same byte-level BPE: our merges, split regex and the 9 special tokens (same ids);
                             encoding with add_special_tokens (the default) prepends <|bos|>, as every sequence the
                             model saw starts with it
    tokenizer_config.json    bos <|bos|>, eos <|assistant_end|>, pad <|bos|>, and a Jinja chat_template that
                             renders exactly as nanochat's tokenizer: <|bos|>, then per turn <|user_start|>...
                             <|user_end|> / <|assistant_start|>...<|assistant_end|>; a first system message is
                             merged into the first user message (system + "\\n\\n" + user); roles must alternate.
                             add_generation_prompt=True gives render_for_completion (a trailing assistant message
                             is dropped, <|assistant_start|> appended); without it, render_conversation
    nanochat_export.json     provenance: source checkpoint, step, kind, tokenizer fingerprint, lineage, world, and
                             the largest logit difference measured by the check below

The mapping (GPTConfig -> NanoChatConfig): n_embd -> hidden_size, n_layer -> num_hidden_layers, n_head ->
num_attention_heads, n_kv_head -> num_key_value_heads (GQA), vocab_size -> vocab_size, sequence_len ->
max_position_embeddings (the trained context), softcap -> final_logit_softcapping (0 -> none). Fixed by our
architecture: intermediate_size = the MLP's width (4 * n_embd), hidden_act relu2, rope_theta 10000 with the
half-split rotation (pairs x_i, x_{i+d/2}; NanoChat's rotate_half has our sign), rms_norm_eps = float32 epsilon
(what F.rms_norm uses), no biases, untied embedding and head. NanoChat also norms the embeddings, and applies
QK-norm after rotary, as we do.

Verified before the directory is published: transformers' AutoModelForCausalLM and AutoTokenizer load it, the
logits of random token sequences match ours within 1e-3 (float32), and sample strings and a multi-turn chat with a
system message encode to our ids.

Refused (exit 1, nothing written), because no transformers class computes them:
    a reward model (kind "rm"): not exportable: transformers has no sequence-classification class for the NanoChat
        architecture, so it could only load with custom code
    AutoDeco heads (kind "autodeco"): not exportable: per-token temperature/top-p heads have no transformers
        equivalent; export the base checkpoint they sit on (the message names it)
    any other kind, any config field or weight the mapping above does not know (e.g. unmerged LoRA adapters)
    an export whose check above fails

Known difference: in transformers, special-token strings inside message content (say a literal "<|user_end|>")
become special tokens; nanochat encodes them as text. apply_chat_template(..., sanitize_control_tokens=True)
(transformers 5.24 has it) encodes them as text too.
"""

import argparse
import os
import re
import shutil

import torch

from nanochat.checkpoint import load_payload, load_tokenizer, load_weights, resolve_path
from nanochat.common import InputError, atomic_write_json, parse_flags, run_script
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, _bytes_to_unicode

ROPE_THETA = 10000.0  # GPT._rotary_tables' base
EXPORT_NOTE = "nanochat_export.json"  # written last: its presence marks a directory as one of our exports
LOGIT_TOLERANCE = 1e-3  # float32 on CPU: measured 0 (same kernels); a real mismatch (rotary, softcap) is order 1

# our config field -> NanoChatConfig key; a field missing here has no equivalent and is refused
CONFIG_KEYS = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
               "n_kv_head": "num_key_value_heads", "vocab_size": "vocab_size",
               "sequence_len": "max_position_embeddings", "softcap": "final_logit_softcapping"}

# our weight names -> NanoChatForCausalLM's (per block: blocks.{i}.<ours> -> model.layers.{i}.<theirs>)
TOP_WEIGHTS = {"wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
BLOCK_WEIGHTS = {"attn.c_q.weight": "self_attn.q_proj.weight", "attn.c_k.weight": "self_attn.k_proj.weight",
                 "attn.c_v.weight": "self_attn.v_proj.weight", "attn.c_proj.weight": "self_attn.o_proj.weight",
                 "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_proj.weight": "mlp.fc2.weight"}

CHAT_TEMPLATE = r"""{#- nanochat-kat's chat format, as nanochat/tokenizer.py renders it -#}
{%- if messages[0]['role'] == 'system' -%}
    {%- set prefix = messages[0]['content'] + '\n\n' -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set prefix = '' -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- if turns | length == 0 -%}
    {{- raise_exception('conversation has a system message but no user message') -}}
{%- endif -%}
{{- '<|bos|>' -}}
{%- for message in turns -%}
    {%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}
        {{- raise_exception('after an optional first system message, roles must alternate user, assistant, ...') -}}
    {%- endif -%}
    {%- if message['content'] is not string -%}
        {{- raise_exception('message content must be a string') -}}
    {%- endif -%}
    {%- if message['role'] == 'user' -%}
        {{- '<|user_start|>' + (prefix if loop.first else '') + message['content'] + '<|user_end|>' -}}
    {%- elif not (add_generation_prompt and loop.last) -%}
        {{- '<|assistant_start|>' + message['content'] + '<|assistant_end|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant_start|>' -}}
{%- endif -%}
"""

# what the check encodes with both tokenizers: special tokens, unicode, digit runs, whitespace runs
CHECK_STRINGS = ["Hello, world!", "héllo wörld, 日本語, emoji 🙂", "1 22 333 4444 55555 3.14159",
                 "  two spaces\n\n\ttab\r\nCRLF   ", "<|bos|>text between<|user_end|><|assistant_start|>"]
CHECK_CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where is Korlin?"},
              {"role": "assistant", "content": "By the river."}, {"role": "user", "content": "And Zavu?"}]


def refuse_kind(payload):
    """Checkpoints of a kind that no transformers class computes, refused with the reason."""
    kind, path = payload.get("kind", "gpt"), payload["path"]
    if kind == "rm":
        raise InputError(f"{path} is a reward model (kind 'rm'): not exportable: transformers has no "
                         f"sequence-classification class for the NanoChat architecture, so it could only load with "
                         f"custom code (trust_remote_code)")
    if kind == "autodeco":
        raise InputError(f"{path} holds AutoDeco heads (kind 'autodeco'): not exportable: per-token temperature "
                         f"and top-p heads have no transformers equivalent; export the base model they sit on, "
                         f"{payload['extra'].get('base_path')}")
    if kind != "gpt":
        raise InputError(f"{path} holds a '{kind}' model: not exportable (only kind 'gpt' maps onto NanoChat)")


def hf_config(config, state, tok):
    """NanoChatConfig keyword arguments for our GPTConfig dict, refusing fields that have no equivalent."""
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise InputError(f"config field(s) {unknown} have no NanoChatConfig equivalent: not exportable")
    kwargs = {theirs: config[ours] for ours, theirs in CONFIG_KEYS.items()}
    kwargs["final_logit_softcapping"] = config["softcap"] or None  # our 0 means no capping
    specials = {name: tok.encode_special(name) for name in ("<|bos|>", "<|assistant_end|>")}
    return kwargs | {
        "intermediate_size": state["blocks.0.mlp.c_fc.weight"].shape[0],
        "hidden_act": "relu2",
        "rms_norm_eps": torch.finfo(torch.float32).eps,  # F.rms_norm's default eps for float32 inputs
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": specials["<|bos|>"],
        "eos_token_id": specials["<|assistant_end|>"],
        # <|bos|> pads: never a label in chat fine-tuning, so a collator that masks pad labels loses nothing
        "pad_token_id": specials["<|bos|>"],
    }


def hf_state_dict(state):
    """Our weights under NanoChatForCausalLM's names, as float32; a weight the mapping does not know is refused."""
    out = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if key in TOP_WEIGHTS:
            name = TOP_WEIGHTS[key]
        elif match and match.group(2) in BLOCK_WEIGHTS:
            name = f"model.layers.{match.group(1)}.{BLOCK_WEIGHTS[match.group(2)]}"
        else:
            raise InputError(f"weight {key!r} has no place in transformers' NanoChat model (unmerged LoRA adapters "
                             f"or a newer architecture feature?): not exportable")
        out[name] = tensor.float()
    return out


def hf_tokenizer(tok):
    """A `tokenizers` Tokenizer that encodes exactly as our tiktoken encoding."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    ranks = tok.enc._mergeable_ranks
    to_chars = _bytes_to_unicode()  # HF's ByteLevel spells every byte as one printable char

    def spell(token):
        return "".join(to_chars[b] for b in token)

    # tiktoken merges any adjacent pair whose concatenation is a token, lowest rank first: list every split of
    # every token, ordered by the rank of the token it makes, so HF's merge priorities are tiktoken's ranks
    merges = [(spell(token[:i]), spell(token[i:]))
              for token, _ in sorted(ranks.items(), key=lambda item: item[1])
              for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
    # ignore_merges: a pre-token that is itself a token is taken whole, as tiktoken does before merging
    hf = HFTokenizer(BPE(vocab={spell(token): rank for token, rank in ranks.items()}, merges=merges,
                         ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.enc._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS])
    ids = [hf.token_to_id(name) for name in SPECIAL_TOKENS]
    if ids != [tok.encode_special(name) for name in SPECIAL_TOKENS]:
        raise InputError(f"special token ids {ids} differ from the tokenizer's: not exportable")
    bos = ("<|bos|>", tok.bos_token_id)
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                      special_tokens=[bos])
    return hf


def tokenizer_config(config):
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|bos|>",
        "add_bos_token": True,  # transformers 5 rebuilds the post-processor from this; 4.x reads tokenizer.json's
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # it would turn " ." into "." on decode
        "model_max_length": config["sequence_len"],
        "chat_template": CHAT_TEMPLATE,
    }


def check_export(directory, model, tok):
    """Load the export as a user would and compare it with ours; returns the largest logit difference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(directory).eval()
    hf_tok = AutoTokenizer.from_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (2, min(64, model.config.sequence_len)), generator=generator)
    with torch.no_grad():
        diff = (hf_model(idx).logits.float() - model(idx)).abs().max().item()
    if not diff <= LOGIT_TOLERANCE:  # also refuses NaN
        raise InputError(f"the exported model's logits differ from the checkpoint's by {diff:.3g} (> "
                         f"{LOGIT_TOLERANCE:g}): transformers {_version()} computes another function; not exported")
    for text in CHECK_STRINGS:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        expected = tok.enc.encode(text, allowed_special="all")  # special-token strings as special tokens, as HF
        if ids != expected or hf_tok.decode(ids) != text:
            raise InputError(f"the exported tokenizer encodes {text!r} as {ids}, nanochat as {expected}; not exported")
    for add_generation_prompt, expected in ((True, tok.render_for_completion(CHECK_CHAT)),
                                            (False, tok.render_conversation(CHECK_CHAT, max_tokens=10**9)[0])):
        ids = hf_tok.apply_chat_template(CHECK_CHAT, add_generation_prompt=add_generation_prompt, return_dict=False)
        if ids != expected:
            raise InputError(f"the exported chat template renders {ids}, nanochat {expected}; not exported")
    return diff


def _version():
    import transformers
    return transformers.__version__


def check_out_dir(out_dir):
    """An export replaces an earlier export, never any other directory."""
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, EXPORT_NOTE)):
        raise InputError(f"--out_dir {out_dir} is not empty and holds no earlier export; not overwriting it")


def publish(tmp_dir, out_dir):
    """Move the verified export onto out_dir (checked by check_out_dir), replacing an earlier export."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old)
    else:
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp_dir, out_dir)


def export(ckpt_path, out_dir):
    from transformers import NanoChatConfig, NanoChatForCausalLM

    out_dir = os.path.normpath(out_dir)  # "outs/hf/x/" and "outs/hf/x" name the same export and temp directory
    check_out_dir(out_dir)
    payload = load_payload(ckpt_path)
    refuse_kind(payload)
    state = payload["model"]
    hf_weights = hf_state_dict(state)
    tok = load_tokenizer(payload)
    config_kwargs = hf_config(payload["config"], state, tok)
    model = GPT(GPTConfig(**payload["config"]))
    load_weights(model, payload)
    model.eval()

    hf_model = NanoChatForCausalLM(NanoChatConfig(**config_kwargs, dtype="float32"))
    missing, unexpected = hf_model.load_state_dict(hf_weights, strict=False)
    if missing or unexpected:
        raise InputError(f"transformers {_version()}'s NanoChat expects other weights (missing {missing}, "
                         f"unexpected {unexpected}): not exportable")
    # a chat model ends its turn with <|assistant_end|>; a base model's document ends where the next <|bos|> starts
    hf_model.generation_config.eos_token_id = [tok.encode_special("<|assistant_end|>"), tok.bos_token_id]

    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        hf_model.save_pretrained(tmp_dir)
        hf_tokenizer(tok).save(os.path.join(tmp_dir, "tokenizer.json"))
        atomic_write_json(os.path.join(tmp_dir, "tokenizer_config.json"), tokenizer_config(payload["config"]))
        diff = check_export(tmp_dir, model, tok)
        atomic_write_json(os.path.join(tmp_dir, EXPORT_NOTE), {
            "checkpoint": payload["path"], "step": payload["step"], "kind": payload["kind"],
            "tokenizer_fingerprint": payload["tokenizer_fingerprint"], "lineage": payload["lineage"],
            "world": payload["world"], "transformers_version": _version(), "max_abs_logit_diff": diff})
        # save_pretrained writes the weights 0600; a server running as another user (a vLLM container) must read them
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(tmp_dir):
            os.chmod(os.path.join(tmp_dir, name), 0o666 & ~umask)
        publish(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return diff


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", type=str, default="outs/sft", help="a stage directory or its ckpt.pt")
    parser.add_argument("--out_dir", type=str, default=None,
                        help="the export directory (default outs/hf/<name of the checkpoint's directory>)")
    args = parse_flags(parser, argv)
    try:
        import transformers
    except ImportError:
        raise InputError("export_hf needs transformers: pip install -e '.[hf]'") from None
    if not hasattr(transformers, "NanoChatForCausalLM"):
        raise InputError(f"transformers {transformers.__version__} has no NanoChat model; pip install -e '.[hf]' "
                         f"(transformers >= 5)")
    transformers.utils.logging.disable_progress_bar()  # one line per export, not a bar per file
    stage_name = os.path.basename(os.path.dirname(os.path.abspath(resolve_path(args.ckpt_path))))
    out_dir = args.out_dir or os.path.join("outs", "hf", stage_name)
    diff = export(args.ckpt_path, out_dir)
    print(f"exported {args.ckpt_path} to {out_dir} (transformers {transformers.__version__}; logits within "
          f"{diff:.2g} of the checkpoint's)")


if __name__ == "__main__":
    run_script(main)
