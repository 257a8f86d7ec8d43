"""Prepared (tokenized + masked) datasets, cached on disk and reused.

Cache layout: `<prepared_dir>/<source-name>-<key>/`
  samples.safetensors  flat int32 `input_ids`, uint8 `loss_mask`, int64 `offsets` (N+1 sample
                       boundaries), uint8 `is_val`, int32 `turns`, uint8 `truncated`
  ids.json             conversation id of each sample, in order
  summary.json         kept/skipped counts by reason and token statistics (also `data stats`)
The key hashes the source identity (path, size, mtime), the tokenizer (vocab, special tokens,
chat template) and every setting that changes the samples, so a stale cache is never reused.
The folder is written under a temporary name and renamed into place, so readers never see half.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from specdistill.data.chat import ChatEncoder
from specdistill.data.dataset import PreparedDataset
from specdistill.data.sources import SourceError, resolve, split_of
from specdistill.data.stats import SkipCounter, format_summary, save_json, token_stats

if TYPE_CHECKING:  # annotations only: data/ must not import config at run time (drafters -> data -> config)
    from specdistill.config import DataConfig

log = logging.getLogger(__name__)

# Bump when the meaning of a prepared sample changes, so old caches are not reused.
PIPELINE_VERSION = 1
# skip reasons decided while reading records (the rest are decided when tokenizing)
SOURCE_REASONS = ("empty", "no_assistant_turn", "unknown_role", "bad_shape", "invalid_json", "invalid_utf8",
                  "truncated_file")
BATCH = 256


def tokenizer_fingerprint(tok) -> str:
    vocab = sorted(tok.get_vocab().items())
    h = hashlib.sha256()
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    h.update((tok.chat_template or "").encode() if isinstance(tok.chat_template, str)
             else json.dumps(tok.chat_template, sort_keys=True).encode())
    h.update(json.dumps([type(tok).__name__, tok.all_special_tokens, tok.pad_token]).encode())
    return h.hexdigest()[:16]


def cache_dir(cfg: DataConfig, tok, identity: str) -> Path:
    settings = {"v": PIPELINE_VERSION, "source": identity, "tok": tokenizer_fingerprint(tok),
                "max_length": cfg.max_length, "min_loss_tokens": cfg.min_loss_tokens,
                "truncate_prompt": cfg.truncate_prompt, "limit": cfg.limit, "val_fraction": cfg.val_fraction,
                "seed": cfg.seed}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    name = "sharegpt" if cfg.source == "default" else Path(cfg.source.removeprefix("hf:").partition("#")[0]).stem
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "data"
    return Path(cfg.prepared_dir).expanduser() / f"{name}-{key}"


def _tokenizer_of(tokenizer_or_target):
    return getattr(tokenizer_or_target, "tokenizer", tokenizer_or_target)


def prepare(cfg: DataConfig, tokenizer, out: Path) -> dict:
    """Stream, normalise, tokenize and write one prepared dataset folder; returns its summary."""
    from safetensors.numpy import save_file

    t0 = time.time()
    counter = SkipCounter()
    enc = ChatEncoder(tokenizer, cfg.max_length, cfg.min_loss_tokens, cfg.truncate_prompt)
    ids_list, masks, turns, truncated, conv_ids = [], [], [], [], []

    def flush(batch):
        for conv, e in enc.encode_batch(batch, counter):
            ids_list.append(e.input_ids)
            masks.append(e.loss_mask)
            turns.append(e.turns)
            truncated.append(e.truncated)
            conv_ids.append(conv.id)

    batch = []
    read = 0
    for conv in resolve(cfg.source).iter(counter):
        batch.append(conv)
        read += 1
        if len(batch) >= BATCH:
            flush(batch)
            batch = []
        if cfg.limit and read >= cfg.limit:
            break
    flush(batch)
    counter.kept = len(ids_list)
    if not ids_list:
        raise SourceError(f"{cfg.source}: no usable conversation ({counter.to_dict()['skipped_by_reason']}); "
                          "first skips: " + "; ".join(counter.examples))

    is_val = np.array([split_of(i, cfg.seed, cfg.val_fraction) == "val" for i in conv_ids], dtype=np.uint8)
    if cfg.val_fraction > 0 and not is_val.any() and len(conv_ids) >= 2:
        # a tiny dataset would otherwise have no validation sample at all; take the one whose hash
        # is smallest, so the choice is still deterministic
        u = [hashlib.sha256(f"{cfg.seed}:{i}".encode("utf-8", "surrogatepass")).digest() for i in conv_ids]
        is_val[int(np.argmin(u))] = 1
    lengths = np.array([len(x) for x in ids_list], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    arrays = {
        "input_ids": np.concatenate(ids_list).astype(np.int32),
        "loss_mask": np.concatenate(masks).astype(np.uint8),
        "offsets": offsets,
        "is_val": is_val,
        "turns": np.asarray(turns, dtype=np.int32),
        "truncated": np.asarray(truncated, dtype=np.uint8),
    }
    loss = np.array([int(m.sum()) for m in masks], dtype=np.int64)
    tr = arrays["turns"]
    summary = {
        "source": cfg.source,
        "settings": {"max_length": cfg.max_length, "min_loss_tokens": cfg.min_loss_tokens,
                     "truncate_prompt": cfg.truncate_prompt, "limit": cfg.limit,
                     "val_fraction": cfg.val_fraction, "seed": cfg.seed},
        "records_read": read + sum(v for k, v in counter.skipped.items() if k in SOURCE_REASONS),
        "conversations_valid": read,
        "counts": counter.to_dict(),
        "truncated_samples": int(arrays["truncated"].sum()),
        "train": token_stats(lengths[is_val == 0], loss[is_val == 0], tr[is_val == 0]),
        "val": token_stats(lengths[is_val == 1], loss[is_val == 1], tr[is_val == 1]),
        "all": token_stats(lengths, loss, tr),
        "alignment": dict(enc.stats),
        "seconds": round(time.time() - t0, 2),
    }

    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(arrays, str(tmp / "samples.safetensors"), metadata={"pipeline_version": str(PIPELINE_VERSION)})
    (tmp / "ids.json").write_text(json.dumps(conv_ids, ensure_ascii=False))
    save_json(summary, tmp / "summary.json")
    try:
        os.replace(tmp, out)
    except OSError:
        # another process finished the same key first; its folder is equivalent
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "summary.json").exists():
            raise
    return summary


def _complete(out: Path) -> bool:
    return (out / "summary.json").exists() and (out / "samples.safetensors").exists()


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive advisory file lock (POSIX); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_prepared(out: Path) -> tuple[PreparedDataset, PreparedDataset, dict]:
    from safetensors.numpy import load_file

    arrays = load_file(str(out / "samples.safetensors"))
    summary = json.loads((out / "summary.json").read_text())
    ids = json.loads((out / "ids.json").read_text())
    is_val = arrays["is_val"].astype(bool)
    train = PreparedDataset(arrays, np.nonzero(~is_val)[0], ids)
    val = PreparedDataset(arrays, np.nonzero(is_val)[0], ids)
    return train, val, summary


def build(cfg: DataConfig, tokenizer, verbose: bool = True) -> tuple[PreparedDataset, PreparedDataset, dict]:
    """(train, val, summary) for `cfg`, tokenized with `tokenizer` (or a TargetModel's), cached on disk."""
    tok = _tokenizer_of(tokenizer)
    t0 = time.time()
    src = resolve(cfg.source)
    out = cache_dir(cfg, tok, src.identity())
    cached = _complete(out)
    if not cached:
        out.parent.mkdir(parents=True, exist_ok=True)
        with _lock(out.parent / f".{out.name}.lock"):
            # every process of a multi-process launch calls build(); one prepares, the others
            # wait on the lock and then find the finished folder
            cached = _complete(out)
            if not cached:
                log.info("preparing %s into %s", cfg.source, out)
                prepare(cfg, tok, out)
    train, val, summary = load_prepared(out)
    summary = dict(summary, cached=cached, prepared_dir=str(out), seconds=round(time.time() - t0, 2))
    if verbose:
        log.info("%s", format_summary(summary))
    return train, val, summary
