"""Training data of a reference drafter: the target's own regenerated answers plus original ShareGPT
conversations that were not regenerated, as one JSONL source (OpenAI `messages` records).

    python reference/eagle3-smollm2-135m/mix_data.py data/regenerated/<file>.jsonl \\
        --skip 3000 --take 700 --out data/mixed/reference-v1.jsonl

--skip: embedded ShareGPT conversations to pass over first (`data regenerate --limit` took them);
--take: how many of the following ones to add with their original (human-written) answers;
--regen-skip: regenerated records to leave out first (held-out text, e.g. the 24 validation records
  of benchmarks/ablate.py); --regen-repeat: how many times each kept regenerated record is written
  (copies share their id, so they fall in the same train/val split).
Malformed records of either input are skipped and counted (the usual data-source rules).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("regenerated", help="output of `specdistill data regenerate`")
    ap.add_argument("--skip", type=int, default=3000)
    ap.add_argument("--take", type=int, default=700)
    ap.add_argument("--regen-skip", type=int, default=0)
    ap.add_argument("--regen-repeat", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from specdistill.data.sources import SkipCounter, iter_conversations

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    counts = {"regenerated": 0, "original": 0}
    regen_counter, orig_counter = SkipCounter(), SkipCounter()
    with open(tmp, "w", encoding="utf-8") as f:
        seen = set()
        for j, conv in enumerate(iter_conversations(args.regenerated, regen_counter)):
            seen.add(conv.id)  # held-out records are not added with their original answers either
            if j < args.regen_skip:
                continue
            line = json.dumps({"id": f"regen-{conv.id}", "messages": conv.messages}, ensure_ascii=False) + "\n"
            f.write(line * max(args.regen_repeat, 1))
            counts["regenerated"] += 1
        for i, conv in enumerate(iter_conversations("default", orig_counter)):
            if i < args.skip or conv.id in seen:
                continue
            if counts["original"] >= args.take:
                break
            f.write(json.dumps({"id": f"orig-{conv.id}", "messages": conv.messages}, ensure_ascii=False) + "\n")
            counts["original"] += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    print(json.dumps({"out": str(out), **counts, "skipped_regenerated": dict(regen_counter.skipped),
                      "skipped_original": dict(orig_counter.skipped)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
