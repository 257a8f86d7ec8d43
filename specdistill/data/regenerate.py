"""Self-distillation data: rewrite every assistant turn with the target's own answer.

    specdistill data regenerate --target default --limit 8 --max-new-tokens 256 --temperature 0

Drafters trained on the target's own text accept more (SpecForge #192/PR #223 report about +10%
acceptance length; EAGLE #228). For each conversation, turn by turn, the target answers the user
given the conversation so far (earlier assistant turns already replaced by its own answers). The
static engine (`StaticBatch`, the default for Llama-layout targets) decodes up to --batch-size turns at
once over a preallocated KV cache and refills a row the moment its turn ends; `--engine hf` runs
rounds of batched, left-padded HF `generate` instead. Greedy answers are the same from both.

Output: `data/regenerated/<source>-<key>.jsonl` (`.jsonl.gz` with --gzip: one gzip member per record,
so it stays appendable), one ShareGPT record a line (the .jsonl is a valid `data.source`):
    {"id", "conversations": [{"from": "system"|"human"|"gpt", "value"}], "regenerated": {...}}
The key hashes the target, the source and the generation settings (not --limit), so a later run
with a larger --limit continues the same file. The file is append-only; each conversation is
written (and fsynced) the moment its last turn is done, and its slot in the batch is refilled
(continuous batching). A restart skips the ids already in the file and drops a half-written last line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_ROOT = "data/regenerated"
_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def output_path(root: str | Path, source: str, target, settings: dict, gzip: bool = False) -> Path:
    from specdistill.data.features import target_fingerprint
    from specdistill.data.sources import resolve

    blob = json.dumps({"target": target_fingerprint(target), "source": resolve(source).identity(), **settings},
                      sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    name = "sharegpt" if source == "default" else Path(source.removeprefix("hf:").partition("#")[0]).stem
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "data"
    return Path(root) / f"{name}-{key}.jsonl{'.gz' if gzip else ''}"


def is_gzip(path: str | Path) -> bool:
    return str(path).endswith(".gz")


def _read_gzip_members(path: Path) -> bytes:
    """The text of a multi-member gzip file (one member per appended record); a torn last member
    (crash mid-write) is cut off the file so later appends stay readable."""
    import zlib

    raw = path.read_bytes()
    out, pos, good = [], 0, 0
    while pos < len(raw):
        d = zlib.decompressobj(wbits=31)
        try:
            chunk = d.decompress(raw[pos:])
        except zlib.error:
            break
        if not d.eof:
            break
        out.append(chunk)
        pos = len(raw) - len(d.unused_data)
        good = pos
    if good < len(raw):
        log.warning("%s: dropping a half-written last gzip member (%d bytes)", path, len(raw) - good)
        with open(path, "r+b") as f:
            f.truncate(good)
    return b"".join(out)


def read_records(path: str | Path) -> list[dict]:
    """The records of a regenerated .jsonl or .jsonl.gz file."""
    path = Path(path)
    data = _read_gzip_members(path) if is_gzip(path) else path.read_bytes()
    return [json.loads(x) for x in data.splitlines() if x.strip()]


def done_ids(path: Path) -> set[str]:
    """Ids already written; a torn last line (crash mid-write) is cut off so appends stay valid JSONL."""
    if not path.exists():
        return set()
    if is_gzip(path):
        data = _read_gzip_members(path)
        data = data[:data.rfind(b"\n") + 1]
    else:
        data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a half-written last line (%d bytes)", path, len(data) - end)
        with open(path, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    ids = set()
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ids.add(str(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: not a regenerated record; delete the file to start over") from None
    return ids


class Generator:
    """Batched chat-turn generation with the target (left padding, greedy or sampled)."""

    def __init__(self, target, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0):
        self.target = target
        self.tok = target.tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.generated_tokens = 0
        gc = getattr(target.model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        eos = eos if eos is not None else self.tok.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], call_index: int = 0) -> list[tuple[str, str, int]]:
        """[(text, finish_reason 'stop'|'length', new tokens)] for left-padded prompts."""
        model = self.target.model
        device = self.target.device
        width = max(len(p) for p in prompts)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        att = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.as_tensor(p)
            att[r, width - len(p):] = 1
        kwargs = {"max_new_tokens": self.max_new_tokens, "pad_token_id": pad, "eos_token_id": sorted(self.eos)}
        if self.temperature > 0:
            torch.manual_seed(self.seed * 1_000_003 + call_index)
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **kwargs)
        res = []
        for r in range(len(prompts)):
            new = out[r, width:].tolist()
            stop = next((k for k, t in enumerate(new) if t in self.eos), None)
            body = new if stop is None else new[:stop]
            # trailing pads after an eos are not generated tokens
            self.generated_tokens += len(body) + (stop is not None)
            text = self.tok.decode(body, skip_special_tokens=True)
            res.append((text, "length" if stop is None else "stop", len(body)))
        return res


STATIC_MODEL_TYPES = ("llama", "mistral", "qwen2")
"""Decoder families whose layers the static engine runs (Llama layout: q/k/v/o_proj, RoPE, no q/k norms)."""


def static_supported(target) -> bool:
    cfg = target.model.config
    return (getattr(cfg, "model_type", "") in STATIC_MODEL_TYPES and not getattr(cfg, "sliding_window", None)
            and hasattr(target.model, "model") and hasattr(target.model.model, "layers"))


class StaticBatch:
    """Continuous-batching greedy/sampled decoding over a preallocated KV cache (the static engine).

    `slots` rows share one column clock: every decode step writes column `t` of every row's cache
    and each row attends to its own live columns (a boolean mask), so a row whose turn ends is
    refilled at once: its next prompt is prefilled alone (no padding) into the columns just before
    `t`, its keys carrying its own positions 0..L-1. When the clock reaches the end of the buffer the
    live spans are packed to the front (one gather per layer); when rows run dry the batch is
    narrowed to the busy ones. Nothing is reallocated per step.
    """

    def __init__(self, target, slots: int, max_prompt: int, max_new: int, columns: int = 0):
        self.model = target.model
        cfg = self.model.config
        w = next(self.model.parameters())
        self.dtype, self.device = w.dtype, w.device
        self.layers = self.model.model.layers
        at = self.layers[0].self_attn
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = at.head_dim
        self.span = max_prompt + max_new + 1  # the longest a row's live columns get
        self.S = max(columns, max_prompt + 2) if columns else 2 * self.span  # columns < 2*span: more packing
        self.B = slots
        shape = (slots, self.kv_heads, self.S, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.live = torch.zeros(slots, self.S, dtype=torch.bool, device=self.device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.t = max_prompt  # room for any prompt before the first decode column

    def _forward(self, ids, positions, rows, cols, mask, lo: int = 0):
        """Hidden states (b, n, H) of tokens `ids` (b, n) at `positions` (b, n) for cache rows `rows`
        (b,) written at columns `cols` (n,), attending with `mask` (b, 1, n, hi - lo) to columns lo..hi-1,
        hi = lo + mask width (no row has a live column outside them)."""
        hi = lo + mask.shape[-1]
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        m = self.model.model
        x = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(x, positions)
        b, n = ids.shape
        full = rows.numel() == self.B
        for i, layer in enumerate(self.layers):
            at = layer.self_attn
            h = layer.input_layernorm(x)
            q = at.q_proj(h).view(b, n, -1, self.head_dim).transpose(1, 2)
            k = at.k_proj(h).view(b, n, -1, self.head_dim).transpose(1, 2)
            v = at.v_proj(h).view(b, n, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            if full:
                self.k[i][:, :, cols] = k
                self.v[i][:, :, cols] = v
                keys, vals = self.k[i][:, :, lo:hi], self.v[i][:, :, lo:hi]
            else:
                r = rows[0]  # a prefill: one row
                self.k[i][r, :, cols] = k[0]
                self.v[i][r, :, cols] = v[0]
                keys, vals = self.k[i][r:r + 1, :, lo:hi], self.v[i][r:r + 1, :, lo:hi]
            a = torch.nn.functional.scaled_dot_product_attention(
                q, keys, vals, attn_mask=mask, scale=at.scaling, enable_gqa=q.shape[1] != keys.shape[1])
            x = x + at.o_proj(a.transpose(1, 2).reshape(b, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return m.norm(x)

    def _pack(self) -> None:
        """Move every row's live columns to the front, right-aligned at the new clock."""
        lens = self.live.sum(1)
        t_new = max(int(lens.max()), 1)
        if t_new >= self.S - 1:
            raise RuntimeError("regenerate: a row outgrew the static cache (max_prompt_tokens + max_new_tokens)")
        # row r: its live columns (in order) go to t_new - len_r .. t_new - 1
        order = torch.sort((~self.live).to(torch.int8), dim=1, stable=True).indices  # live columns first
        idx = torch.zeros(self.B, self.S, dtype=torch.long, device=self.device)
        newlive = torch.zeros_like(self.live)
        for r in range(self.B):
            n = int(lens[r])
            if n:
                idx[r, t_new - n:t_new] = order[r, :n]
                newlive[r, t_new - n:t_new] = True
        g = idx[:, None, :, None].expand(self.B, self.kv_heads, self.S, self.head_dim)
        for i in range(len(self.layers)):
            self.k[i] = torch.gather(self.k[i], 2, g)
            self.v[i] = torch.gather(self.v[i], 2, g)
        self.live = newlive
        self.t = t_new

    def narrow(self, rows: list[int]) -> None:
        """Keep only cache rows `rows` (in this order): the batch shrinks as the work runs out."""
        ix = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.k = [k.index_select(0, ix) for k in self.k]
        self.v = [v.index_select(0, ix) for v in self.v]
        self.live, self.pos = self.live.index_select(0, ix), self.pos.index_select(0, ix)
        self.B = len(rows)

    def prefill(self, row: int, prompt: list[int]) -> torch.Tensor:
        """Put `prompt` in cache row `row` (ending just before the clock), dropping what the row held; the
        logits (V,) of its last token."""
        self.live[row] = False
        self.pos[row] = 0
        logits = self.extend(row, prompt)
        if logits is None:
            raise RuntimeError(f"regenerate: a prompt of {len(prompt)} tokens does not fit the static cache "
                               f"(max_prompt_tokens + max_new_tokens = {self.span - 1})")
        return logits

    def extend(self, row: int, more: list[int]) -> torch.Tensor | None:
        """Append `more` to the row's cached tokens (its finished turn plus the next prompt's new tokens):
        the row's live columns move to end `len(more)` columns before the clock and only `more` is
        computed, at the positions after the cached ones. The logits (V,) of its last token, or None
        (nothing changed: the caller prefills) when the result would not fit the row's span."""
        n, have = len(more), int(self.pos[row])
        if have + n > self.span - 1:
            return None
        if have + n > self.t:
            self._pack()
            if have + n > self.t:  # the clock moves on past the packed rows (they just keep a gap)
                self.t = have + n
        src = self.live[row].nonzero().squeeze(1)  # in column order = position order
        if src.numel() != have:
            raise RuntimeError(f"regenerate: cache row {row} holds {src.numel()} columns for {have} tokens")
        c0 = self.t - n - have
        for i in range(len(self.layers)):  # index_select copies first, so overlapping moves are safe
            self.k[i][row, :, c0:c0 + have] = self.k[i][row].index_select(1, src)
            self.v[i][row, :, c0:c0 + have] = self.v[i][row].index_select(1, src)
        self.live[row] = False
        self.live[row, c0:self.t] = True
        cols = torch.arange(self.t - n, self.t, device=self.device)
        mask = torch.ones(n, have + n, dtype=torch.bool, device=self.device).tril(diagonal=have)[None, None]
        ids = torch.tensor([more], device=self.device)
        pos = torch.arange(have, have + n, device=self.device)[None]
        h = self._forward(ids, pos, torch.tensor([row], device=self.device), cols, mask, lo=c0)
        self.pos[row] = have + n
        return self.model.lm_head(h[0, -1])

    def step(self, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) at the clock column; rows with active=False are ignored. Logits (B, V)."""
        if self.t >= self.S:
            self._pack()
        t = self.t
        self.live[:, t] = active
        # attend only from the first column some row still uses (a row's columns may have a gap where
        # the clock jumped past a packed cache for a long prompt, so count from the front, not the clock)
        used = self.live[:, :t + 1].any(0)
        used[t] = True
        lo = int(used.int().argmax())
        mask = self.live[:, None, None, lo:t + 1].clone()
        mask[~active, 0, 0, t - lo] = True  # an idle row must still see one column (its output is discarded)
        cols = torch.tensor([t], device=self.device)
        h = self._forward(tokens[:, None], self.pos[:, None], torch.arange(self.B, device=self.device), cols, mask,
                          lo=lo)
        self.pos += active.long()
        self.t = t + 1
        return self.model.lm_head(h[:, -1])


def regenerate(conversations: Iterable, target, out_path: str | Path, *, max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8, max_prompt_tokens: int = 512,
               seed: int = 0, limit: int = 0, progress: bool = False, engine: str = "auto",
               reuse_prefix: bool = True) -> dict:
    """Regenerate every assistant turn of `conversations` (Conversation objects or ShareGPT/OpenAI dicts)
    into `out_path` (append-only JSONL); returns counts and throughput of this call.

    engine: "static" (StaticBatch: preallocated KV cache, rows refilled token by token), "hf" (rounds of
    left-padded HF `generate`), "auto" = static where the target's architecture allows it.
    reuse_prefix (static engine): a conversation's next turn extends the tokens already in its cache row
    instead of prefilling the whole conversation again (when its prompt starts with them)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out_path)
    gz = is_gzip(out_path)
    gen = Generator(target, max_new_tokens, temperature, top_p, seed)
    stats = {"written": 0, "skipped_done": 0, "skipped_no_turn": 0, "turns": 0, "turns_cut_by_length": 0,
             "finish_length": 0}
    if batch_size < 1:
        raise ValueError(f"batch_size ({batch_size}) must be >= 1")
    t0 = time.time()
    calls = 0
    seen = 0
    it = iter(conversations)
    exhausted = False
    pool: list[dict] = []

    def take() -> dict | None:
        """The next conversation still to do, as a work state; None when the source (or --limit) is done."""
        nonlocal seen, exhausted
        while not exhausted:
            try:
                conv = next(it)
            except StopIteration:
                exhausted = True
                return None
            seen += 1
            if limit and seen > limit:
                exhausted = True
                return None
            cid, msgs = _as_messages(conv)
            if cid in done:
                stats["skipped_done"] += 1
                continue
            return {"id": cid, "msgs": msgs, "hist": [], "cursor": 0, "finish": [], "new_tokens": 0}
        return None

    def refill():
        while len(pool) < batch_size:
            st = take()
            if st is None:
                return
            pool.append(st)

    def next_prompt(st) -> list[int] | None:
        """Move the conversation's non-assistant messages into its history; the next prompt or None if done."""
        msgs, k = st["msgs"], st["cursor"]
        while k < len(msgs) and msgs[k]["role"] != "assistant":
            st["hist"].append(msgs[k])
            k += 1
        st["cursor"] = k
        if k >= len(msgs) or not any(m["role"] == "user" for m in st["hist"]):
            return None
        p = gen.prompt_ids(st["hist"])
        if len(p) > max_prompt_tokens:
            stats["turns_cut_by_length"] += 1
            return None
        return p

    def write(st):
        hist = st["hist"]
        while hist and hist[-1]["role"] != "assistant":  # an unanswered trailing user turn
            hist.pop()
        if not any(m["role"] == "assistant" for m in hist):
            stats["skipped_no_turn"] += 1
            return
        rec = {"id": st["id"], "conversations": [{"from": _FROM[m["role"]], "value": m["content"]} for m in hist],
               "regenerated": {"turns": len(st["finish"]), "finish": st["finish"], "new_tokens": st["new_tokens"],
                               "temperature": temperature}}
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        if gz:  # one gzip member per record: appendable, and a torn member is cut off on resume
            import gzip

            with open(out_path, "ab") as f:
                f.write(gzip.compress(line.encode("utf-8"), compresslevel=9, mtime=0))
                f.flush()
                os.fsync(f.fileno())
        else:
            with open(out_path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        stats["written"] += 1

    def gather() -> tuple[list[list[int]], list[dict]]:
        """The next round: one prompt per pooled conversation, the pool kept full by refilling the
        slot of every conversation that finishes while the round is assembled."""
        prompts, who = [], []
        while True:
            refill()
            pending = [st for st in pool if not any(st is w for w in who)]
            if not pending:
                return prompts, who
            for st in pending:
                p = next_prompt(st)
                if p is None:
                    write(st)
                    pool.remove(st)
                else:
                    prompts.append(p)
                    who.append(st)

    def turn_done(st, body: list[int], stopped: bool):
        text = gen.tok.decode(body, skip_special_tokens=True)
        gen.generated_tokens += len(body) + stopped
        st["hist"].append({"role": "assistant", "content": text})
        st["cursor"] += 1
        st["finish"].append("stop" if stopped else "length")
        st["new_tokens"] += len(body)
        stats["turns"] += 1
        stats["finish_length"] += not stopped

    if engine == "auto":
        engine = "static" if static_supported(target) else "hf"
    if engine not in ("static", "hf"):
        raise ValueError(f"regenerate: engine ({engine!r}) must be auto, static or hf")
    if engine == "static" and not static_supported(target):
        raise ValueError(f"regenerate: the static engine runs {', '.join(STATIC_MODEL_TYPES)} targets, not "
                         f"{getattr(target.model.config, 'model_type', '?')!r}; use engine=hf")
    stats["engine"] = engine
    if engine == "static":
        _static_loop(target, gen, batch_size, max_prompt_tokens, max_new_tokens, temperature, top_p, seed,
                     take, next_prompt, write, turn_done, stats, progress, t0, reuse_prefix)
        return _finish(stats, gen, out_path, t0)

    # Continuous batching (hf engine): every round each conversation in the pool answers its next user
    # turn; a finished conversation is written at once (the resume unit) and its slot refilled.
    while True:
        prompts, who = gather()
        if not prompts:
            break
        for st, (text, finish, n) in zip(who, gen.generate(prompts, calls)):
            st["hist"].append({"role": "assistant", "content": text})
            st["cursor"] += 1
            st["finish"].append(finish)
            st["new_tokens"] += n
            stats["turns"] += 1
            stats["finish_length"] += finish == "length"
        calls += 1
        if progress:
            el = time.time() - t0
            print(f"[regenerate] round {calls}: {len(prompts)} turns, {stats['written']} conversations written, "
                  f"{gen.generated_tokens} tokens ({gen.generated_tokens / max(el, 1e-9):.1f} tok/s)",
                  file=sys.stderr, flush=True)
    return _finish(stats, gen, out_path, t0)


def _finish(stats, gen, out_path, t0) -> dict:
    secs = time.time() - t0
    stats.update(path=str(out_path), seconds=round(secs, 2), generated_tokens=gen.generated_tokens,
                 tokens_per_second=round(gen.generated_tokens / secs, 2) if secs > 0 else None,
                 total_written=len(done_ids(out_path)))
    return stats


@torch.no_grad()
def _static_loop(target, gen, batch_size, max_prompt_tokens, max_new_tokens, temperature, top_p, seed,
                 take, next_prompt, write, turn_done, stats, progress, t0, reuse_prefix=True) -> None:
    """Token-level continuous batching on StaticBatch: a row whose turn ends gets the conversation's
    next turn (or the next conversation) prefilled into its slot before the next decode step."""
    from specdistill.verify import sampling

    dec = StaticBatch(target, batch_size, max_prompt_tokens, max_new_tokens)
    B = batch_size
    work: list[dict | None] = [None] * B  # conversation per slot
    body: list[list[int]] = [[] for _ in range(B)]
    gens: list[torch.Generator | None] = [None] * B
    active = torch.zeros(B, dtype=torch.bool)
    nxt = torch.zeros(B, dtype=torch.long)
    eos = gen.eos
    cached: list[list[int]] = [[] for _ in range(B)]  # the token ids in each row's cache, in order
    owner: list[dict | None] = [None] * B  # the conversation they belong to
    stats["prefill_tokens"] = stats["reused_prefix_tokens"] = 0
    stats["prefill_seconds"] = stats["decode_seconds"] = 0.0

    def pick(slot: int, logits: torch.Tensor) -> int:
        if temperature > 0:
            return int(torch.multinomial(sampling.warp(logits, temperature, top_p, 0), 1, generator=gens[slot]))
        return int(logits.argmax())

    def start(slot: int) -> torch.Tensor | None:
        """Prefill the slot's next turn (taking a new conversation when its own is done); its logits."""
        while True:
            st = work[slot]
            if st is None:
                st = work[slot] = take()
                if st is None:
                    return None
            p = next_prompt(st)
            if p is None:
                write(st)
                work[slot] = None
                continue
            body[slot] = []
            if temperature > 0:  # per conversation and turn, whatever slot or batch it lands in
                h = hashlib.sha256(f"{seed}:{st['id']}:{len(st['finish'])}".encode()).digest()
                gens[slot] = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") >> 1)
            # A later turn whose prompt starts with the tokens already in the row (the previous prompt and
            # answer, when the answer's text re-tokenizes to the same ids) computes only the new tokens.
            had, logits = cached[slot], None
            c0 = time.perf_counter()
            if (reuse_prefix and st is owner[slot] and 0 < len(had) < len(p) and len(had) == int(dec.pos[slot])
                    and p[:len(had)] == had):
                logits = dec.extend(slot, p[len(had):])
            if logits is None:
                logits = dec.prefill(slot, p)
                stats["prefill_tokens"] += len(p)
            else:
                stats["prefill_tokens"] += len(p) - len(had)
                stats["reused_prefix_tokens"] += len(had)
            owner[slot], cached[slot] = st, list(p)
            stats["prefill_seconds"] += time.perf_counter() - c0
            return logits

    def advance(slot: int, logits: torch.Tensor | None) -> None:
        """Take the slot's next token; on a finished turn start the next one (possibly several)."""
        while logits is not None:
            tok = pick(slot, logits)
            stopped = tok in eos
            if not stopped:
                body[slot].append(tok)
            if not stopped and len(body[slot]) < max_new_tokens:
                nxt[slot] = tok
                active[slot] = True
                cached[slot].append(tok)  # fed at the next step
                return
            turn_done(work[slot], body[slot], stopped)
            logits = start(slot)
        active[slot] = False

    for slot in range(B):
        advance(slot, start(slot))
    steps = 0
    while bool(active.any()):
        n_active = int(active.sum())
        if B > 1 and n_active <= B // 2:
            # an idle slot means the source is spent (it stays idle): narrow the batch to the busy rows
            rows = [r for r in range(B) if active[r]]
            dec.narrow(rows)
            work = [work[r] for r in rows]
            body = [body[r] for r in rows]
            cached = [cached[r] for r in rows]
            owner = [owner[r] for r in rows]
            gens = [gens[r] for r in rows]
            nxt, active = nxt[rows].clone(), active[rows].clone()
            B = len(rows)
        c0 = time.perf_counter()
        logits = dec.step(nxt.to(dec.device), active.to(dec.device)).float().cpu()
        stats["decode_seconds"] += time.perf_counter() - c0
        steps += 1
        for slot in [r for r in range(B) if active[r]]:
            advance(slot, logits[slot])
        if progress and steps % 32 == 0:
            el = time.time() - t0
            print(f"[regenerate] step {steps}: {int(active.sum())} rows, {stats['written']} conversations written, "
                  f"{gen.generated_tokens} tokens ({gen.generated_tokens / max(el, 1e-9):.1f} tok/s)",
                  file=sys.stderr, flush=True)


def _as_messages(conv) -> tuple[str, list[dict]]:
    if hasattr(conv, "messages"):
        return str(conv.id), conv.messages
    if "messages" in conv:
        return str(conv["id"]), [{"role": m["role"], "content": m["content"]} for m in conv["messages"]]
    roles = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    return str(conv["id"]), [{"role": roles[m["from"]], "content": m["value"]} for m in conv["conversations"]]


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    from specdistill import targets
    from specdistill.data.sources import iter_conversations
    from specdistill.data.stats import SkipCounter

    source = args.source_opt or args.source
    target = targets.load(targets.TargetConfig(name=args.target, dtype=args.dtype))
    if args.dtype != "float32":  # the fingerprint (and so the file name) records the dtype
        print(f"[regenerate] target cast to {args.dtype}: its greedy answers are not token-identical to the "
              "float32 target's (a near-tie argmax flips)", file=sys.stderr)
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed, "max_prompt_tokens": args.max_prompt_tokens}
    # greedy answers are the same from either engine; sampled ones are not, so they key the file apart
    key = dict(settings, engine=args.engine) if args.temperature > 0 else settings
    path = Path(args.output) if args.output else output_path(args.out, source, target, key, gzip=args.gzip)
    counter = SkipCounter()
    print(f"[regenerate] {source} -> {path}", file=sys.stderr)
    stats = regenerate(iter_conversations(source, counter), target, path, batch_size=args.batch_size,
                       limit=args.limit, progress=True, engine=args.engine, **settings)
    stats["source_skipped"] = counter.total_skipped
    stats["use_with"] = (f"zcat {path} > {str(path)[:-3]} && data.source={str(path)[:-3]}" if is_gzip(path)
                         else f"data.source={path}")
    print(json.dumps(stats, indent=1))
    return 0


