"""Shared fixtures: a tiny random 2-layer llama built in-process (no hub, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

# A small ChatML-style template (SmolLM2/Qwen shape) and a Llama-3-style one, for mask tests.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def make_tokenizer(template: str = CHATML_TEMPLATE, fuse: bool = False):
    """A character-level-ish word-piece tokenizer built in-process, vocab < 128. `fuse`: decode without
    the spaces WordLevel puts between tokens, so decoded text re-tokenizes to the same ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'\n:-_|<>/")
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    if fuse:
        tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  eos_token="<|im_end|>" if "im_start" in template else "<|eot_id|>",
                                  bos_token="<|begin_of_text|>")
    tok.add_special_tokens({"additional_special_tokens": specials[2:]})
    tok.chat_template = template
    return tok


def make_llama(vocab_size: int = 128, hidden: int = 64, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=4, eos_token_id=3,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_target():
    from specdistill.targets import TargetModel

    return TargetModel(make_llama(), make_tokenizer(), name="tiny-llama")


@pytest.fixture
def tiny_conversations():
    """A few multi-turn conversations in ShareGPT shape."""
    return [
        {"id": f"c{i}", "conversations": [
            {"from": "human", "value": f"hello number {i}, how are you?"},
            {"from": "gpt", "value": f"i am fine {i}. thanks for asking!"},
            {"from": "human", "value": "tell me more"},
            {"from": "gpt", "value": "there is not much more to say " * (1 + i % 3)},
        ]}
        for i in range(24)
    ]


@pytest.fixture
def sharegpt_file(tmp_path, tiny_conversations):
    p = tmp_path / "convs.json"
    p.write_text(json.dumps(tiny_conversations))
    return p


def write_tiny_run_inputs(root):
    """A 4-layer tiny target saved as a model dir, 40 arithmetic conversations (ShareGPT JSONL) and a
    one-question Spec-Bench-style file: what recipe-level tests point `target.name`, `data.source`
    and `eval.questions` at. Returns (target_dir, conversations_file, questions_file)."""
    from pathlib import Path

    root = Path(root)
    make_llama(layers=4).save_pretrained(root / "target")
    make_tokenizer().save_pretrained(root / "target")
    convs = root / "convs.jsonl"
    convs.write_text("".join(json.dumps({"conversations": [
        {"from": "human", "value": f"what is {i} plus {i}?"},
        {"from": "gpt", "value": f"{i} plus {i} is {2 * i}. " + "ok " * (i % 5)}]}) + "\n" for i in range(40)))
    questions = root / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "math", "turns": ["what is 3 plus 3?"]}) + "\n")
    return root / "target", convs, questions
