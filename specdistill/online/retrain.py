"""`specdistill retrain`: one scheduled OSD round on the query logs, safe to start from cron.

    specdistill retrain --logs /var/log/llm --serving /srv/drafter [key=value ...]
    specdistill retrain rollback --serving /srv/drafter
    specdistill retrain status --serving /srv/drafter

One run, under a lock on the state dir (`online.state`, default `<serving>.online/`):
  1. recover what a crashed run left (gate.recover), read the new complete log lines (ledger);
  2. hold some records out for the gate, add the others to the replay buffer, and save ledger,
     buffer and held-out slice in ONE atomic write (state.json): a crash before it re-reads the
     lines, a crash after it keeps them, as `pending` until a run has trained on them;
  3. with at least online.min_new_records pending: the target regenerates the answers
     (on-policy, data/regenerate.py; resumable), a drafter warm-started from the one in service
     (`train.init_from`, the serving export's own drafter config) trains on the whole buffer for
     train.max_steps / train.max_minutes;
  4. the gate scores both drafters on the held-out slice with the shared verifier and promotes
     only a lossless challenger whose tau gains online.min_tau_gain (gate.py: atomic swap, history);
  5. a JSON report (consumed, skipped by reason, steps, scores, decision) goes to
     <state>/reports/<run>.json and <state>/last_report.json, whatever the outcome.
Serving is only ever changed by the one atomic swap in step 4.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from specdistill import fsutil
from specdistill.errors import ConfigError
from specdistill.online import gate
from specdistill.online.ledger import Ledger
from specdistill.online.replay import Entry, ReplayBuffer, split_holdout

log = logging.getLogger(__name__)

RECIPE = "osd"
STATE_VERSION = 1
FAULT = None
"""Tests: a callable(point) run at each fault point (ingest, regenerated, train, promote, after_swap)."""


@dataclass
class OnlineConfig:
    logs: str = ""
    """Directory of JSONL query logs (specdistill/data/querylogs.py describes the records)."""
    serving: str = ""
    """The drafter in service: a native export directory, or a symlink to one (promotions swap it)."""
    state: str = ""
    """State dir (ledger, buffer, releases, reports); empty = <serving>.online beside it."""
    min_new_records: int = 8
    """Train only when at least this many new records wait (otherwise the run reports no_new_data)."""
    buffer_tokens: int = 200_000
    """Replay buffer size in tokens (prompt + answer)."""
    recent_fraction: float = 0.5
    """Share of the buffer kept for the newest records; the rest is a uniform reservoir of older ones."""
    holdout_fraction: float = 0.1
    """Share of new records held out for the gate (never trained on)."""
    holdout_min: int = 4
    """Hold out the newest records while fewer than this are held."""
    holdout_size: int = 32
    """The gate scores on the newest this many held-out records."""
    min_tau_gain: float = 0.02
    """Promote only when the challenger's tau beats the serving drafter's by at least this much."""
    guard_questions: str = ""
    """A fixed question set (MT-bench/Spec-Bench JSONL, or spec_bench) the challenger must not get worse on; empty = off."""
    guard_limit_per_category: int = 1
    """Questions per category of the guard set."""
    max_guard_drop: float = 0.05
    """Largest tau drop on the guard set that still allows a promotion."""
    answers: str = "regenerate"
    """regenerate (the target answers every prompt: on-policy) or served (use a logged response when present)."""
    max_new_tokens: int = 128
    """New tokens per regenerated answer."""
    max_prompt_tokens: int = 512
    """Prompts longer than this are not regenerated (and not trained on)."""
    batch_size: int = 8
    """Prompts regenerated together."""
    keep_releases: int = 5
    """Release folders kept (the one in service always stays)."""
    publish: str = ""
    """Hub repository (org/name) to publish every promoted drafter to (needs a token)."""
    publish_to: str = ""
    """Local directory to write the promoted drafter's repository to (replaced at each promotion)."""
    seed: int = 0
    """Seed of the held-out split and the reservoir."""

    def __post_init__(self):
        if self.answers not in ("regenerate", "served"):
            raise ConfigError(f"online.answers ({self.answers!r}) must be regenerate or served")
        for k in ("min_new_records", "holdout_size", "max_new_tokens", "batch_size", "buffer_tokens"):
            if getattr(self, k) < 1:
                raise ConfigError(f"online.{k} ({getattr(self, k)!r}) must be >= 1")
        if not 0 <= self.holdout_fraction < 1:
            raise ConfigError(f"online.holdout_fraction ({self.holdout_fraction}) must be in [0, 1)")