def register_data_subcommand(data_subparsers) -> None:
    p = data_subparsers.add_parser("regenerate", help="rewrite assistant turns with the target's own answers",
                                   description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", default="default",
                   help="default (embedded ShareGPT), a .json/.jsonl file, or hf:<path or id>[#split]")
    p.add_argument("--source", dest="source_opt", default="", help="same as the positional source")
    p.add_argument("--target", default="default", help="the target whose answers replace the originals")
    p.add_argument("--limit", type=int, default=0, help="regenerate at most the first N conversations (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per assistant turn")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=64, help="conversations generated together (rows of the batch)")
    p.add_argument("--engine", default="auto", choices=["auto", "static", "hf"],
                   help="static: preallocated KV cache, finished rows refilled in flight (llama/mistral/qwen2); "
                        "hf: rounds of padded HF generate; auto: static where supported")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the target's weights and math: float32 = its exact greedy answers; bfloat16 = 1.98x faster "
                        "measured on an AMX CPU at batch 64, answers of the bf16-cast target "
                        "(another file: the key records the dtype)")
    p.add_argument("--max-prompt-tokens", type=int, default=512,
                   help="stop a conversation at the first turn whose prompt is longer (training cuts samples "
                        "at data.max_length anyway, default 512)")
    p.add_argument("--out", default=DEFAULT_ROOT, help="output folder (file name is keyed by target+source+settings)")
    p.add_argument("--gzip", action="store_true",
                   help="write <keyed name>.jsonl.gz (one gzip member per conversation, appendable; `zcat` it "
                        "to a .jsonl for data.source)")
    p.add_argument("--output", default="", help="explicit output .jsonl (overrides --out's keyed name)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); 1 is much faster when other jobs share the cores")
    p.set_defaults(func=run)
