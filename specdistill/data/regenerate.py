"""Self-distillation data: rewrite every assistant turn with the target's own answer.

    specdistill data regenerate --target default --limit 8 --max-new-tokens 256 --temperature 0

Drafters trained on the target's own text accept more (SpecForge #192/PR #223 report about +10%
acceptance length; EAGLE #228). For each conversation, turn by turn, the target answers the user
given the conversation so far (earlier assistant turns already replaced by its own answers), with
batched, left-padded HF `generate` across conversations.

Output: `data/regenerated/<source>-<key>.jsonl`, one ShareGPT record a line (a valid `data.source`):
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


def output_path(root: str | Path, source: str, target, settings: dict) -> Path:
    from specdistill.data.features import target_fingerprint
    from specdistill.data.sources import resolve

    blob = json.dumps({"target": target_fingerprint(target), "source": resolve(source).identity(), **settings},
                      sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    name = "sharegpt" if source == "default" else Path(source.removeprefix("hf:").partition("#")[0]).stem
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "data"
    return Path(root) / f"{name}-{key}.jsonl"


def done_ids(path: Path) -> set[str]:
    """Ids already written; a torn last line (crash mid-write) is cut off so appends stay valid JSONL."""
    if not path.exists():
        return set()
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


def regenerate(conversations: Iterable, target, out_path: str | Path, *, max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8, max_prompt_tokens: int = 512,
               seed: int = 0, limit: int = 0, progress: bool = False) -> dict:
    """Regenerate every assistant turn of `conversations` (Conversation objects or ShareGPT/OpenAI dicts)
    into `out_path` (append-only JSONL); returns counts and throughput of this call."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out_path)
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

    def refill():
        nonlocal seen, exhausted
        while len(pool) < batch_size and not exhausted:
            try:
                conv = next(it)
            except StopIteration:
                exhausted = True
                return
            seen += 1
            if limit and seen > limit:
                exhausted = True
                return
            cid, msgs = _as_messages(conv)
            if cid in done:
                stats["skipped_done"] += 1
                continue
            pool.append({"id": cid, "msgs": msgs, "hist": [], "cursor": 0, "finish": [], "new_tokens": 0})

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
        with open(out_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
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

    # Continuous batching: every round each conversation in the pool answers its next user turn; a
    # finished conversation is written at once (the resume unit) and its slot refilled.
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
    secs = time.time() - t0
    stats.update(path=str(out_path), seconds=round(secs, 2), generated_tokens=gen.generated_tokens,
                 tokens_per_second=round(gen.generated_tokens / secs, 2) if secs > 0 else None,
                 total_written=len(done_ids(out_path)))
    return stats


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
    target = targets.load(args.target)
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed, "max_prompt_tokens": args.max_prompt_tokens}
    path = Path(args.output) if args.output else output_path(args.out, source, target, settings)
    counter = SkipCounter()
    print(f"[regenerate] {source} -> {path}", file=sys.stderr)
    stats = regenerate(iter_conversations(source, counter), target, path, batch_size=args.batch_size,
                       limit=args.limit, progress=True, **settings)
    stats["source_skipped"] = counter.total_skipped
    stats["use_with"] = f"data.source={path}"
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
    p.add_argument("--batch-size", type=int, default=8, help="conversations generated together")
    p.add_argument("--max-prompt-tokens", type=int, default=512,
                   help="stop a conversation at the first turn whose prompt is longer (training cuts samples "
                        "at data.max_length anyway, default 512)")
    p.add_argument("--out", default=DEFAULT_ROOT, help="output folder (file name is keyed by target+source+settings)")
    p.add_argument("--output", default="", help="explicit output .jsonl (overrides --out's keyed name)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); 1 is much faster when other jobs share the cores")
    p.set_defaults(func=run)
