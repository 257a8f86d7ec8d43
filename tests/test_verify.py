"""The verifier is lossless: greedy output == target greedy; sampling marginals == target softmax."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_llama

from specdistill.targets import TargetModel
from specdistill.verify import sampling
from specdistill.verify import tree as treeops
from specdistill.verify.proposer import DraftTree, Proposer, ProposerState
from specdistill.verify.proposers import DraftModelProposer, PromptLookupProposer
from specdistill.verify.verifier import Verifier

NO_EOS: tuple[int, ...] = ()


def reference_greedy(model, prompt, n):
    """Target greedy decoding by full forwards without a cache: the ground truth."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


class Oracle(Proposer):
    """Proposes the target's own continuation (k tokens), optionally hiding it among wrong siblings."""

    def __init__(self, prompt_len, ref, k, wrong=False, decoys=0, vocab=128):
        self.p, self.ref, self.k, self.wrong, self.decoys, self.vocab = prompt_len, ref, k, wrong, decoys, vocab

    def propose(self, state):
        done = state.tokens.numel() - self.p
        nxt = self.ref[done:done + self.k]
        if self.wrong:
            return DraftTree.chain([(t + 1) % self.vocab for t in nxt])
        if not self.decoys:
            return DraftTree.chain(nxt)
        tokens, parents, parent = [], [], -1
        for t in nxt:  # at every depth: `decoys` wrong siblings first, then the right token
            for d in range(self.decoys):
                tokens.append((t + 1 + d) % self.vocab)
                parents.append(parent)
            tokens.append(t)
            parents.append(parent)
            parent = len(tokens) - 1
        return DraftTree(torch.tensor(tokens), torch.tensor(parents))


class NoisyTree(Proposer):
    """A random tree whose nodes are right with probability 0.6; exercises partial acceptance."""

    def __init__(self, prompt_len, ref, size=7, seed=0, vocab=128):
        self.p, self.ref, self.size, self.vocab = prompt_len, ref, size, vocab
        self.g = torch.Generator().manual_seed(seed)

    def propose(self, state):
        done = state.tokens.numel() - self.p
        tokens, parents, depth = [], [], []
        for i in range(self.size):
            par = int(torch.randint(-1, i, (1,), generator=self.g)) if i else -1
            d = 1 if par < 0 else depth[par] + 1
            good = done + d - 1 < len(self.ref) and float(torch.rand(1, generator=self.g)) < 0.6
            tokens.append(self.ref[done + d - 1] if good else int(torch.randint(0, self.vocab, (1,), generator=self.g)))
            parents.append(par)
            depth.append(d)
        return DraftTree(torch.tensor(tokens), torch.tensor(parents))


