"""The adaptive speculation policy: how many draft tokens to verify next, or none (a plain step).

    policy = AdaptivePolicy(VerifyCost.load_or_measure(target, 8), max_tokens=5)
    Verifier(target).generate(ids, proposer, policy=policy)      # eval --adaptive / eval.adaptive

It is an expected-tokens-per-second model in the spirit of vLLM's dynamic speculative decoding
and DSpark:

    rate(k) = E[new tokens | draft length k] / (t_draft(k) + t_verify(k)),     k = 0 .. max_tokens
    E[new tokens | k] = 1 + sum_{j<=k} prod_{i<=j} alpha_i                     (bonus token counted)

- t_verify(k): the target's cost of a pass over 1 + k tokens (the verify-cost curve, measured once per
  target/machine/thread count by `VerifyCost.measure` and cached under ~/.cache/specdistill/verify_cost),
  times one online scale factor (observed verify time / curve), so machine load and context length are
  tracked. t_verify(0) is a plain step.
- t_draft(k): the proposer's cost, fitted online as a + b*k on the drafts of this request.
- alpha_i: the drafter's conditional acceptance at draft position i, counted from the accepted lengths
  so far with exponential decay (0.95 per observation; Beta(1, 1) prior); a new request starts from the
  previous requests' estimate with its weight capped, so it is re-estimated per request.
- While plain passes win, the counts also age by `idle_decay` per pass (the bound widens again).
- t_draft is fitted on steady drafts only: a draft right after plain passes also commits their positions.
  That extra (mean of recent catch-ups) is charged when deciding whether to resume drafting after plain
  passes, so a drafter whose catch-up is a prompt prefill (a separate draft model) is not resumed on
  optimism alone; the gap probes still run.

The policy picks argmax rate(k) with each alpha_i raised by `optimism` posterior standard deviations
(optimism under uncertainty, as in UCB bandits: a drafter near break-even is tried until its estimate is
sure); drafting must beat the plain rate by `margin`. While plain wins it
probes a 1-token draft now and then (the gap doubles after each probe that does not pay, up to
`max_gap`) so a drafter that starts agreeing is noticed. It is lossless by construction: it only sets
the draft length from what happened in earlier passes; which tokens are accepted stays the verifier's
greedy / rejection-sampling rule.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdistill import cpu_kernels

CACHE_VERSION = 1


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cost_key(target) -> dict:
    """What the verify-cost curve depends on: the target's shape and dtype, device, threads, CPU, torch."""
    cfg = target.model.config
    dev = target.device
    gpu = torch.cuda.get_device_name(dev) if getattr(dev, "type", str(dev)) == "cuda" else ""
    return {"version": CACHE_VERSION, "target": str(target.name), "model_type": getattr(cfg, "model_type", ""),
            "hidden": getattr(cfg, "hidden_size", 0), "layers": getattr(cfg, "num_hidden_layers", 0),
            "vocab": target.vocab_size, "dtype": str(next(target.model.parameters()).dtype), "device": str(dev),
            "gpu": gpu, "threads": torch.get_num_threads(), "cpu": _cpu_name(), "torch": torch.__version__,
            "cpu_kernels": cpu_kernels.enabled_count(target.model)}


