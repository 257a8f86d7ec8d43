"""Decode / teacher-forced parity on the target's own text (issue 15): the shipped reference EAGLE-3
drafter's first drafted token at every prefix of a greedy continuation is the argmax of its
teacher-forced step-0 logits at that position, so acceptance measured at decode time and agreement
measured in training count the same predictions."""

from __future__ import annotations

import pytest
import torch

from specdistill import config


@pytest.mark.embedded
def test_first_draft_token_equals_teacher_forced_step0_on_generated_text():
    from specdistill import targets
    from specdistill.loading import load_drafter
    from specdistill.verify.evaluate import encode_chat
    from specdistill.verify.proposer import ProposerOptions, ProposerState

    ref = config.REPO_ROOT / "reference" / "eagle3-smollm2-135m"
    target = targets.load("default")
    drafter = load_drafter(ref, target).float().eval()
    prompt = torch.tensor(encode_chat(target.tokenizer, [{"role": "user", "content": "Explain what a hash table is."}]))
    with torch.no_grad():
        seq = target.model.generate(prompt[None], max_new_tokens=40, do_sample=False)[0]
        tout = target(seq[None], torch.ones_like(seq)[None], layers=drafter.layer_ids, return_logits=False)
        hs = {i: h[0] for i, h in tout.hidden_states.items()}
        # teacher forcing, step 0: index i reads the target's feature at i and token i+1, predicts token i+2
        t = seq.numel()
        feats = drafter.target_features(tout.hidden_states)[:, : t - 1]
        emb = drafter.embed(seq[None, 1:])
        out, _ = drafter.layers_forward(drafter.step_input(feats, emb, 0), emb, torch.arange(t - 1)[None], None,
                                        causal=True)
        tf = drafter.draft_ids[drafter.draft_logits(out[0]).argmax(-1)]  # (T-1,) target ids
        pr = drafter.proposer(target, ProposerOptions(num_draft_tokens=1))
        p = prompt.numel()
        same, agree = 0, 0
        for n in range(p, t):  # prefix seq[:n] with the target features of its first n-1 tokens
            pr.reset(None)
            first = int(pr.propose(ProposerState(seq[:n], {i: h[:n - 1] for i, h in hs.items()})).tokens[0])
            same += first == int(tf[n - 2])
            agree += first == int(seq[n])
    n_pos = t - p
    assert same == n_pos, f"decode and teacher forcing disagree at {n_pos - same} of {n_pos} positions"
    assert agree >= 1  # a trained drafter predicts some of the target's own tokens