def _coerce(field: dataclasses.Field, raw: str):
    kind = type(field.default)
    if kind is bool:
        return str(raw).lower() in ("1", "true", "yes")
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"online.{field.name}={raw!r}: expected a {kind.__name__}") from None


def load(argv: list[str], recipe: str = RECIPE):
    """(RunConfig, OnlineConfig) from the recipe YAML and `key=value` overrides (online.* go to OnlineConfig)."""
    from specdistill import config

    fields = {f.name: f for f in dataclasses.fields(OnlineConfig)}
    online, rest = {}, []
    for a in argv:
        if a.startswith("online."):
            k, sep, v = a.removeprefix("online.").partition("=")
            if not sep or k not in fields:
                raise ConfigError(f"unknown or malformed {a!r}; online keys: {', '.join(fields)}")
            online[k] = _coerce(fields[k], v)
        else:
            rest.append(a)
    ocfg = OnlineConfig(**online)
    if not ocfg.logs or not ocfg.serving:
        raise ConfigError("give the logs and the serving drafter: --logs <dir> --serving <dir> "
                          "(or online.logs=... online.serving=...)")
    return config.load(recipe, rest), ocfg


def paths(ocfg: OnlineConfig) -> tuple[Path, Path]:
    serving = Path(os.path.abspath(os.path.expanduser(ocfg.serving)))
    state = Path(ocfg.state).expanduser() if ocfg.state else serving.parent / f"{serving.name}.online"
    return serving, state.resolve()


# ------------------------------------------------------------------ state.json (ledger + buffer + held out)


def load_state(state: Path, ocfg: OnlineConfig) -> dict:
    p = state / "state.json"
    d = {}
    if p.exists():
        try:
            d = json.loads(p.read_text())
        except ValueError as e:
            raise ValueError(f"{p}: not valid JSON ({e}); it is written atomically, so this is outside damage") from None
    return {"ledger": Ledger.from_dict(d.get("ledger")),
            "buffer": ReplayBuffer.from_dict(d.get("buffer"), ocfg.buffer_tokens, ocfg.recent_fraction, ocfg.seed),
            "holdout": [Entry(**e) for e in d.get("holdout", [])], "pending": list(d.get("pending", [])),
            "runs": d.get("runs", 0)}


def save_state(state: Path, st: dict) -> None:
    fsutil.atomic_write_text(state / "state.json", json.dumps({
        "version": STATE_VERSION, "ledger": st["ledger"].to_dict(), "buffer": st["buffer"].to_dict(),
        "holdout": [dataclasses.asdict(e) for e in st["holdout"]], "pending": st["pending"], "runs": st["runs"]}))


def _fault(point: str) -> None:
    if FAULT is not None:
        FAULT(point)


# ------------------------------------------------------------------ the steps


def _tokens(tok, messages: list[dict], extra: int = 0) -> int:
    return sum(len(tok(m["content"], add_special_tokens=False)["input_ids"]) + 4 for m in messages) + extra


def _regenerate(target, st: dict, ocfg: OnlineConfig, state: Path) -> dict:
    """Give every buffer entry without an answer the target's own (resumable: regenerated.jsonl)."""
    from specdistill.data.regenerate import regenerate

    todo = [e for e in st["buffer"].entries() if e.conversation(ocfg.answers == "served") is None]
    out = state / "regenerated.jsonl"
    stats = {"todo": len(todo)}
    if todo:
        convs = [{"id": e.key, "messages": e.prompt + [{"role": "assistant", "content": ""}]} for e in todo]
        stats.update(regenerate(convs, target, out, max_new_tokens=ocfg.max_new_tokens, temperature=0.0,
                                batch_size=ocfg.batch_size, max_prompt_tokens=ocfg.max_prompt_tokens, seed=ocfg.seed))
        roles = {"system": "system", "human": "user", "gpt": "assistant"}
        made = {}
        for line in out.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            made[rec["id"]] = [{"role": roles[m["from"]], "content": m["value"]} for m in rec["conversations"]]
        for e in todo:
            conv = made.get(e.key, [])
            # [] = no usable answer (prompt too long, or a blank reply): never trained on, not retried
            e.answer = conv if conv and conv[-1]["role"] == "assistant" and conv[-1]["content"].strip() else []
            if e.answer:
                e.tokens = _tokens(target.tokenizer, e.answer)
        stats["unusable"] = sum(1 for e in todo if not e.answer)
    return stats


