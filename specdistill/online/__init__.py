"""Online distillation (OSD, arXiv 2310.07177) as a scheduled job: `specdistill retrain`.

    (data/querylogs.py) JSONL query logs -> prompt records (bad lines counted by reason with file:line;
                a half-written last line is left for the next run); also the `logs:<dir>` data source
    ledger.py   what was consumed (file identity, offset, fingerprints, record hashes): nothing twice,
                nothing lost, rotated/rewritten files detected
    replay.py   the bounded replay buffer (recent + reservoir, in tokens) and the held-out slice
    gate.py     challenger vs serving on the held-out slice; atomic promotion, history, rollback
    retrain.py  one run under a lock: ingest -> regenerate -> warm-started training -> gate -> report

State lives in one directory (default `<serving>.online/`); see docs/retrain.md.
"""
