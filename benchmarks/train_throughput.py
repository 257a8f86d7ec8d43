"""EAGLE-3 training throughput vs the target's own forward, online and from the offline cache; prints JSON.

    python benchmarks/train_throughput.py                       # 3 batches of 8 x 512 on the embedded target
    python benchmarks/train_throughput.py --batches 2 --mixed-precision bf16 --draft-vocab 8192
    python benchmarks/train_throughput.py --recipe eagle --mixed-precision auto --skip-online --threads 1   # shipped
    python benchmarks/train_throughput.py --recipe eagle --mixed-precision auto --set drafter.ttt_steps=2 --threads 1

Every batch is B samples cut to exactly L tokens (no padding), so the target-only pass, the
online training run and the offline run process identical tensors. Tokens/s counts all input
tokens; label tokens/s (`*_label_tokens_per_s`) counts the assistant tokens the EAGLE loss sums over. The first step of each timed loop is a warm-up and is excluded.
Goal (issue 4): online training tokens/s >= 0.8 x target forward-only tokens/s; cache <= 5 KB/token.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch


def fixed_length_samples(ds, n: int, length: int) -> list[dict]:
    out = []
    for i in range(len(ds)):
        s = ds[i]
        if len(s["input_ids"]) >= length and sum(s["loss_mask"][1:length]) >= 8:
            out.append({"input_ids": s["input_ids"][:length], "loss_mask": s["loss_mask"][:length]})
            if len(out) == n:
                return out
    raise SystemExit(f"only {len(out)} samples of >= {length} tokens with loss tokens; raise --limit or lower --seq-len")


def train_seconds(cfg, target, drafter, ds, collate_fn=None, target_fn=None) -> list[float]:
    """Per-step seconds of the real Trainer over `ds` (one epoch), warm-up step included."""
    from specdistill.train import Trainer

    starts: list[float] = []
    ends: list[float] = []
    tr = Trainer(cfg, target, drafter, ds, None, collate_fn=collate_fn, target_fn=target_fn)
    inner, opt_step = tr.target_fn, tr.optimizer.step

    # A step = from its target call (features) to the end of the optimizer step (grad_accum=1);
    # checkpoint writing and logging are outside the window.
    def timed_target(b):
        starts.append(time.perf_counter())
        return inner(b)

    def timed_opt(*a, **k):
        out = opt_step(*a, **k)
        ends.append(time.perf_counter())
        return out

    tr.target_fn, tr.optimizer.step = timed_target, timed_opt
    tr.fit()
    return [e - s for s, e in zip(starts, ends)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="default")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--limit", type=int, default=400, help="conversations to prepare when looking for long samples")
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "auto"])
    ap.add_argument("--recipe", default="", help="start from this recipe's YAML (e.g. eagle: its shipped defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override (repeatable), e.g. drafter.late_step_loss_fraction=0.5 or drafter.ttt_steps=2")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--skip-online", action="store_true", help="time only the offline-cache run")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from specdistill.train.logging import stdout_to_stderr

    with stdout_to_stderr():  # library chatter (e.g. DeepSpeed's accelerator warning) to stderr
        result = run(args)
    result = {"command": shlex.join(["python", "benchmarks/train_throughput.py", *argv]), **result}
    print(json.dumps(result, indent=1))
    return 0


def run(args) -> dict:
    import specdistill.drafters.eagle  # noqa: F401  (registers the family)
    from specdistill import config, data, drafters, targets
    from specdistill.config import DataConfig
    from specdistill.data import features, vocab

    torch.manual_seed(0)
    target = targets.load(args.target)
    train_ds, _, _ = data.build(DataConfig(limit=args.limit, max_length=max(args.seq_len, 512)), target.tokenizer,
                                verbose=False)
    n = args.batches * args.batch_size
    samples = fixed_length_samples(train_ds, n, args.seq_len)
    tokens_per_batch = args.batch_size * args.seq_len
    # Label tokens (what EAGLE's loss counts, EagleDrafter.num_loss_tokens) per timed batch: the unit
    # per-token learning is compared in (benchmarks/ablate.py, issue 16).
    label_per_batch = [sum(sum(s["loss_mask"][2:]) for s in samples[i:i + args.batch_size])
                       for i in range(0, n, args.batch_size)]
    label_timed = sum(label_per_batch[1:]) / max(len(label_per_batch) - 1, 1)
    print(f"[bench] {n} samples x {args.seq_len} tokens, torch threads {torch.get_num_threads()}", file=sys.stderr)

    from specdistill.data.collate import collate

    pad = target.tokenizer.pad_token_id
    batches = [collate(samples[i:i + args.batch_size], pad) for i in range(0, n, args.batch_size)]
    drafter_cfg_overrides = ["drafter.name=eagle", "drafter.variant=eagle3",
                             f"drafter.draft_vocab_size={args.draft_vocab}", *args.set]
    dcfg = config.load(args.recipe or None, drafter_cfg_overrides).drafter
    layers = dcfg.resolved_layer_ids(target.num_layers)

    # 1. target forward only (what online training must run anyway)
    fwd = []
    for b in batches:
        t0 = time.perf_counter()
        target(b["input_ids"], b["attention_mask"], layers=layers, return_logits=False)
        fwd.append(time.perf_counter() - t0)
    fwd_s = sum(fwd[1:]) / max(len(fwd) - 1, 1) if len(fwd) > 1 else fwd[0]
    print(f"[bench] target forward per batch: {[round(x, 2) for x in fwd]} s", file=sys.stderr)

    counts = vocab.count_tokens(samples, target.vocab_size)
    d2t, t2d = vocab.vocab_map_from_counts(counts, args.draft_vocab)

    def make_drafter():
        torch.manual_seed(0)
        d = drafters.build(dcfg, target)
        d.set_vocab_map(d2t, t2d)
        return d

    def run_cfg(out: Path):
        return config.load(args.recipe or None, drafter_cfg_overrides + [
            f"train.output_dir={out}", f"train.micro_batch_size={args.batch_size}", f"train.max_steps={args.batches}",
            "train.warmup_steps=0", "train.log_every=1", "train.save_every=0", "train.eval_every=0",
            "train.progress=false", "train.trackers=[none]", f"train.mixed_precision={args.mixed_precision}",
            "train.resume=false"])

    result = {"target": target.name, "batch": [args.batch_size, args.seq_len], "batches": args.batches,
              "draft_vocab_size": args.draft_vocab, "draft_vocab_coverage": round(vocab.coverage(counts, t2d), 4),
              "recipe": args.recipe or None, "overrides": args.set, "mixed_precision": args.mixed_precision, "torch_threads": torch.get_num_threads(),
              "target_forward_s_per_batch": round(fwd_s, 3),
              "target_forward_tokens_per_s": round(tokens_per_batch / fwd_s, 1)}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_online:
            on = train_seconds(run_cfg(tmp / "online"), target, make_drafter(), samples)
            on_s = sum(on[1:]) / max(len(on) - 1, 1)
            print(f"[bench] online train step: {[round(x, 2) for x in on]} s", file=sys.stderr)
            result.update(online_train_s_per_batch=round(on_s, 3),
                          online_train_tokens_per_s=round(tokens_per_batch / on_s, 1),
                          online_train_label_tokens_per_s=round(label_timed / on_s, 1),
                          online_over_forward_ratio=round(fwd_s / on_s, 3),
                          drafter_s_per_batch_online=round(on_s - fwd_s, 3))
        if not args.skip_offline:
            t0 = time.perf_counter()
            m = features.build_cache(target, {"train": samples}, layers, tmp / "cache", shard_samples=args.batch_size,
                                     batch_size=args.batch_size)
            cache_s = time.perf_counter() - t0
            fds = features.open_cache(tmp / "cache")
            off = train_seconds(run_cfg(tmp / "offline"), target, make_drafter(), fds,
                                collate_fn=features.make_collate(fds), target_fn=features.offline_target_fn(fds, target))
            off_s = sum(off[1:]) / max(len(off) - 1, 1)
            print(f"[bench] offline train step: {[round(x, 2) for x in off]} s", file=sys.stderr)
            result.update(cache_build_tokens_per_s=round(n * args.seq_len / cache_s, 1),
                          cache_bytes_per_token=round(m["stats"]["bytes_per_token"], 1),
                          offline_train_s_per_batch=round(off_s, 3),
                          offline_train_tokens_per_s=round(tokens_per_batch / off_s, 1),
                          offline_train_label_tokens_per_s=round(label_timed / off_s, 1))
    if "online_over_forward_ratio" in result:
        result["goal_online_ratio_0.8_met"] = result["online_over_forward_ratio"] >= 0.8
    if "cache_bytes_per_token" in result:
        result["goal_cache_5KB_met"] = result["cache_bytes_per_token"] <= 5 * 1024
    return result


if __name__ == "__main__":
    sys.exit(main())