def sharp_target(vocab_size=128, hidden=64, seed=0, scale=20.0):
    """The tiny llama with its matrices scaled up: at the default init its greedy output is one token
    repeated, which would let a wrong cache or position bug pass unnoticed."""
    model = make_llama(vocab_size=vocab_size, hidden=hidden, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return TargetModel(model, None, name="tiny-sharp")


@pytest.fixture
def setup():
    target = sharp_target()
    torch.manual_seed(3)
    prompt = torch.randint(8, 128, (12,)).tolist()
    ref = reference_greedy(target.model, prompt, 40)
    assert len(set(ref)) > 20
    return target, Verifier(target), prompt, ref


def test_plain_decoding_matches_reference(setup):
    target, ver, prompt, ref = setup
    res = ver.generate(prompt, None, max_new_tokens=40, eos_token_ids=NO_EOS)
    assert res.tokens == ref and res.steps == 40 and res.tau == 1.0


@pytest.mark.parametrize("k", [1, 3, 5])
def test_oracle_chain_tau_is_k_plus_one(setup, k):
    target, ver, prompt, ref = setup
    res = ver.generate(prompt, Oracle(len(prompt), ref, k), max_new_tokens=40, eos_token_ids=NO_EOS)
    assert res.tokens == ref
    assert all(a == k + 1 for a in res.accepted_per_step[:-1])
    assert res.steps == math.ceil(40 / (k + 1))


def test_oracle_tree_with_decoys_accepts_whole_path(setup):
    target, ver, prompt, ref = setup
    res = ver.generate(prompt, Oracle(len(prompt), ref, 4, decoys=2), max_new_tokens=40, eos_token_ids=NO_EOS)
    assert res.tokens == ref
    assert all(a == 5 for a in res.accepted_per_step[:-1])
    assert res.draft_size_per_step[0] == 12


def test_always_wrong_gives_tau_one(setup):
    target, ver, prompt, ref = setup
    res = ver.generate(prompt, Oracle(len(prompt), ref, 4, wrong=True), max_new_tokens=40, eos_token_ids=NO_EOS)
    assert res.tokens == ref and res.tau == 1.0 and res.steps == 40
    assert set(res.draft_accepted_per_step) == {0} and set(res.draft_offered_per_step[:-1]) == {1}


def test_noisy_tree_and_random_draft_model_are_lossless(setup):
    target, ver, prompt, ref = setup
    res = ver.generate(prompt, NoisyTree(len(prompt), ref), max_new_tokens=40, eos_token_ids=NO_EOS)
    assert res.tokens == ref
    assert res.steps < 40  # some draft tokens were accepted, through gathered (non-prefix) paths
    draft = DraftModelProposer(make_llama(seed=7), num_draft_tokens=4)
    res = ver.generate(prompt, draft, max_new_tokens=40, eos_token_ids=NO_EOS)
    assert res.tokens == ref
    draft = DraftModelProposer(make_llama(seed=7), num_draft_tokens=4, confidence_threshold=0.02)
    res = ver.generate(prompt, draft, max_new_tokens=40, eos_token_ids=NO_EOS)
    assert res.tokens == ref and min(res.draft_size_per_step) < 4  # some drafts stopped early


def test_draft_model_that_is_the_target_is_always_accepted(setup):
    target, ver, prompt, ref = setup
    res = ver.generate(prompt, DraftModelProposer(target.model, num_draft_tokens=3), max_new_tokens=40,
                       eos_token_ids=NO_EOS)
    assert res.tokens == ref and all(a == 4 for a in res.accepted_per_step[:-1])


def test_draft_model_tree_is_lossless(setup):
    target, ver, prompt, ref = setup
    res = ver.generate(prompt, DraftModelProposer(make_llama(seed=7), tree=(3, 2, 1)), max_new_tokens=30,
                       eos_token_ids=NO_EOS)
    assert res.tokens == ref[:30] and res.draft_size_per_step[0] == 3 + 6 + 6
    # The target as its own tree draft: its top-1 child is always right, so tau = depth + 1.
    res = ver.generate(prompt, DraftModelProposer(target.model, tree=(2, 2, 1)), max_new_tokens=30,
                       eos_token_ids=NO_EOS)
    assert res.tokens == ref[:30] and all(a == 4 for a in res.accepted_per_step[:-1])


def test_prompt_lookup_is_lossless_and_drafts_repeats(setup):
    target, ver, prompt, ref = setup
    rep = prompt + prompt + prompt[:6]
    ref2 = reference_greedy(target.model, rep, 30)
    for branches in (1, 3):
        res = ver.generate(rep, PromptLookupProposer(4, branches=branches), max_new_tokens=30, eos_token_ids=NO_EOS)
        assert res.tokens == ref2
    state = ProposerState(torch.tensor([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3]))
    d = PromptLookupProposer(2, branches=2).propose(state)
    assert d.tokens.tolist() == [7, 1, 9, 1] and d.parents.tolist() == [-1, 0, -1, 2]


def test_eos_inside_accepted_draft_stops_there(setup):
    target, ver, prompt, ref = setup
    eos = ref[6]
    first = ref.index(eos)
    res = ver.generate(prompt, Oracle(len(prompt), ref, 5), max_new_tokens=40, eos_token_ids=[eos])
    assert res.tokens == ref[:first + 1] and res.stop_reason == "eos"
    plain = ver.generate(prompt, None, max_new_tokens=40, eos_token_ids=[eos])
    assert plain.tokens == res.tokens


def test_max_new_tokens_is_exact(setup):
    target, ver, prompt, ref = setup
    for n in (1, 2, 7):
        res = ver.generate(prompt, Oracle(len(prompt), ref, 5), max_new_tokens=n, eos_token_ids=NO_EOS)
        assert res.tokens == ref[:n] and res.stop_reason == "length"


class HiddenChecker(Proposer):
    """Checks that ProposerState.hidden equals a fresh forward's states and that the logits they give
    equal a fresh forward's logits on the accepted prefix (so the KV cache was rolled back right)."""

    def __init__(self, target, inner, layers):
        self.target, self.inner, self.target_layers = target, inner, tuple(layers)
        self.checked = 0
        self.calls = 0

    def propose(self, state):
        self.calls += 1
        toks = state.tokens
        L = toks.numel()
        assert state.hidden, "no hidden states handed over"
        fresh = self.target.forward(toks[None, :L - 1], layers=self.target_layers)
        for i, h in state.hidden.items():
            m = h.shape[0]
            torch.testing.assert_close(h, fresh.hidden_states[i][0, L - 1 - m:], atol=1e-3, rtol=1e-3)
        n = self.target.num_layers
        if n in state.hidden:
            logits = self.target.lm_head(self.target.final_norm(state.hidden[n]))
            torch.testing.assert_close(logits, fresh.logits[0, L - 1 - logits.shape[0]:], atol=1e-3, rtol=1e-3)
        self.checked += 1
        return self.inner.propose(state)


def test_hidden_states_and_rollback_match_fresh_forward(setup):
    target, ver, prompt, ref = setup
    for inner in (NoisyTree(len(prompt), ref, seed=1), Oracle(len(prompt), ref, 3, decoys=1)):
        checker = HiddenChecker(target, inner, [0, 1, 2])
        res = ver.generate(prompt, checker, max_new_tokens=25, eos_token_ids=NO_EOS)
        assert res.tokens == ref[:25]
        # the first pass is the prefill (no features yet); a last pass with one token left drafts nothing
        assert checker.checked in (res.steps - 1, res.steps - 2)
        assert res.draft_size_per_step[0] == 0


# ---------------------------------------------------------------- sampling (lossless rule)

V = 6


class FixedSampler(Proposer):
    """Draws drafts from a fixed distribution q (different from the target's), reporting q."""

    def __init__(self, q, shape, replacement=True, deterministic=False, seed=0):
        self.q, self.shape, self.replacement, self.deterministic = q, shape, replacement, deterministic
        self.g = torch.Generator().manual_seed(seed)

    def propose(self, state):
        tokens, parents, rows = [], [], []
        frontier = [-1]
        for depth, width in enumerate(self.shape):
            q = self.q[depth]
            nxt = []
            for par in frontier:
                qq = q.clone()
                for _ in range(width):
                    if self.deterministic:
                        x = int(qq.argmax())
                    else:
                        x = int(torch.multinomial(qq, 1, generator=self.g))
                    tokens.append(x)
                    parents.append(par)
                    rows.append(qq.clone())
                    nxt.append(len(tokens) - 1)
                    if not self.replacement or self.deterministic:
                        qq[x] = 0
                        qq = qq / qq.sum()
            frontier = nxt
        probs = None if self.deterministic else torch.stack(rows)
        return DraftTree(torch.tensor(tokens), torch.tensor(parents), probs)


def chi2_critical(df, z=3.29):
    """Wilson-Hilferty approximation of the chi-square quantile (z=3.29: p = 0.0005)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_matches(counts, probs):
    """Chi-square goodness of fit of sample counts to exact probabilities (cells pooled below 5)."""
    n = counts.sum()
    expected = probs * n
    assert counts[expected == 0].sum() == 0, "sampled a token the target gives probability 0"
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    assert stat < chi2_critical(df), f"chi2={stat:.1f} df={df}"


def target_rows(target, prompt, temp, top_k):
    """Exact target distributions of the first token and of the second given the first."""
    with torch.no_grad():
        p1 = sampling.warp(target.model(torch.tensor([prompt])).logits[0, -1], temp, 1.0, top_k)
        p2 = torch.stack([sampling.warp(target.model(torch.tensor([prompt + [a]])).logits[0, -1], temp, 1.0, top_k)
                          for a in range(V)])
    return p1, p2


def draft_q(depth):
    g = torch.Generator().manual_seed(5)
    return [torch.softmax(3 * torch.randn(V, generator=g), 0) for _ in range(depth)]  # far from the target


@pytest.mark.parametrize("shape,replacement,deterministic,temp,top_k", [
    ((3,), True, False, 1.0, 0),       # three i.i.d. siblings (SpecInfer multi-step sampling)
    ((1, 1), True, False, 1.0, 0),     # plain chain: Leviathan / Chen rule
    ((2, 2), False, False, 0.8, 4),    # tree, siblings drawn without replacement, warped target
    ((2, 1), True, True, 1.0, 0),      # deterministic tree (probs=None: one-hot q)
])
def test_tree_rejection_sampling_is_lossless(shape, replacement, deterministic, temp, top_k):
    """The acceptance rule alone, many samples: P(first two tokens) == the target's joint."""
    target = sharp_target(vocab_size=V, hidden=32, seed=11, scale=4.0)
    prompt = [1, 4, 2, 5]
    p1, p2 = target_rows(target, prompt, temp, top_k)
    prop = FixedSampler(draft_q(len(shape)), shape, replacement, deterministic, seed=1)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V * V)
    for _ in range(4000):
        d = prop.propose(None)
        toks, par = d.tokens.tolist(), d.parents.tolist()
        # Row 0: the root; row c+1: node c, whose context is prompt + path to c.
        rows = [p1] + [p2[toks[c]] if par[c] < 0 else p2[0] for c in range(len(toks))]
        path, bonus = sampling.accept_sampling(torch.stack(rows), toks, treeops.children(par), d.probs, g)
        seq = [toks[c] for c in path] + [bonus]
        if len(seq) == 1:  # the verifier's next step samples token 2 from the target itself
            seq.append(int(torch.multinomial(p2[seq[0]], 1, generator=g)))
        counts[seq[0] * V + seq[1]] += 1
    assert_matches(counts, (p1[:, None] * p2).flatten())


@pytest.fixture
def one_thread():
    """Tiny matmuls are dominated by thread hand-off on a shared 2-core box; one thread is faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_verifier_sampling_end_to_end_matches_target(one_thread):
    """Through the whole verifier (cache, tree mask, seeds): first two tokens follow the target."""
    target = sharp_target(vocab_size=V, hidden=32, seed=11, scale=4.0)
    ver = Verifier(target)
    prompt = [1, 4, 2, 5]
    p1, p2 = target_rows(target, prompt, 0.9, 0)
    prop = FixedSampler(draft_q(2), (2, 1), replacement=True, seed=2)
    counts = torch.zeros(V * V)
    for s in range(600):
        res = ver.generate(prompt, prop, max_new_tokens=3, temperature=0.9, seed=s, eos_token_ids=NO_EOS)
        counts[res.tokens[0] * V + res.tokens[1]] += 1
    assert_matches(counts, (p1[:, None] * p2).flatten())


def test_warp_top_p_keeps_smallest_set():
    probs = sampling.warp(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), 1.0, top_p=0.8)
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    probs = sampling.warp(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), 1.0, top_p=0.81)
    assert probs[2] > 0 and probs[3] == 0
