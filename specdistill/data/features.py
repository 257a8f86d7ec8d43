"""Offline target-feature cache: run the frozen target once, train many times on what it saw.

    specdistill data features --target default --layers 2,15,27 --limit 200

Layout under `<root>/<key>/` (root defaults to data/features; key hashes the target, the prepared
dataset's key and the layer ids, so a change of any of them gets a new cache):

    manifest.json              settings + the list of finished shards (rewritten atomically)
    <split>-<nnnnn>.safetensors  one shard of `shard_samples` consecutive samples of that split:
        input_ids int32 [n_tok], loss_mask uint8 [n_tok], offsets int64 [n+1]  (the samples themselves)
        aux       bf16  [n_tok, L, H]   aux layers (ids < N) at every position
        last      bf16  [n_sel, H]      h_N (last decoder output, before the final norm) only at
                                        positions t with loss_mask[t+1] = 1, where the target's
                                        next-token distribution is a training label
        last_pos  int32 [n_sel]         position of each `last` row inside its sample
        last_off  int64 [n+1]           `last` row boundaries per sample
      When the drafter asks for layer N itself (EAGLE-1 reads the top feature), h_N is stored at
      every position instead (`last_pos` then covers all positions).

Logits are not stored: `target_output` recomputes last_hidden = final_norm(h_N) in fp32 and the
drafter applies the frozen lm_head. A shard is written to a temp name and renamed, then the
manifest is replaced, so an interrupted run resumes at the first unfinished shard.

Trainer API (train.features=offline):

    train_ds = features.open_for(cfg.data, target, layers, split="train")   # or open_cache(dir, "train")
    val_ds = features.open_for(cfg.data, target, layers, split="val")
    Trainer(cfg, target, drafter, train_ds, val_ds,
            collate_fn=features.make_collate(train_ds),
            target_fn=features.offline_target_fn(train_ds, target))
"""

from __future__ import annotations

import argparse
import bisect
import copy
import functools
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from specdistill.targets import TargetOutput

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DEFAULT_ROOT = "data/features"


# --------------------------------------------------------------------------------------------- keys


def target_fingerprint(target) -> dict:
    c = target.config
    return {"name": getattr(target, "name", ""), "layers": int(target.num_layers), "hidden": int(target.hidden_size),
            "vocab": int(target.vocab_size), "dtype": str(next(target.parameters()).dtype),
            "model_type": getattr(c, "model_type", ""),
            # Two random tiny targets share every number above; the weights tell them apart.
            "weights": hashlib.sha256(target.final_norm.weight.detach().float().cpu().numpy().tobytes()
                                      + target.lm_head.weight.detach()[:8].float().cpu().numpy().tobytes()).hexdigest()[:16]}


def cache_key(target, data_key: str, layers) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "target": target_fingerprint(target), "data": data_key,
                       "layers": sorted(int(i) for i in layers)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir(root: str | Path, target, data_key: str, layers) -> Path:
    short = (getattr(target, "name", "") or "target").rstrip("/").split("/")[-1]
    short = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in short)[:40]
    return Path(root) / f"{short}-{cache_key(target, data_key, layers)}"


# --------------------------------------------------------------------------------------------- writing


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _positions_needing_last(loss_mask: torch.Tensor) -> torch.Tensor:
    """Bool (T,): t where token t+1 is a loss token, i.e. the target's distribution at t is a label."""
    sel = torch.zeros_like(loss_mask, dtype=torch.bool)
    sel[:-1] = loss_mask[1:].bool()
    return sel