def _write_train_file(st: dict, ocfg: OnlineConfig, path: Path) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for e in st["buffer"].entries():
            conv = e.conversation(ocfg.answers == "served")
            if conv:
                f.write(json.dumps({"id": e.key, "messages": conv}, ensure_ascii=False) + "\n")
                n += 1
    return n


def _write_questions(holdout: list[Entry], path: Path) -> int:
    with open(path, "w", encoding="utf-8") as f:
        for e in holdout:
            turns = [m["content"] for m in e.prompt if m["role"] == "user"]
            f.write(json.dumps({"question_id": e.key, "category": "held_out", "turns": turns}) + "\n")
    return len(holdout)


def _serving_drafter_cfg(cfg, serving: Path):
    """The run config with the drafter section of the export in service (so the warm start fits)."""
    from specdistill import config

    meta = serving / "specdistill_export.json"
    if not meta.exists():
        return cfg
    d = config.to_dict(cfg)
    d["drafter"] = json.loads(meta.read_text())["drafter_config"]
    return config.from_dict(d)


def _train(cfg, ocfg, serving: Path, run_dir: Path, train_file: Path):
    from specdistill import export, pipeline

    cfg = _serving_drafter_cfg(cfg, serving.resolve())
    cfg.data.source = str(train_file)
    cfg.data.prepared_dir = str(run_dir / "prepared")
    cfg.train.output_dir = str(run_dir / "train")
    cfg.train.init_from = str(serving.resolve())
    cfg.train.resume = False
    n = sum(1 for _ in open(train_file, encoding="utf-8"))
    cfg.train.micro_batch_size = max(1, min(cfg.train.micro_batch_size, n // max(1, cfg.train.grad_accum)))
    run = pipeline.train_drafter(cfg)
    _fault("train")
    written = export.write(run.drafter, cfg.export, run_dir / "export", run.target)
    if "native" not in written:
        raise ValueError(f"export.formats ({cfg.export.formats}) must include native: the release is a native export")
    return run, written["native"]


def _score(cfg, target, drafter_dir: Path, questions: Path, out: Path, baseline: bool) -> dict:
    from specdistill import scoring

    e = cfg.eval
    return scoring.score(target, str(drafter_dir), out, questions=str(questions), limit_per_category=0,
                         max_new_tokens=e.max_new_tokens, num_draft_tokens=e.num_draft_tokens,
                         draft_confidence=e.draft_confidence, baseline=baseline, progress=False, quiet=True)


def _publish(ocfg: OnlineConfig, release: Path) -> dict:
    from specdistill.export import hub

    try:
        return hub.publish(release, repo_id=ocfg.publish or None, to=ocfg.publish_to or None,
                           force=bool(ocfg.publish_to))
    except Exception as e:  # the promotion stands; the report says why publishing failed
        return {"error": f"{type(e).__name__}: {e}"}


def run(cfg, ocfg: OnlineConfig) -> dict:
    """One retrain round (see the module docstring); returns the report (also written to the state dir)."""
    from specdistill import targets
    from specdistill.data.stats import SkipCounter
    from specdistill.locks import DirLock

    serving, state = paths(ocfg)
    if not serving.is_dir():
        raise FileNotFoundError(f"{serving}: the serving drafter directory does not exist")
    t0 = time.time()
    rid = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}-{os.urandom(2).hex()}"
    lock = DirLock(state, "specdistill retrain").acquire()  # LockHeldError: another run is working
    report = {"run": rid, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "logs": str(ocfg.logs),
              "serving": str(serving), "state": str(state), "serving_before": str(serving.resolve()),
              "stale_lock_taken_over": lock.stale_holder or None, "command": " ".join(sys.argv)}
    run_dir = state / "runs" / rid
    try:
        shutil.rmtree(state / "runs", ignore_errors=True)  # work folders of crashed runs
        report["recovered"] = gate.recover(serving, state)
        st = load_state(state, ocfg)
        counter = SkipCounter()
        records, ledger, events = st["ledger"].scan(ocfg.logs, counter)
        counter.kept = len(records)
        report["ingest"] = {"new_records": len(records), "files": events, **counter.to_dict()}
        _fault("ingest")
        target = None
        if records or len(st["pending"]) >= ocfg.min_new_records:
            target = targets.load(cfg.target)
        if records:
            tok = target.tokenizer
            entries = [Entry(r.key, r.prompt, r.response, tokens=_tokens(tok, r.prompt, ocfg.max_new_tokens if
                             r.response is None else len(tok(r.response)["input_ids"])), acceptance=r.acceptance, run=rid)
                       for r in records]
            train_e, st["holdout"] = split_holdout(entries, st["holdout"], ocfg.holdout_fraction, ocfg.holdout_min,
                                                   ocfg.holdout_size, ocfg.seed)
            st["buffer"].add(train_e)
            st["pending"] += [e.key for e in train_e]
            report["ingest"].update(held_out=len(entries) - len(train_e), to_buffer=len(train_e))
        st["ledger"] = ledger
        save_state(state, st)  # the ingest is committed: these lines are never read again
        report["buffer"] = {"records": len(st["buffer"].entries()), "tokens": st["buffer"].tokens(),
                            "recent": len(st["buffer"].recent), "reservoir": len(st["buffer"].reservoir),
                            "held_out": len(st["holdout"]), "pending": len(st["pending"])}
        if len(st["pending"]) < ocfg.min_new_records:
            report["decision"] = "no_new_data"
            report["reason"] = f"{len(st['pending'])} new records waiting, online.min_new_records={ocfg.min_new_records}"
            return report
        if not st["holdout"]:
            raise ValueError("no held-out records for the gate: raise online.holdout_min or online.holdout_fraction")
        report["regenerate"] = _regenerate(target, st, ocfg, state)
        save_state(state, st)
        (state / "regenerated.jsonl").unlink(missing_ok=True)  # its answers are in state.json now
        _fault("regenerated")
        run_dir.mkdir(parents=True)
        n_train = _write_train_file(st, ocfg, run_dir / "train.jsonl")
        if n_train == 0:
            raise ValueError("no record in the buffer has an answer to train on (prompts too long?)")
        del target
        t1 = time.time()
        trained, challenger = _train(cfg, ocfg, serving, run_dir, run_dir / "train.jsonl")
        report["train"] = {"conversations": n_train, "steps": trained.result.get("step"),
                           "final_loss": (trained.result.get("losses") or [None])[-1],
                           "init_from": str(serving.resolve()), "seconds": round(time.time() - t1, 1)}
        q = run_dir / "holdout.jsonl"
        _write_questions(st["holdout"], q)
        t2 = time.time()
        ev_s = _score(cfg, trained.target, serving.resolve(), q, run_dir / "eval_serving", baseline=False)
        ev_c = _score(cfg, trained.target, challenger, q, challenger, baseline=True)
        s, c = gate.overall(ev_s), gate.overall(ev_c)
        base = (ev_c.get("overall", {}).get("baseline") or {}).get("wall_time_s")
        if base and ev_s["overall"].get("wall_time_s"):  # same questions, same greedy tokens: one baseline serves both
            s["speedup"] = base / ev_s["overall"]["wall_time_s"]
        report["scores"] = {"held_out_questions": len(st["holdout"]), "serving": s, "challenger": c,
                            "seconds": round(time.time() - t2, 1)}
        gate.ensure_initial(serving, state, s)  # s: speed-up measured against the challenger's baseline
        guard = None
        if ocfg.guard_questions:
            from specdistill import scoring

            gq = None if ocfg.guard_questions == "spec_bench" else ocfg.guard_questions
            guard = tuple(scoring.score(trained.target, str(d), run_dir / name, questions=gq,
                                        limit_per_category=ocfg.guard_limit_per_category,
                                        max_new_tokens=cfg.eval.max_new_tokens, num_draft_tokens=cfg.eval.num_draft_tokens,
                                        baseline=True, progress=False, quiet=True)
                          for d, name in ((serving.resolve(), "guard_serving"), (challenger, "guard_challenger")))
            report["scores"]["guard"] = {"serving": gate.overall(guard[0]), "challenger": gate.overall(guard[1])}
        ok, why = gate.decide(ev_s, ev_c, ocfg.min_tau_gain, guard, ocfg.max_guard_drop)
        report["decision"], report["reason"] = ("promoted" if ok else "rejected"), why
        if ok:
            dest = gate.promote(serving, state, challenger, rid, ev_c, fault=_fault)
            report["release"] = str(dest)
            report["pruned"] = gate.prune(serving, state, ocfg.keep_releases)
            if ocfg.publish or ocfg.publish_to:
                report["publish"] = _publish(ocfg, dest)
        st["pending"], st["runs"] = [], st["runs"] + 1
        save_state(state, st)
        shutil.rmtree(run_dir, ignore_errors=True)
        return report
    except BaseException as e:
        report["decision"] = "failed"
        report["error"] = f"{type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc(limit=8)
        raise
    finally:
        report["serving_after"] = str(serving.resolve())
        report["seconds"] = round(time.time() - t0, 1)
        try:
            (state / "reports").mkdir(parents=True, exist_ok=True)
            text = json.dumps(report, indent=1, default=str)
            fsutil.atomic_write_text(state / "reports" / f"{rid}.json", text)
            fsutil.atomic_write_text(state / "last_report.json", text)
        finally:
            lock.release()


def rollback(ocfg: OnlineConfig) -> dict:
    from specdistill.locks import DirLock

    serving, state = paths(ocfg)
    with DirLock(state, "specdistill retrain"):
        gate.recover(serving, state)
        return gate.rollback(serving, state)


def status(ocfg: OnlineConfig) -> dict:
    serving, state = paths(ocfg)
    last = state / "last_report.json"
    hist = gate.load_history(state)
    return {"serving": str(serving), "serves": str(serving.resolve()), "state": str(state),
            "releases": [{k: r.get(k) for k in ("id", "path", "promoted_at", "tau", "speedup")}
                         for r in hist["releases"]],
            "last_run": {k: v for k, v in json.loads(last.read_text()).items() if k != "traceback"}
            if last.exists() else None}


# ------------------------------------------------------------------ CLI


def add_arguments(ap) -> None:
    ap.add_argument("action", nargs="?", default="run", help="run (default) | rollback | status")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (train.*, eval.*, online.*)")
    ap.add_argument("--logs", default="", help="directory of JSONL query logs")
    ap.add_argument("--serving", default="", help="the drafter in service (a native export dir or a symlink to one)")
    ap.add_argument("--state", default="", help="state dir (default <serving>.online)")
    ap.add_argument("--publish", default="", help="hub repository org/name for promoted drafters")
    ap.add_argument("--publish-to", default="", help="local directory for the promoted drafter's repository")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")


def run_args(args, recipe: str = RECIPE) -> int:
    if args.action not in ("run", "rollback", "status"):  # `retrain key=value ...`: no action given
        if "=" not in args.action:
            raise ConfigError(f"specdistill retrain: unknown action {args.action!r} (run, rollback or status)")
        args.overrides, args.action = [args.action, *args.overrides], "run"
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"specdistill retrain: unexpected arguments {bad} (overrides are key=value)")
    flags = {"logs": args.logs, "serving": args.serving, "state": args.state, "publish": args.publish,
             "publish_to": args.publish_to}
    overrides = [f"online.{k}={v}" for k, v in flags.items() if v] + list(args.overrides)
    if args.action != "run" and not args.logs:
        overrides.append("online.logs=-")  # rollback and status read no logs
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        overrides.append(f"train.threads={args.threads}")
    cfg, ocfg = load(overrides, recipe)
    if args.action == "rollback":
        print(json.dumps(rollback(ocfg), indent=1))
        return 0
    if args.action == "status":
        print(json.dumps(status(ocfg), indent=1))
        return 0
    report = run(cfg, ocfg)
    print(json.dumps({k: v for k, v in report.items() if k != "traceback"}, indent=1, default=str))
    return 0


def main(argv: list[str], recipe: str = RECIPE) -> int:
    """`retrain [run|rollback|status] --logs D --serving D [--state D] [--publish R] [key=value ...]`."""
    import argparse

    ap = argparse.ArgumentParser(prog="specdistill retrain")
    add_arguments(ap)
    return _guarded(ap.parse_args(argv), recipe)


def _guarded(args, recipe: str = RECIPE) -> int:
    from specdistill.locks import LockHeldError

    try:
        return run_args(args, recipe)
    except LockHeldError as e:  # another run holds the state dir: cron's next tick will try again
        print(f"specdistill retrain: error: {e}", file=sys.stderr)
        return 3


def register(subparsers) -> None:
    """Add `specdistill retrain` to the CLI."""
    p = subparsers.add_parser("retrain", help="scheduled online distillation on query logs, gated promotion",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=_guarded)
