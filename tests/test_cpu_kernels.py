"""The small-batch CPU linear kernel (specdistill/cpu_kernels.py): exact where it runs, absent elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_llama

from specdistill import cpu_kernels
from specdistill.targets import TargetModel
from specdistill.verify.proposers import DraftModelProposer
from specdistill.verify.verifier import Verifier

pytestmark = pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None,
                                reason=f"kernel not usable here: {cpu_kernels.unavailable_reason()}")


@pytest.fixture(scope="module")
def ext():
    e = cpu_kernels.load_extension()
    # On an x86-64 CPU with AVX2/FMA the build must work: a failure here is a real failure, not a skip.
    assert e is not None, cpu_kernels._why_not
    return e


@pytest.mark.parametrize("K", [8, 64, 576])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_torch_linear_for_every_row_count(ext, K, bias):
    g = torch.Generator().manual_seed(K)
    w = torch.randn(203, K, generator=g)  # odd N: the single-row tail path is exercised
    b = torch.randn(203, generator=g) if bias else None
    for M in range(1, 15):
        x = torch.randn(M, K, generator=g)
        y = cpu_kernels.small_linear(x, w, b)
        ref = F.linear(x.double(), w.double(), None if b is None else b.double()).float()
        assert y.shape == (M, 203)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * K ** 0.5)


def test_rows_are_bit_identical_alone_or_batched(ext):
    """The property the verifier relies on: a token's logits do not depend on how many tokens share the pass."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1001, 576, generator=g)
    x = torch.randn(32, 576, generator=g)
    alone = torch.cat([cpu_kernels.small_linear(x[i:i + 1], w) for i in range(32)])
    for M in (2, 3, 5, 6, 7, 13, 32):
        assert torch.equal(cpu_kernels.small_linear(x[:M], w), alone[:M]), M
    # a 3-D input (batch, seq, hidden) gives the same rows, in the input's shape
    y3 = cpu_kernels.small_linear(x[:6].view(2, 3, 576), w)
    assert y3.shape == (2, 3, 1001) and torch.equal(y3.reshape(6, -1), alone[:6])


def test_thread_split_does_not_change_results(ext):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4096, 64, generator=g)
    x = torch.randn(5, 64, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.small_linear(x, w)
        torch.set_num_threads(2)
        two = cpu_kernels.small_linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_module_routes_only_eligible_calls(ext):
    lin = torch.nn.Linear(64, 40, bias=True)
    ref_sd = {k: v.clone() for k, v in lin.state_dict().items()}
    wrapper = torch.nn.Sequential(lin)
    assert cpu_kernels.enable(wrapper) == 1
    assert type(lin) is cpu_kernels.SmallBatchLinear and isinstance(lin, torch.nn.Linear)
    assert all(torch.equal(v, ref_sd[k]) for k, v in lin.state_dict().items())
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(lin(x), cpu_kernels.small_linear(x, lin.weight, lin.bias))
        big = torch.randn(cpu_kernels.DEFAULT_MAX_ROWS + 1, 64)
        assert torch.equal(lin(big), F.linear(big, lin.weight, lin.bias))  # many rows: BLAS
    # autograd through the layer takes torch's path and its gradients are right
    xg = torch.randn(2, 64, requires_grad=True)
    lin(xg).sum().backward()
    torch.testing.assert_close(xg.grad, lin.weight.sum(0).expand(2, 64))
    assert lin.weight.grad is not None
    # bf16 and an inner size that is not a multiple of 8 are not eligible
    assert not cpu_kernels.eligible(x.bfloat16(), lin.weight.bfloat16(), None, 32)
    assert not cpu_kernels.eligible(torch.randn(2, 60), torch.randn(4, 60), None, 32)
    assert cpu_kernels.disable(wrapper) == 1 and type(lin) is torch.nn.Linear


def test_verifier_with_kernel_is_identical_to_greedy_and_to_blas(ext):
    """A tiny llama (hidden 64) under the kernel: plain decoding, an oracle-free random draft model and a
    tree all give the same greedy tokens, and those match the BLAS-run target's."""
    model = make_llama(seed=11)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20.0)  # sharp logits (see test_verify.sharp_target)
    target = TargetModel(model, None, name="tiny-sharp")
    torch.manual_seed(5)
    prompt = torch.randint(8, 128, (12,)).tolist()
    ver = Verifier(target)
    blas = ver.generate(prompt, None, max_new_tokens=40, eos_token_ids=()).tokens
    assert cpu_kernels.enable(model) > 0
    try:
        plain = ver.generate(prompt, None, max_new_tokens=40, eos_token_ids=())
        assert plain.tokens == blas
        for kw in ({"num_draft_tokens": 4}, {"num_draft_tokens": 3, "tree": (2, 2, 1)}):
            draft = DraftModelProposer(make_llama(seed=7), **kw)
            res = ver.generate(prompt, draft, max_new_tokens=40, eos_token_ids=())
            assert res.tokens == plain.tokens, kw
    finally:
        cpu_kernels.disable(model)


def test_off_switch(monkeypatch):
    monkeypatch.setenv("SPECDISTILL_CPU_KERNELS", "off")
    assert "SPECDISTILL_CPU_KERNELS" in cpu_kernels.unavailable_reason()