@torch.no_grad()
def _extract_shard(target, samples: list[dict], aux_layers: list[int], last_everywhere: bool,
                   batch_size: int) -> dict[str, torch.Tensor]:
    n_layers = target.num_layers
    device = target.device
    lengths = [len(s["input_ids"]) for s in samples]
    # Longest first within the shard: less padding per forward, same output order as the samples.
    order = sorted(range(len(samples)), key=lambda i: -lengths[i])
    aux_rows: list = [None] * len(samples)
    last_rows: list = [None] * len(samples)
    pos_rows: list = [None] * len(samples)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(lengths[i] for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        att = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :lengths[i]] = torch.as_tensor(samples[i]["input_ids"])
            att[r, :lengths[i]] = 1
        out = target(ids.to(device), att.to(device), layers=aux_layers + [n_layers], return_logits=False)
        for r, i in enumerate(idx):
            n = lengths[i]
            if aux_layers:
                aux_rows[i] = torch.stack([out.hidden_states[j][r, :n] for j in aux_layers], 1).to(torch.bfloat16).cpu()
            else:
                aux_rows[i] = torch.zeros(n, 0, target.hidden_size, dtype=torch.bfloat16)
            if last_everywhere:
                pos = torch.arange(n)
            else:
                pos = torch.nonzero(_positions_needing_last(torch.as_tensor(samples[i]["loss_mask"]))).flatten()
            last_rows[i] = out.hidden_states[n_layers][r, pos.to(device)].to(torch.bfloat16).cpu()
            pos_rows[i] = pos.to(torch.int32)
    return {
        "input_ids": torch.cat([torch.as_tensor(s["input_ids"], dtype=torch.int32) for s in samples]),
        "loss_mask": torch.cat([torch.as_tensor(s["loss_mask"], dtype=torch.uint8) for s in samples]),
        "offsets": torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64),
        "aux": torch.cat(aux_rows).contiguous(),
        "last": torch.cat(last_rows).contiguous(),
        "last_pos": torch.cat(pos_rows),
        "last_off": torch.tensor([0, *torch.tensor([len(p) for p in pos_rows]).cumsum(0).tolist()], dtype=torch.int64),
    }


def build_cache(target, splits: dict, layers, out_dir: str | Path, *, data_key: str = "",
                shard_samples: int = 64, batch_size: int = 8, stop_after_shards: int = 0,
                progress: bool = False) -> dict:
    """Fill `out_dir` with the features of every split (`{"train": ds, "val": ds}`); resumable.

    Returns the manifest. `stop_after_shards` > 0 stops after writing that many new shards
    (an interruption on purpose: tests and time-boxed runs). One build at a time per cache: a second
    build of the same folder waits for the first (flock on `<out_dir>/.lock`), then reuses its shards.
    """
    from specdistill.locks import DirLock

    out_dir = Path(out_dir)
    lock = DirLock(out_dir, "feature build")
    lock.acquire(wait=True, on_wait=lambda pid: print(
        f"[features] {out_dir}: pid {pid} is building this cache; waiting for it, then reusing its shards",
        file=sys.stderr, flush=True))
    try:
        return _build_cache_locked(target, splits, layers, out_dir, data_key=data_key,
                                   shard_samples=shard_samples, batch_size=batch_size,
                                   stop_after_shards=stop_after_shards, progress=progress)
    finally:
        lock.release()


def _build_cache_locked(target, splits: dict, layers, out_dir: Path, *, data_key: str,
                        shard_samples: int, batch_size: int, stop_after_shards: int, progress: bool) -> dict:
    layers = target.check_layers(layers)
    n = target.num_layers
    aux_layers = [i for i in layers if i < n]
    last_everywhere = n in layers
    out_dir.mkdir(parents=True, exist_ok=True)
    mpath = out_dir / "manifest.json"
    settings = {"version": CACHE_VERSION, "target": target_fingerprint(target), "data_key": data_key,
                "layers": layers, "aux_layers": aux_layers, "last_layer": n, "last_everywhere": last_everywhere,
                "hidden_size": int(target.hidden_size), "shard_samples": int(shard_samples),
                "pad_token_id": int(getattr(target.tokenizer, "pad_token_id", 0) or 0) if getattr(target, "tokenizer", None) else 0,
                "splits": {k: len(ds) for k, ds in splits.items()}}
    manifest = {"settings": settings, "shards": {}, "complete": False}
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if old["settings"] != settings:
            raise ValueError(f"{mpath}: cache settings differ from this run ({_diff(old['settings'], settings)}); "
                             "delete the folder or change the output root")
        manifest = old
    written = 0
    t0 = time.time()
    tokens = 0
    for split, ds in splits.items():
        n_shards = math.ceil(len(ds) / shard_samples)
        for s in range(n_shards):
            name = f"{split}-{s:05d}.safetensors"
            if name in manifest["shards"] and (out_dir / name).exists():
                continue
            lo, hi = s * shard_samples, min(len(ds), (s + 1) * shard_samples)
            samples = [ds[i] for i in range(lo, hi)]
            tensors = _extract_shard(target, samples, aux_layers, last_everywhere, batch_size)
            tmp = out_dir / f".{name}.tmp{os.getpid()}"
            save_file(tensors, str(tmp), metadata={"split": split, "start": str(lo), "end": str(hi)})
            os.replace(tmp, out_dir / name)
            nt = int(tensors["input_ids"].numel())
            manifest["shards"][name] = {"split": split, "start": lo, "end": hi, "tokens": nt,
                                        "last_rows": int(tensors["last"].shape[0]),
                                        "bytes": (out_dir / name).stat().st_size}
            _atomic_json(mpath, manifest)
            written += 1
            tokens += nt
            if progress:
                el = time.time() - t0
                print(f"[features] {name}: {hi - lo} samples, {nt} tokens ({tokens / max(el, 1e-9):.0f} tok/s)",
                      file=sys.stderr, flush=True)
            if stop_after_shards and written >= stop_after_shards:
                return manifest
    manifest["complete"] = True
    manifest["stats"] = cache_stats(manifest)
    _atomic_json(mpath, manifest)
    return manifest


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys)


