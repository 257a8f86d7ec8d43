"""hf_draft export: a standard HF draft model (files, contracts, reload, card, HF assisted generation)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_llama, make_tokenizer

from specdistill import drafters, loading
from specdistill.config import ExportConfig
from specdistill.drafters.small_lm import SmallLMConfig
from specdistill.export import ContractError, card, hf_draft, write
from specdistill.targets import TargetModel


@pytest.fixture
def saved_target(tmp_path):
    from transformers import AutoTokenizer

    d = tmp_path / "tgt"
    make_llama(layers=4, seed=1).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return TargetModel(make_llama(layers=4, seed=1), AutoTokenizer.from_pretrained(str(d)), name="tiny4"), d


def _trained_draft(target):
    d = drafters.build(SmallLMConfig(keep_layers=[0, 2], loss="forward_kl"), target)
    with torch.no_grad():
        for p in d.lm.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return d


def test_export_files_reload_and_transformers_read_it(saved_target, tmp_path):
    from transformers import AutoModelForCausalLM

    target, tdir = saved_target
    d = _trained_draft(target)
    out = write(d, ExportConfig(formats=["hf_draft"], dtype="float32"), tmp_path / "export", target)["hf_draft"]
    tok_files = [f for f in hf_draft.TOKENIZER_FILES if (tdir / f).is_file()]
    assert tok_files and all((out / f).read_bytes() == (tdir / f).read_bytes() for f in tok_files)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == target.vocab_size and cfg["num_hidden_layers"] == 2
    gc = json.loads((out / "generation_config.json").read_text())
    assert gc["num_assistant_tokens"] == hf_draft.DEFAULT_DRAFT_TOKENS and gc["num_assistant_tokens_schedule"] == "constant"
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(8, 128, (1, 11))
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, d.lm.eval()(input_ids=ids).logits)
    back = loading.load_drafter(out, target)
    assert back.cfg.loss == "forward_kl" and back.cfg.keep_layers == [0, 2]
    for (k, a), (_, b) in zip(d.lm.state_dict().items(), back.lm.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # the measured draft length goes into generation_config.json
    (out / "eval.json").write_text(json.dumps({"settings": {"num_draft_tokens": 5, "draft_confidence": 0.3}}))
    hf_draft.sync_generation_config(out)
    gc = json.loads((out / "generation_config.json").read_text())
    assert gc["num_assistant_tokens"] == 5 and gc["assistant_confidence_threshold"] == 0.3
    # the card: exact vLLM draft_model and SGLang STANDALONE lines, HF assisted generation
    text = card.build_card(out, "me/smol-draft")
    assert "--speculative-config '{\"method\":\"draft_model\",\"model\":\"me/smol-draft\",\"num_speculative_tokens\":5}'" in text
    assert "--speculative-algorithm STANDALONE" in text and "--speculative-draft-model-path me/smol-draft" in text
    assert "assistant_model=draft" in text
    assert "Warning" in card.build_card(out, "me/eagle3-smol")


def test_contracts_refuse_vllm_path_triggers_and_foreign_vocabulary(saved_target, tmp_path):
    target, _ = saved_target
    d = _trained_draft(target)
    for bad in ("eagle3", "my-eagle-x", "dflash", "DSpark"):
        with pytest.raises(ContractError, match="vLLM switch"):
            write(d, ExportConfig(formats=["hf_draft"]), tmp_path / bad, target)
        assert not (tmp_path / bad / "hf_draft").exists()
    cfg, tensors = hf_draft.build(d, target, "float32")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:100]
    with pytest.raises(ContractError, match="differ from the target's 128"):
        hf_draft.check(cfg, tensors, 4)


def test_hf_assisted_generation_with_the_export_equals_greedy(saved_target, tmp_path):
    from transformers import AutoModelForCausalLM

    target, _ = saved_target
    d = _trained_draft(target)
    out = write(d, ExportConfig(formats=["hf_draft"], dtype="float32"), tmp_path / "export", target)["hf_draft"]
    draft = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(8, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    plain = target.model.generate(ids, **kw)
    assisted = target.model.generate(ids, assistant_model=draft, **kw)
    assert torch.equal(plain, assisted)


@pytest.mark.embedded
def test_real_target_hf_assisted_generation_with_a_distilled_export_equals_greedy(tmp_path):
    """The real client: a pruned 4-layer SmolLM2 draft, briefly distilled (forward KL on the target's own
    greedy answer), exported as hf_draft, loaded by transformers and used as `assistant_model`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdistill import targets

    target = targets.load("default")
    tok = target.tokenizer
    prompts = ["Write a haiku about the sea.", "List three uses of a paperclip."]
    encs = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                    return_tensors="pt") for p in prompts]
    encs = [(e["input_ids"] if hasattr(e, "keys") else e) for e in encs]
    kw = dict(max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        plain = [target.model.generate(e, **kw) for e in encs]
    d = drafters.build(SmallLMConfig(keep_layers=[0, 1, 2, 3], loss="forward_kl"), target)
    seq = plain[0][0]
    lm = torch.zeros_like(seq)
    lm[encs[0].shape[1]:] = 1
    b = {"input_ids": seq[None], "attention_mask": torch.ones_like(seq)[None], "loss_mask": lm[None]}
    tout = target(b["input_ids"], b["attention_mask"], return_logits=False)
    opt = torch.optim.Adam(d.trainable_parameters(), lr=1e-4)
    first = None
    for _ in range(4):
        lo = d.loss(b, tout)
        opt.zero_grad()
        (lo.loss / lo.num_tokens).backward()
        opt.step()
        first = first if first is not None else float(lo.loss.detach())
    assert float(d.loss(b, tout).loss.detach()) < first
    out = write(d, ExportConfig(formats=["hf_draft"], dtype="float32"), tmp_path / "smol-draft", target)["hf_draft"]
    assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == tok.get_vocab()
    draft = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert draft.config.vocab_size == target.vocab_size == 49152
    with torch.no_grad():
        for e, ref in zip(encs, plain, strict=True):
            assert torch.equal(target.model.generate(e, assistant_model=draft, **kw), ref)
