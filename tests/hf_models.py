"""Tiny models and a tokenizer as a user brings them: stock transformers classes with
random weights saved to local dirs, and a tokenizer built with `tokenizers` (not the
project's BPE: other specials, a ChatML chat template), so nothing comes from the hub."""
from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Templates written to behave like the families users bring (whitespace as the real ones have it).
# Qwen3-like: reasoning in <think> on the final assistant turn only; earlier turns show content alone.
REASONING_LAST = (
    "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n"
    "{% if loop.last %}<think>\n{{ m.reasoning_content or '' }}\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_SPLIT_SYSTEM = ("{% if messages[0].role == 'system' %}{% set system = messages[0].content %}"
                 "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}")
# Llama-2-like: the system prompt inside the first [INST], roles must alternate, no generation prompt.
SYSTEM_FIRST_USER = (
    _SPLIT_SYSTEM + "{{ bos_token }}{% for m in turns %}"
    "{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m.role == 'user' %}[INST] {% if loop.first and system is defined %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n"
    "{% endif %}{{ m.content | trim }} [/INST]{% else %} {{ m.content | trim }} {{ eos_token }}{% endif %}{% endfor %}")
# Mistral-like: the system prompt inside the last user turn, so a conversation's start is not
# rendered as the start of the whole.
SYSTEM_LAST_USER = (
    _SPLIT_SYSTEM + "{% set users = turns | selectattr('role', 'equalto', 'user') | list %}"
    "{{ bos_token }}{% for m in turns %}{% if m.role == 'user' %}[INST] "
    "{% if system is defined and m == users[-1] %}{{ system }}\n\n{% endif %}{{ m.content }}[/INST]"
    "{% else %} {{ m.content | trim }}{{ eos_token }}{% endif %}{% endfor %}")
# Hermes/Qwen-like tool calling: tools in the system turn, calls as <tool_call> JSON, results as user turns.
TOOLS = (
    "{% if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# ChatML whose assistant text is marked with {% generation %}: the end marker in, its newline out.
GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}"
    "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            max_position_embeddings=512)


def make_tokenizer(texts: list[str], out: Path, vocab_size: int = 300, alphabet: str | None = None,
                   chat_template: str = CHATML):
    """Byte-level BPE with ChatML specials and `chat_template` (ChatML), saved to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    initial = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=sorted(initial, reverse=alphabet == "reversed"))
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)
    fast.chat_template = chat_template
    fast.save_pretrained(str(out))
    return fast


def with_template(tokenizer_dir: Path, template: str, out: Path):
    """The tokenizer in `tokenizer_dir` saved again to `out` with another chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = template
    tok.save_pretrained(str(out))
    return tok


def save_model(kind: str, vocab: int, out: Path, tokenizer=None, seed: int = 0, **over) -> Path:
    """A random stock-transformers causal LM of `kind` saved as a Hugging Face dir."""
    from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GenerationConfig,
                              GraniteConfig, GraniteForCausalLM, Llama4TextConfig, Llama4ForCausalLM, LlamaConfig,
                              LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    kinds = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
             "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
             "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM), "mixtral": (MixtralConfig, MixtralForCausalLM),
             "llama4": (Llama4TextConfig, Llama4ForCausalLM),
             # heads that do more than lm_head: Gemma 2's soft cap (30 by default), Cohere's and Granite's scales
             "gemma2": (Gemma2Config, Gemma2ForCausalLM), "cohere": (CohereConfig, CohereForCausalLM),
             "granite": (GraniteConfig, GraniteForCausalLM)}
    config_cls, model_cls = kinds[kind]
    fields = dict(TINY, vocab_size=vocab, num_hidden_layers=2)
    if kind == "qwen3_moe":
        fields.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    if kind == "mixtral":
        fields.update(num_local_experts=4, num_experts_per_tok=2)
    if kind == "llama4":
        fields.update(num_local_experts=4, intermediate_size_mlp=64, attention_chunk_size=8)
    if kind == "gemma2":
        fields.update(query_pre_attn_scalar=16, sliding_window=8)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**(fields | over)))
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    GenerationConfig(eos_token_id=2, bos_token_id=0, max_new_tokens=7, do_sample=False).save_pretrained(str(out))
    return out


def chat_rows() -> list[dict]:
    """Chat and instruction rows, with multi-turn conversations and a system prompt."""
    rows = []
    for i in range(60):
        a, b = i % 7, i % 5
        rows.append({"messages": [
            {"role": "system", "content": f"You are terse helper number {i}."},
            {"role": "user", "content": f"What is {a} plus {b}? Please explain the sum in words."},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}, because adding counts on."},
            {"role": "user", "content": "And times?"},
            {"role": "assistant", "content": f"{a} times {b} is {a * b}."},
        ]})
        rows.append({"prompt": f"Write the word for {i}: ", "completion": f"number {i} is written {i}."})
    return rows


def tool_row() -> dict:
    """An assistant tool call (no content), the tool's answer, the assistant's reply; `tools` beside."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    return {"messages": [{"role": "user", "content": "What is the weather in Paris?"},
                         {"role": "assistant", "tool_calls": [call]},
                         {"role": "tool", "name": "get_weather", "content": "sunny, 21 C"},
                         {"role": "assistant", "content": "It is sunny in Paris."}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                        "parameters": {"type": "object"}}}]}


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