def cache_stats(manifest: dict) -> dict:
    sh = manifest["shards"].values()
    tokens = sum(s["tokens"] for s in sh)
    nbytes = sum(s["bytes"] for s in sh)
    return {"shards": len(manifest["shards"]), "tokens": tokens, "bytes": nbytes,
            "bytes_per_token": nbytes / tokens if tokens else 0.0,
            "last_rows_per_token": sum(s["last_rows"] for s in sh) / tokens if tokens else 0.0}


# --------------------------------------------------------------------------------------------- reading


class FeatureDataset(torch.utils.data.Dataset):
    """Samples of one split of a finished cache: the batch contract plus `aux`, `last`, `last_pos`."""

    def __init__(self, path: str | Path, split: str = "train"):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(f"{self.path}: no feature cache here (manifest.json missing); "
                                    "run `specdistill data features` first")
        self.manifest = json.loads(mpath.read_text())
        if not self.manifest.get("complete"):
            raise ValueError(f"{mpath}: the cache is incomplete ({len(self.manifest['shards'])} shards); "
                             "rerun `specdistill data features` with the same arguments to finish it")
        s = self.manifest["settings"]
        self.layers: list[int] = s["layers"]
        self.aux_layers: list[int] = s["aux_layers"]
        self.last_layer: int = s["last_layer"]
        self.pad_token_id: int = s.get("pad_token_id", 0)
        self.split = split
        shards = sorted((v["start"], k) for k, v in self.manifest["shards"].items() if v["split"] == split)
        self.shards = [k for _, k in shards]
        self.starts = [st for st, _ in shards]
        self._n = s["splits"].get(split, 0)
        self._open: dict[str, object] = {}
        self._offsets: dict[str, tuple] = {}

    def __len__(self) -> int:
        return self._n

    def _shard(self, name: str):
        if name not in self._open:
            f = safe_open(str(self.path / name), framework="pt")
            self._open[name] = f
            self._offsets[name] = (f.get_tensor("offsets"), f.get_tensor("last_off"))
        return self._open[name], self._offsets[name]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self._n:
            raise IndexError(i)
        k = bisect.bisect_right(self.starts, i) - 1
        name = self.shards[k]
        f, (off, loff) = self._shard(name)
        j = i - self.starts[k]
        a, b = int(off[j]), int(off[j + 1])
        la, lb = int(loff[j]), int(loff[j + 1])
        return {
            "input_ids": f.get_slice("input_ids")[a:b].long().tolist(),
            "loss_mask": f.get_slice("loss_mask")[a:b].long().tolist(),
            "aux": f.get_slice("aux")[a:b],
            "last": f.get_slice("last")[la:lb],
            "last_pos": f.get_slice("last_pos")[la:lb].long(),
        }

    def __getstate__(self):  # DataLoader workers reopen the shards themselves
        d = dict(self.__dict__)
        d["_open"], d["_offsets"] = {}, {}
        return d


def open_cache(path: str | Path, split: str = "train") -> FeatureDataset:
    return FeatureDataset(path, split)