def default_cache_dir() -> Path:
    root = os.environ.get("SPECDISTILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "specdistill")
    return Path(root) / "verify_cost"


@dataclass
class VerifyCost:
    """seconds[n]: one target pass over n tokens (n = 1 .. len-1; index 0 unused) after `context` cached ones."""

    seconds: list[float]
    context: int = 0
    key: dict = field(default_factory=dict)

    def __call__(self, n_tokens: int) -> float:
        n = max(1, n_tokens)
        if n < len(self.seconds):
            return self.seconds[n]
        # past the measured range: extend linearly from the last two points
        a, b = self.seconds[-2], self.seconds[-1]
        return b + (n - len(self.seconds) + 1) * max(b - a, 0.0)

    @classmethod
    @torch.inference_mode()
    def measure(cls, target, max_tokens: int = 8, context: int = 128, repeats: int = 5) -> VerifyCost:
        """Time one cached target pass over 1 .. max_tokens+1 tokens (median of `repeats`, interleaved)."""
        from transformers import DynamicCache

        model = target.model
        dev = target.device
        gen = torch.Generator().manual_seed(0)
        ctx = torch.randint(0, target.vocab_size, (1, context), generator=gen).to(dev)
        sizes = list(range(1, max_tokens + 2))
        times: dict[int, list[float]] = {n: [] for n in sizes}
        cache = DynamicCache(config=model.config)
        model.model(input_ids=ctx, cache=cache, use_cache=True)
        for r in range(repeats + 1):  # the first round is a warm-up
            for n in sizes:
                ids = torch.randint(0, target.vocab_size, (1, n), generator=gen).to(dev)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                h = model.model(input_ids=ids, cache=cache, use_cache=True).last_hidden_state
                model.lm_head(h[0])
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                dt = time.perf_counter() - t0
                cache.crop(-n)
                if r:
                    times[n].append(dt)
        med = [0.0] + [sorted(times[n])[len(times[n]) // 2] for n in sizes]
        for i in range(2, len(med)):  # a pass over more tokens never costs less (noise guard)
            med[i] = max(med[i], med[i - 1])
        return cls(med, context, cost_key(target))

    @classmethod
    def load_or_measure(cls, target, max_tokens: int = 8, cache_dir: str | Path | None = None) -> VerifyCost:
        """The cached curve for this target/machine/thread count, measured (and cached) when missing."""
        key = cost_key(target)
        d = Path(cache_dir) if cache_dir else default_cache_dir()
        path = d / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".json")
        try:
            rec = json.loads(path.read_text())
            if rec.get("key") == key and len(rec["seconds"]) >= max_tokens + 2:
                return cls([float(s) for s in rec["seconds"]], int(rec.get("context", 0)), key)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        curve = cls.measure(target, max_tokens)
        try:
            from specdistill import fsutil

            d.mkdir(parents=True, exist_ok=True)
            fsutil.atomic_write_text(path, json.dumps({"key": key, "seconds": curve.seconds,
                                                       "context": curve.context}, indent=1))
        except OSError:
            pass  # a read-only cache only costs a re-measurement next time
        return curve


class AdaptivePolicy:
    """Chooses the draft length of each pass (0 = plain step) from the cost curve and online acceptance.

    One instance serves many requests (its estimates carry over, weakened); the verifier calls
    `start()` per request, `choose(limit)` before each pass and `observe(...)` after it.
    """

    def __init__(self, cost: VerifyCost, max_tokens: int = 5, margin: float = 0.03, decay: float = 0.95,
                 carry_weight: float = 8.0, min_gap: int = 4, max_gap: int = 64, optimism: float = 1.0,
                 idle_decay: float = 0.998):
        if max_tokens < 1:
            raise ValueError(f"AdaptivePolicy: max_tokens must be >= 1, got {max_tokens}")
        if (not 0 < decay <= 1 or not 0 < idle_decay <= 1 or margin < 0 or min_gap < 1 or max_gap < min_gap
                or optimism < 0):
            raise ValueError(f"AdaptivePolicy: bad settings decay={decay} idle_decay={idle_decay} margin={margin} "
                             f"gap={min_gap}..{max_gap} optimism={optimism}")
        self.cost, self.max_tokens, self.margin, self.decay = cost, max_tokens, margin, decay
        self.carry_weight, self.min_gap, self.max_gap = carry_weight, min_gap, max_gap
        self.optimism, self.idle_decay = optimism, idle_decay
        self._catch_up = True  # the next draft also commits the positions of a prompt / of plain passes
        self._catch_up_pass = False  # the pass just chosen is such a catch-up draft
        K = max_tokens
        self.acc = [0.0] * (K + 1)  # decayed accepted / offered counts per draft position (index 1..K)
        self.off = [0.0] * (K + 1)
        self.nodes = [float(k) for k in range(K + 1)]  # draft nodes sent when the depth is k (chains: k)
        self.scale = 1.0  # observed verify time / curve
        self._draft_obs: list[tuple[float, float]] = []  # (k, seconds), recent steady drafts
        self._catch_obs: list[float] = []  # extra seconds of recent catch-up drafts over a steady one
        self.gap = min_gap
        self.since_draft = 0
        self.choices: list[int] = []  # every decision, for reports

    # -- per request -------------------------------------------------------------------------
    def start(self) -> None:
        """A new request: keep the estimates as a prior of at most `carry_weight` observations per position."""
        for i in range(1, self.max_tokens + 1):
            if self.off[i] > self.carry_weight:
                f = self.carry_weight / self.off[i]
                self.off[i] *= f
                self.acc[i] *= f
        self._draft_obs = self._draft_obs[-4:]
        self.since_draft = 0
        self._catch_up = True

    # -- the model -------------------------------------------------------------------------
    def alpha(self) -> list[float]:
        """alpha_1..alpha_K, posterior means. Position 1 has a Beta(1, 1) prior; position i > 1 a prior of
        weight 2 centred on alpha_{i-1}, so a drafter that is good at position 1 gets its longer drafts
        tried (and measured) instead of being held back by an uninformed 0.5 further out."""
        out, prior = [], 0.5
        for i in range(1, self.max_tokens + 1):
            a = (self.acc[i] + 2.0 * prior) / (self.off[i] + 2.0)
            out.append(a)
            prior = a
        return out

    def alpha_optimistic(self) -> list[float]:
        """alpha_i plus `optimism` posterior standard deviations (capped at 1): what the decisions use.
        A drafter near break-even keeps being tried until its estimate is certain, instead of being shut
        out by a few unlucky probes whose rejections then double the probe gap; a clearly bad drafter's
        bound stays low (an untrained one at alpha ~0.02 has a bound of ~0.05)."""
        out = []
        for i, a in enumerate(self.alpha(), start=1):
            n = self.off[i] + 3.0  # Beta posterior with the weight-2 prior
            out.append(min(1.0, a + self.optimism * (a * (1.0 - a) / n) ** 0.5))
        return out

    def expected_tokens(self, k: int, optimistic: bool = False) -> float:
        e, p = 1.0, 1.0
        for a in (self.alpha_optimistic() if optimistic else self.alpha())[:k]:
            p *= a
            e += p
        return e

    def draft_seconds(self, k: int) -> float:
        """a + b*k least squares over recent drafts; None-free: 0 before the first draft (optimistic)."""
        obs = self._draft_obs
        if k == 0 or not obs:
            return 0.0
        ks = {o[0] for o in obs}
        if len(ks) == 1:
            per = sum(t / max(kk, 1.0) for kk, t in obs) / len(obs)
            return per * k
        n = len(obs)
        mk = sum(o[0] for o in obs) / n
        mt = sum(o[1] for o in obs) / n
        var = sum((o[0] - mk) ** 2 for o in obs)
        b = sum((o[0] - mk) * (o[1] - mt) for o in obs) / var
        b = max(b, 0.0)
        a = max(mt - b * mk, 0.0)
        return a + b * k

    def catch_up_seconds(self) -> float:
        """What a draft right after plain passes costs on top of a steady one (committing the skipped
        positions: cheap for EAGLE, a prefill of the prompt for a separate draft model); 0 before any."""
        obs = self._catch_obs
        return sum(obs) / len(obs) if obs else 0.0

    def verify_seconds(self, k: int) -> float:
        n = 1 + (self.nodes[k] if k <= self.max_tokens else k)
        return self.scale * self.cost(int(round(n)))

    def rate(self, k: int, optimistic: bool = False, catch_up: bool = False) -> float:
        """Expected new tokens per second with draft length k (0 = plain step); `catch_up` adds the cost of
        a first draft after plain passes."""
        extra = self.catch_up_seconds() if catch_up and k else 0.0
        return self.expected_tokens(k, optimistic) / (self.draft_seconds(k) + extra + self.verify_seconds(k))

    def choose(self, limit: int | None = None) -> int:
        """Draft length for the next pass, at most `limit` (the token budget left minus the bonus)."""
        K = self.max_tokens if limit is None else max(0, min(self.max_tokens, limit))
        if K == 0:
            return 0
        plain = self.rate(0)
        best, best_rate = 0, plain * (1.0 + self.margin)
        resume = self._catch_up or self.since_draft > 0
        for k in range(1, K + 1):
            r = self.rate(k, optimistic=True, catch_up=resume)
            if r > best_rate:
                best, best_rate = k, r
        if best == 0:
            # Evidence ages while nothing is drafted: the bound widens again, so a drafter shut out by
            # a run of bad luck is retried, while a clearly bad one (tight, low estimate) stays out.
            for i in range(1, self.max_tokens + 1):
                self.off[i] *= self.idle_decay
                self.acc[i] *= self.idle_decay
            self.since_draft += 1
            if self.since_draft >= self.gap:  # probe: one cheap draft token, to keep alpha_1 current
                self.gap = min(self.gap * 2, self.max_gap)
                best = 1
        else:
            self.gap = self.min_gap
        if best:
            self._catch_up_pass = self._catch_up or self.since_draft > 0
            self._catch_up = False
            self.since_draft = 0
        self.choices.append(best)
        return best

    def observe(self, k: int, nodes: int, accepted: int, offered: int, draft_s: float, verify_s: float) -> None:
        """After a pass with draft length k: `nodes` sent, `accepted` draft tokens taken, deepest tested
        position `offered` (as in GenerationResult), drafting and verification seconds."""
        d = self.decay
        for i in range(1, min(offered, self.max_tokens) + 1):
            self.off[i] = self.off[i] * d + 1.0
            self.acc[i] = self.acc[i] * d + (1.0 if i <= accepted else 0.0)
        if 0 < k <= self.max_tokens:
            self.nodes[k] = 0.7 * self.nodes[k] + 0.3 * nodes
            # A draft right after plain passes (or a prompt) also commits their positions; that one-off
            # catch-up would make steady drafting look dearer than it is, so it is not fitted (unless
            # nothing else has been seen yet).
            if not self._catch_up_pass or not self._draft_obs:
                self._draft_obs.append((float(k), draft_s))
                self._draft_obs = self._draft_obs[-16:]
            else:
                self._catch_obs.append(max(0.0, draft_s - self.draft_seconds(k)))
                self._catch_obs = self._catch_obs[-8:]
            self._catch_up_pass = False
        pred = self.cost(1 + nodes)
        if pred > 0 and verify_s > 0:
            self.scale = 0.8 * self.scale + 0.2 * (verify_s / pred)

    def summary(self) -> dict:
        n = len(self.choices)
        return {"passes": n, "plain_passes": sum(c == 0 for c in self.choices),
                "mean_draft_length": sum(self.choices) / n if n else 0.0,
                "alpha_estimate": [round(a, 3) for a in self.alpha()],
                "alpha_optimistic": [round(a, 3) for a in self.alpha_optimistic()],
                "draft_s_per_token": round(self.draft_seconds(1), 5),
                "catch_up_s": round(self.catch_up_seconds(), 5),
                "verify_cost_s": [round(s, 5) for s in self.cost.seconds[1:]], "scale": round(self.scale, 3)}
