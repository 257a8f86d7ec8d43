"""The one training loop every drafter family uses (DESIGN.md, STYLE.md 1.3).

A family supplies `loss(batch, target_out) -> LossOutput`; everything else lives here:
accelerate, the frozen target forward, gradient accumulation with the loss normalised by the
global token count (across accumulation steps and ranks), mixed precision, AdamW with warmup +
cosine, clipping, validation, atomic checkpoints, exact resume, logging and the progress bar.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

from specdistill import config as config_mod
from specdistill.adapters import ADAPTER_PREFIX, WithAdapters
from specdistill.train import checkpoint, rollout
from specdistill.train import logging as tlog
from specdistill.train.schedule import lr_factor, param_groups

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def _budget_total(step: int, steps_this_run: int, max_steps: int, elapsed_s: float, max_minutes: float) -> int:
    """Progress-bar total under a wall-clock budget (max_minutes counts from this run's start): the
    steps done plus those the time left allows at this run's pace, capped by max_steps. So the bar's
    ETA is the budget's end rather than that of e.g. max_steps=1000000."""
    left_s = max(60.0 * max_minutes - elapsed_s, 0.0)
    pace = elapsed_s / max(steps_this_run, 1)
    return min(max_steps, step + int(left_s / max(pace, 1e-9)))


class _LossModule(torch.nn.Module):
    """Routes the drafter's loss through `forward`, so DDP/DeepSpeed wrappers and autocast apply.

    A trainable target (spec.trains_target) is a submodule too, so its adapters are prepared, synced
    and clipped with the drafter, and its forward runs here, with grad, when no `target_out` is given."""

    def __init__(self, drafter, target=None, target_fn=None):
        super().__init__()
        self.drafter = drafter
        self.target = target
        self._target_fn = [target_fn]  # a list: a bound method of the Trainer is not a submodule

    def forward(self, batch, target_out=None):
        if target_out is None and self.target is not None:
            target_out = self._target_fn[0](batch)
        out = self.drafter.loss(batch, target_out)
        return out.loss, torch.as_tensor(out.num_tokens, dtype=torch.float32), out.metrics


class Trainer:
    def __init__(self, cfg, target, drafter, train_ds, val_ds=None, collate_fn: Callable | None = None,
                 target_fn: Callable | None = None, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin, set_seed

        self.cfg = cfg
        self.tc = cfg.train
        # sync_with_dataloader=False: our accumulation windows may span epochs (the loader restarts).
        plugin = GradientAccumulationPlugin(num_steps=self.tc.grad_accum, sync_with_dataloader=False)
        from specdistill.train import topology

        mp = topology.resolve_precision(self.tc.mixed_precision)
        if accelerator is None:
            topology.fresh_single_process_state(mp)
        self.accelerator = accelerator or Accelerator(
            gradient_accumulation_plugin=plugin, mixed_precision=mp, **topology.accelerator_kwargs())
        acc = self.accelerator
        # Batch size and accumulation come from the run config only; a DeepSpeed config that disagrees stops here.
        topology.check_topology(acc, self.tc)
        set_seed(self.tc.seed)
        self.out_dir = Path(self.tc.output_dir)
        self.target = target
        self.drafter = drafter
        # What this family needs of the target and the loop (drafters/base.py DrafterSpec.needs).
        self.needs = drafter.spec.needs(drafter.cfg, target.config if target is not None else None)
        self.layers = list(self.needs.layers)
        adapters = []
        if self.needs.trains_target:
            if target is None or target_fn is not None:
                raise ValueError(f"drafter {drafter.spec.name!r} trains the target: it needs the online target "
                                 "(train.features=online), not precomputed features")
            # adapters already attached (a warm-started target) are trained on, not attached twice
            adapters = target.adapter_parameters() if target.has_adapters else target.attach_lora(drafter.lora_config())
        if target is not None and not cfg.target.device_map:
            self.target.to(acc.device)
        self.train_ds, self.val_ds = train_ds, val_ds
        if collate_fn is None:
            from specdistill.data.collate import collate

            pad = target.tokenizer.pad_token_id if target is not None else 0
            collate_fn = lambda b: collate(b, pad)  # noqa: E731
        self.collate_fn = collate_fn
        # The plan (topology.py) says which dtype the target features handed to the drafter have.
        self.precision = topology.precision_plan(acc)
        self.target_fn = self.precision.wrap_target_fn(target_fn or self._online_target)
        self.count_tokens = drafter.num_loss_tokens
        groups = param_groups(list(drafter.trainable_parameters()) + adapters, self.tc.weight_decay)
        for g in groups:
            g["lr"] = self.tc.lr * g["lr_scale"]
        opt = torch.optim.AdamW(groups, lr=self.tc.lr, betas=tuple(self.tc.betas))
        # The scheduler is stepped by us once per optimizer step, so warmup_steps means optimizer
        # steps whatever the number of processes (accelerate's prepared scheduler would step N times).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, self.tc.warmup_steps, self.tc.max_steps, self.tc.min_lr_ratio,
                                     self.tc.lr_schedule))
        self.model, self.optimizer = acc.prepare(
            _LossModule(drafter, target if self.needs.trains_target else None, self.target_fn), opt)
        self.is_deepspeed = acc.distributed_type.name == "DEEPSPEED"
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.tokens_seen = 0
        self.best_val = None

    # ------------------------------------------------------------------ target features
    def _online_target(self, batch):
        if self.needs.output == "none":
            return None
        return self.target(batch["input_ids"], batch.get("attention_mask"), layers=self.layers,
                           return_logits=self.needs.output == "logits", grad=self.needs.trains_target)

    def _frozen_target_out(self, batch):
        """The target forward outside the wrapper (no grad, no autocast) for a frozen target; a trainable
        target runs inside `_LossModule.forward` instead (None here)."""
        return None if self.needs.trains_target else self.target_fn(batch)

    def _rollout(self, batch):
        """On-policy data (spec.rollout): the unwrapped drafter continues the micro-batch under no_grad,
        each row seeded by (train.seed, epoch, sample index), so a sample's continuation does not depend
        on how the global batch is split over accumulation steps and ranks."""
        drafter = self.accelerator.unwrap_model(self.model).drafter
        was_training = drafter.training
        drafter.eval()
        try:
            with torch.no_grad():
                return self._to_device(drafter.rollout(batch, self.target, batch["rollout_seed"]))
        finally:
            drafter.train(was_training)

    def _to_device(self, batch):
        return {k: (v.to(self.accelerator.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    # ------------------------------------------------------------------ data
    def _loader(self, ds, epoch: int, shuffle: bool):
        g = torch.Generator().manual_seed(self.tc.seed * 1_000_003 + epoch)
        order = torch.randperm(len(ds), generator=g).tolist() if shuffle else list(range(len(ds)))
        collate = self.collate_fn
        if self.needs.rollout:  # rows carry their sample index, the seed of their rollout
            ds, collate = rollout.Indexed(ds), rollout.SeededCollate(collate, self.tc.seed * 1_000_003 + epoch)
        dl = DataLoader(ds, batch_size=self.tc.micro_batch_size, sampler=order, collate_fn=collate,
                        num_workers=self.tc.num_workers, drop_last=shuffle)
        return self.accelerator.prepare_data_loader(dl, device_placement=False)

    def _micro_batches(self):
        """Yields micro-batches forever, epoch after epoch, resuming at the saved position."""
        while True:
            dl = self._loader(self.train_ds, self.epoch, shuffle=True)
            if len(dl) == 0:
                raise ValueError(
                    f"training set has {len(self.train_ds)} samples: fewer than one batch of "
                    f"{self.tc.micro_batch_size} x {self.accelerator.num_processes} processes"
                )
            if self.batch_in_epoch:
                dl = self.accelerator.skip_first_batches(dl, self.batch_in_epoch)
            for b in dl:
                self.batch_in_epoch += 1
                yield b
            self.epoch += 1
            self.batch_in_epoch = 0

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "tokens_seen": self.tokens_seen, "scheduler": self.scheduler.state_dict(),
                "micro_batch_size": self.tc.micro_batch_size, "grad_accum": self.tc.grad_accum,
                "best_val": self.best_val}

    def save(self) -> Path:
        """Write step_<step>/ (verified checkpoint, checkpoint.py). A failed write (disk full) raises
        checkpoint.CheckpointWriteError naming the file; the previous `latest` stays as it was."""
        state = self.accelerator.get_state_dict(self.model) if self.is_deepspeed else None
        drafter_sd = self._drafter_state(state)
        return checkpoint.save(self.accelerator, self.out_dir, self.step, drafter_sd, self.optimizer,
                               self._trainer_state(), self.tc.keep_last,
                               deepspeed_models=self.model if self.is_deepspeed else None)

    def _drafter_state(self, full=None) -> dict:
        if full is not None:  # DeepSpeed gathered state of the _LossModule wrapper (a trained target: adapters only)
            return {(k.removeprefix("drafter.") if k.startswith("drafter.")
                     else ADAPTER_PREFIX + k.removeprefix("target.model.")): v
                    for k, v in full.items() if k.startswith("drafter.") or "lora_" in k}
        return self._weights().state_dict()

    def _weights(self):
        """What a checkpoint holds: the drafter, plus the target's adapters when the family trains them."""
        drafter = self.accelerator.unwrap_model(self.model).drafter
        return WithAdapters(drafter, self.target) if self.needs.trains_target else drafter

    def _maybe_resume(self):
        """Resume from the newest checkpoint that verifies (checkpoint.choose: a damaged one is reported
        and the previous one used; none verifying stops the run), then cut metrics.jsonl back to the
        step resumed from, so no step is logged twice."""
        acc = self.accelerator
        ckpt = checkpoint.choose(acc, self.out_dir) if self.tc.resume else None
        if ckpt is not None:
            saved_procs = checkpoint.saved_num_processes(ckpt)
            if self.is_deepspeed and saved_procs != acc.num_processes:
                raise checkpoint.CheckpointError(
                    f"{ckpt}: a DeepSpeed checkpoint written by {saved_procs} processes cannot resume on "
                    f"{acc.num_processes} (ZeRO partitions the optimizer state per rank); relaunch with "
                    f"--nproc {saved_procs}")
            if not self.is_deepspeed and not (ckpt / "optimizer.pt").exists():
                raise checkpoint.CheckpointError(
                    f"{ckpt}: written under DeepSpeed; resume it under DeepSpeed (./launch.sh ... --zero N)")
            st = checkpoint.load(acc, ckpt, self._weights(), self.optimizer,
                                 deepspeed_models=self.model if self.is_deepspeed else None)
            try:
                self.step, self.epoch, self.tokens_seen = st["step"], st["epoch"], st["tokens_seen"]
                self.best_val = st.get("best_val")
                self.scheduler.load_state_dict(st["scheduler"])
                # The data position is stored per rank in micro-batches of the saving run; convert it so a
                # run saved by N processes resumes on M processes at the same sample.
                old_global = st["batch_in_epoch"] * st.get("num_processes", 1)
                saved_mb = st["micro_batch_size"]
            except (KeyError, TypeError, ValueError) as e:
                raise checkpoint.CheckpointError(f"{ckpt / 'trainer_state.json'}: incomplete trainer state "
                                                 f"({type(e).__name__}: {e})") from None
            self.batch_in_epoch = old_global // acc.num_processes
            if saved_mb != self.tc.micro_batch_size:
                raise checkpoint.CheckpointError(
                    f"{ckpt}: saved with train.micro_batch_size={saved_mb}, now {self.tc.micro_batch_size}; "
                    "resume needs the same micro-batch size")
        if acc.is_main_process:
            tlog.truncate_jsonl(self.out_dir / "metrics.jsonl", self.step)
        if ckpt is not None:
            acc.print(f"resumed from {ckpt} at step {self.step}")

    def _write_config(self):
        err = None
        if self.accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg_path = self.out_dir / "config.yaml"
            if cfg_path.exists() and self.tc.resume:
                try:
                    old = config_mod.from_dict(yaml.safe_load(cfg_path.read_text()))
                except Exception as e:  # unreadable, not YAML, or not a run config
                    line = next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)
                    old, err = None, (f"{cfg_path}: unreadable ({line}); it is the config of the run being "
                                      "resumed: repair it, or use a new train.output_dir or train.resume=false")
                if old is not None and config_mod.to_dict(old.drafter) != config_mod.to_dict(self.cfg.drafter):
                    err = (f"{cfg_path}: the drafter config differs from the run being resumed; "
                           f"use a new train.output_dir or train.resume=false")
            if err is None:
                config_mod.dump(self.cfg, cfg_path)
        if (err := checkpoint.agree(self.accelerator, err)) is not None:
            raise checkpoint.CheckpointError(err)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ the loop
    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x.detach().to(self.accelerator.device).float(), reduction="sum")

    def evaluate(self) -> dict:
        if self.val_ds is None or len(self.val_ds) == 0:
            return {}
        self.model.eval()
        tot = {"loss": torch.zeros((), device=self.accelerator.device)}
        ntok = torch.zeros((), device=self.accelerator.device)
        with torch.no_grad():
            for i, b in enumerate(self._loader(self.val_ds, 0, shuffle=False)):
                if i >= self.tc.eval_batches:
                    break
                b = self._to_device(b)
                loss, n, metrics = self.model(b, self._frozen_target_out(b))
                tot["loss"] = tot["loss"] + loss.detach().float()
                for k, v in metrics.items():
                    tot[k] = tot.get(k, 0) + torch.as_tensor(v, dtype=torch.float32, device=ntok.device)
                ntok = ntok + n.to(ntok.device)
        self.model.train()
        ntok = self._reduce(ntok).clamp_min(1)
        return {f"val/{k}": (self._reduce(v) / ntok).item() for k, v in tot.items()}

    def fit(self) -> dict:
        if getattr(self, "_run_lock", None) is None:  # one run per output dir: hold <output_dir>/.lock
            return checkpoint.guarded(self, self.fit)
        acc, tc = self.accelerator, self.tc
        self._write_config()
        self._maybe_resume()
        logger = tlog.build(self.out_dir, [t for t in tc.trackers if t not in ("none", "")], tc.wandb_project,
                            tc.run_name, config_mod.to_dict(self.cfg), acc.is_main_process)
        batches = self._micro_batches()
        self.model.train()
        bar = None
        if tc.progress and acc.is_local_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.max_steps, initial=self.step, desc=tc.run_name, dynamic_ncols=True)
        t_start, first_step = time.time(), self.step
        window_tokens, window_time, history = 0, 0.0, []
        last_good = checkpoint.latest(self.out_dir) if self.out_dir.exists() else None
        while self.step < tc.max_steps:
            t0 = time.time()
            micro = [self._to_device(next(batches)) for _ in range(tc.grad_accum)]
            if self.needs.rollout:  # sample first, then count: the loss runs over the rolled-out tokens
                micro = [self._rollout(b) for b in micro]
            local = torch.stack([torch.as_tensor(self.count_tokens(b), dtype=torch.float32) for b in micro]).sum()
            global_tokens = self._reduce(local).clamp_min(1.0)
            # accelerator.backward divides by grad_accum and DDP averages over ranks, so scale the
            # per-micro-batch *sum* by both: the step's gradient is d(sum of all losses)/global_tokens.
            scale = tc.grad_accum * acc.num_processes / global_tokens
            sums: dict[str, torch.Tensor] = {}
            gnorm = None
            for b in micro:
                with acc.accumulate(self.model):
                    tout = self._frozen_target_out(b)
                    loss, _, metrics = self.model(b, tout)
                    acc.backward(loss * scale)
                    sums["loss"] = sums.get("loss", 0) + loss.detach().float()
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0) + torch.as_tensor(v, dtype=torch.float32).detach().to(loss.device)
                    if acc.sync_gradients:
                        gnorm = acc.clip_grad_norm_(self.model.parameters(), tc.grad_clip) if tc.grad_clip > 0 else None
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            step_loss = (self._reduce(sums["loss"]) / global_tokens).item()
            if not math.isfinite(step_loss):
                msg = (f"non-finite loss ({step_loss}) at step {self.step + 1}; stopping. The last good "
                       f"checkpoint is {last_good or 'none (no checkpoint was written yet)'}")
                logger.log({"event": "nonfinite_loss", "loss": step_loss}, self.step + 1)
                logger.close()
                raise NonFiniteLossError(msg)
            self.scheduler.step()
            self.step += 1
            self.tokens_seen += int(global_tokens.item())
            now = time.time()
            dt, elapsed = now - t0, now - t_start  # one clock read: step time, and the budget's
            window_tokens += int(global_tokens.item())
            window_time += dt
            history.append(step_loss)
            if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                rec = {"loss": step_loss, "lr": self.scheduler.get_last_lr()[0],
                       "tokens_per_s": window_tokens / max(window_time, 1e-9), "tokens_seen": self.tokens_seen}
                if gnorm is not None:
                    rec["grad_norm"] = float(gnorm)
                for k, v in sums.items():
                    if k != "loss":
                        rec[k] = (self._reduce(v) / global_tokens).item()
                logger.log(rec, self.step)
                window_tokens, window_time = 0, 0.0
            if bar is not None:
                if tc.max_minutes > 0:
                    bar.total = _budget_total(self.step, self.step - first_step, tc.max_steps, elapsed, tc.max_minutes)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{int(global_tokens.item()) / max(dt, 1e-9):.0f}")
            out_of_time = tc.max_minutes > 0 and elapsed / 60 >= tc.max_minutes
            if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.max_steps:
                val = self.evaluate()
                if val:
                    logger.log(val, self.step)
            if (tc.save_every and self.step % tc.save_every == 0) or self.step == tc.max_steps or out_of_time:
                last_good = self.save()
            if out_of_time:
                acc.print(f"train.max_minutes={tc.max_minutes} reached at step {self.step}; checkpoint saved")
                break
        val = self.evaluate()
        if val:
            logger.log(val, self.step)
        if self.needs.trains_target:
            self.target.eval()  # trained inside the wrapper in train mode; decoding after fit must be deterministic
        if bar is not None:
            bar.close()
        logger.close()
        newest = checkpoint.latest(self.out_dir)
        if self.step and (newest is None or newest.name != f"step_{self.step}"):
            self.save()
        return {"step": self.step, "losses": history, "tokens_seen": self.tokens_seen,
                "seconds": time.time() - t_start, **val}