def collate_features(batch: list[dict], pad_id: int = 0, layers: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch: the data contract keys plus `aux` (B,T,L,H) bf16, `last` (B,T,H) bf16,
    `has_last` (B,T) bool marking where `last` holds h_N (zeros elsewhere) and `feature_layers`
    (the cached layer ids, targets.py convention) so `target_output` knows what it holds."""
    from specdistill.data.collate import collate

    out = collate([{"input_ids": s["input_ids"], "loss_mask": s["loss_mask"]} for s in batch], pad_id)
    b, t = out["input_ids"].shape
    n_aux, h = batch[0]["aux"].shape[1], batch[0]["aux"].shape[2]
    aux = torch.zeros(b, t, n_aux, h, dtype=torch.bfloat16)
    last = torch.zeros(b, t, h, dtype=torch.bfloat16)
    has = torch.zeros(b, t, dtype=torch.bool)
    for r, s in enumerate(batch):
        n = s["aux"].shape[0]
        aux[r, :n] = s["aux"]
        last[r, s["last_pos"]] = s["last"]
        has[r, s["last_pos"]] = True
    out.update(aux=aux, last=last, has_last=has)
    if layers is not None:
        out["feature_layers"] = torch.tensor(list(layers), dtype=torch.long)
    return out


def make_collate(dataset: FeatureDataset, pad_id: int | None = None):
    """The Trainer's collate_fn for a FeatureDataset (picklable for DataLoader workers)."""
    return functools.partial(collate_features, pad_id=dataset.pad_token_id if pad_id is None else pad_id,
                             layers=list(dataset.layers))


@torch.no_grad()
def target_output(batch: dict, target, layers: list[int] | None = None, return_logits: bool = False) -> TargetOutput:
    """Rebuild the TargetOutput the online forward gives, from a collated cache batch.

    hidden_states: the cached layers in fp32 (their bf16-rounded values); id N (when cached at every
    position) is h_N itself. last_hidden = final_norm(h_N) computed in fp32 from the stored bf16
    h_N: set where `has_last` is True (positions whose next token is a loss token), zeros elsewhere.
    logits = lm_head(last_hidden) in fp32, only if asked (they are large). `layers` defaults to the
    batch's `feature_layers`.
    """
    if layers is None:
        if "feature_layers" not in batch:
            raise ValueError("target_output: batch has no 'feature_layers'; collate with features.make_collate "
                             "or pass layers=FeatureDataset.layers")
        layers = batch["feature_layers"].tolist()
    n = target.num_layers
    aux_layers = [int(i) for i in layers if int(i) < n]
    aux = batch["aux"]
    if aux.shape[2] != len(aux_layers):
        raise ValueError(f"target_output: batch has {aux.shape[2]} aux layers but layers {list(layers)} name {len(aux_layers)}")
    device = target.device
    hs = {i: aux[:, :, j].to(device=device, dtype=torch.float32) for j, i in enumerate(aux_layers)}
    h_last = batch["last"].to(device=device, dtype=torch.float32)
    if n in [int(i) for i in layers]:
        hs[n] = h_last
    norm = target.final_norm
    if next(norm.parameters()).dtype != torch.float32:
        norm = copy.deepcopy(norm).float()
    last_hidden = norm(h_last) * batch["has_last"].to(device).unsqueeze(-1)
    logits = None
    if return_logits:
        lm = target.lm_head
        logits = torch.nn.functional.linear(last_hidden, lm.weight.float(),
                                            None if lm.bias is None else lm.bias.float())
    return TargetOutput(hidden_states=dict(sorted(hs.items())), last_hidden=last_hidden, logits=logits)


def offline_target_fn(dataset: FeatureDataset, target):
    """`target_fn` for the Trainer: batch -> TargetOutput, using the dataset's cached layer ids."""
    layers = list(dataset.layers)
    return lambda batch: target_output(batch, target, layers=layers)


# --------------------------------------------------------------------------------------------- wiring


def _data_key(summary: dict) -> str:
    return Path(summary["prepared_dir"]).name


def default_layers(target) -> list[int]:
    """EAGLE-3's low/mid/high default in the targets.py convention: [2, N//2, N-3]."""
    n = target.num_layers
    return [2, n // 2, n - 3]


def dir_for(data_cfg, target, layers, root: str | Path = DEFAULT_ROOT) -> tuple[Path, object, object, dict]:
    from specdistill import data

    train, val, summary = data.build(data_cfg, target.tokenizer, verbose=False)
    return cache_dir(root, target, _data_key(summary), target.check_layers(layers)), train, val, summary


def open_for(data_cfg, target, layers, split: str = "train", root: str | Path = DEFAULT_ROOT) -> FeatureDataset:
    """The finished cache for (data config, target, layers); a clear error with the command if missing."""
    path, *_ = dir_for(data_cfg, target, layers, root)
    from specdistill.targets import DEFAULT_NAME

    name = "default" if target.name == DEFAULT_NAME else target.name
    if not (path / "manifest.json").exists() or not json.loads((path / "manifest.json").read_text()).get("complete"):
        raise FileNotFoundError(
            f"{path}: no finished feature cache for these data/target/layers; run: specdistill data features "
            f"{data_cfg.source} --target {name} "
            f"--layers {','.join(map(str, layers))} --max-length {data_cfg.max_length}"
            + (f" --limit {data_cfg.limit}" if data_cfg.limit else ""))
    return open_cache(path, split)


def argmax_agreement(dataset: FeatureDataset, target, max_samples: int = 8) -> dict:
    """How often bf16-stored h_N changes the target's argmax vs the fp32 forward (a few samples)."""
    same = total = 0
    for i in range(min(max_samples, len(dataset))):
        s = dataset[i]
        ids = torch.tensor([s["input_ids"]], device=target.device)
        out = target(ids, layers=[target.num_layers], return_logits=False)
        h32 = out.hidden_states[target.num_layers][0, s["last_pos"].to(target.device)]
        a32 = target.lm_head(target.final_norm(h32)).argmax(-1)
        a16 = target.lm_head(target.final_norm(s["last"].to(target.device).float())).argmax(-1)
        same += int((a32 == a16).sum())
        total += int(a32.numel())
    return {"positions": total, "argmax_changed": total - same,
            "argmax_changed_fraction": (total - same) / total if total else 0.0}


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    from specdistill import targets
    from specdistill.data.cli import data_config

    target = targets.load(args.target)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else default_layers(target)
    dcfg = data_config(args)
    path, train, val, summary = dir_for(dcfg, target, layers, args.out)
    splits = {"train": train} if args.splits == "train" else {"train": train, "val": val}
    ntok = sum(int(ds.lengths.sum()) for ds in splits.values() if hasattr(ds, "lengths"))
    print(f"[features] {path}: layers {layers}, {len(train)} train / {len(val)} val samples, "
          f"{ntok} tokens to cache ({', '.join(splits)})", file=sys.stderr)
    t0 = time.time()
    before = sum(v["tokens"] for v in json.loads((path / "manifest.json").read_text())["shards"].values()) \
        if (path / "manifest.json").exists() else 0
    manifest = build_cache(target, splits, layers, path, data_key=_data_key(summary),
                           shard_samples=args.shard_samples, batch_size=args.batch_size,
                           stop_after_shards=args.max_shards, progress=True)
    secs = time.time() - t0
    stats = cache_stats(manifest)
    new_tokens = stats["tokens"] - before
    report = {"cache": str(path), "complete": manifest["complete"], "layers": layers, **stats,
              "new_tokens": new_tokens, "seconds": round(secs, 1),
              "tokens_per_second": round(new_tokens / secs, 1) if secs > 0 else None}
    if manifest["complete"] and args.check_argmax:
        report["bf16_last_hidden"] = argmax_agreement(open_cache(path, "train"), target, args.check_argmax)
    print(json.dumps(report, indent=1))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    from specdistill.data.cli import add_data_args

    add_data_args(p)  # source, --target, --max-length, --limit, ...: the same DataConfig keys training uses
    p.add_argument("--layers", default="", help="comma-separated layer ids (targets.py convention); "
                   "default: EAGLE-3's [2, N//2, N-3]")
    p.add_argument("--batch-size", type=int, default=8, help="samples per target forward")
    p.add_argument("--shard-samples", type=int, default=64, help="samples per shard (the resume unit)")
    p.add_argument("--splits", choices=["train", "train,val"], default="train,val")
    p.add_argument("--out", default=DEFAULT_ROOT, help="cache root; the cache goes in <out>/<target>-<key>/")
    p.add_argument("--max-shards", type=int, default=0, help="stop after writing this many new shards (0 = all)")
    p.add_argument("--check-argmax", type=int, default=4,
                   help="samples on which to measure how often bf16 h_N changes the target argmax (0 = skip)")


def register_data_subcommand(data_subparsers) -> None:
    p = data_subparsers.add_parser("features", help="cache the target's hidden states for offline training",
                                   description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); 1 is much faster when other jobs share the cores")
    p.set_defaults(func=run)
