"""The one config system: dataclasses -> recipe YAML -> optional user YAML -> `key=value` overrides.

Every field has a one-line docstring under it; `describe()` reads them with `ast` for `--help`.
An unknown key is an error that lists the valid keys at that level. The resolved config is
written beside every run (`config.yaml`) by the Trainer.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from specdistill.errors import ConfigError  # re-exported: callers import it from here too

REPO_ROOT = Path(__file__).resolve().parents[1]
# The recipes ship inside the package (specdistill/recipes: in a checkout a symlink to recipes/, in a
# wheel the files themselves), so `specdistill train eagle` finds them from an installed wheel too.
_SHIPPED_RECIPES = Path(__file__).resolve().parent / "recipes"
RECIPE_CONFIG_DIR = (_SHIPPED_RECIPES.resolve() if _SHIPPED_RECIPES.is_dir() else REPO_ROOT / "recipes") / "configs"


@dataclass
class TargetConfig:
    name: str = "default"
    """HF model id, local model directory, path to a .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)."""
    gguf_file: str = ""
    """GGUF file name inside `name` when `name` is a directory holding GGUF files."""
    dtype: str = "float32"
    """Weights dtype of the frozen target: float32, bfloat16 or float16."""
    cache_dir: str = ""
    """Where converted GGUF targets are cached as safetensors; empty = $SPECDISTILL_CACHE or ~/.cache/specdistill."""
    trust_remote_code: bool = False
    """Allow model code from the model's repository. Off unless you trust the source."""
    revision: str = ""
    """Hub revision (branch, tag or commit) when `name` is a hub id."""
    device_map: str = ""
    """Shard the frozen target over this process's devices (e.g. auto, balanced); empty = whole on one device."""
    cpu_kernels: str = "auto"
    """auto: on an fp32 CPU target with AVX2/FMA, linears over few rows (decoding, verification) use
    specdistill's kernel (cpu_kernels.py: a pass over 5 tokens then costs ~1.2x a plain step, not ~1.9x);
    off: always torch's BLAS."""


@dataclass
class DataConfig:
    source: str = "default"
    """'default' (embedded ShareGPT), a .json/.jsonl file (ShareGPT or OpenAI shape), or hf:<path or id>."""
    max_length: int = 512
    """Maximum tokens per sample; longer conversations are cut at a turn boundary."""
    min_loss_tokens: int = 4
    """Samples with fewer assistant (loss) tokens after truncation are skipped as too_long."""
    truncate_prompt: bool = True
    """When the first assistant reply does not fit, cut the oldest prompt tokens (keeping the template's header/system part intact where possible) so it does."""
    val_fraction: float = 0.02
    """Fraction of conversations held out for validation (deterministic hash split)."""
    limit: int = 0
    """Use at most this many conversations (0 = all). Handy on a CPU."""
    prepared_dir: str = "data/prepared"
    """Where tokenized datasets are cached, keyed by source, tokenizer and settings."""
    seed: int = 0
    """Seed of the train/validation split."""


@dataclass
class TrainConfig:
    run_name: str = ""
    """Name of the run; empty = the recipe name."""
    output_dir: str = ""
    """Where checkpoints, logs and exports go; empty = checkpoints/<run_name>."""
    micro_batch_size: int = 4
    """Samples per process per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_steps: int = 200
    """Optimizer steps to train for."""
    max_minutes: float = 0.0
    """Stop (after a checkpoint) once this much wall time has passed; 0 = no limit."""
    lr: float = 3e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    warmup_steps: int = 20
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    lr_schedule: str = "cosine"
    """Decay after the warmup, to lr * min_lr_ratio at max_steps: cosine, or linear (speculators' default)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""
    mixed_precision: str = "auto"
    """no, bf16, fp16 or auto (bf16 on GPUs and CPUs with native bf16, else no; train/topology.py decides)."""
    eval_every: int = 100
    """Validate every this many steps (0 = only at the end)."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation."""
    save_every: int = 100
    """Write a checkpoint every this many steps (0 = only at the end)."""
    keep_last: int = 2
    """How many step_<n> checkpoints to keep (0 = all); keep 2 or more so a damaged one has a fall-back."""
    log_every: int = 10
    """Log metrics every this many steps."""
    seed: int = 0
    """Seed of weights init, data order and dropout."""
    resume: bool = True
    """Resume from <output_dir>/latest when it exists."""
    init_from: str = ""
    """Warm start: initial drafter weights (and draft vocabulary) from a native/SGLang/vLLM export or a
    checkpoint dir; optimizer, schedule and data order start fresh. A run resuming its own checkpoint
    ignores it."""
    trackers: list[str] = field(default_factory=lambda: ["auto"])
    """Loggers besides the JSONL file: tensorboard, wandb, or auto (each that is installed)."""
    wandb_project: str = "specdistill"
    """wandb project (wandb runs offline unless WANDB_MODE says otherwise)."""
    features: str = "online"
    """online (target runs each batch) or offline (read `specdistill data features` cache)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    progress: bool = True
    """Show a tqdm progress bar."""
    threads: int = 0
    """torch CPU threads while training (0 = torch's default); 1 is much faster when other jobs share the cores."""

    def __post_init__(self):
        if self.max_steps > 0 and self.warmup_steps >= self.max_steps:
            self.warmup_steps = max(0, self.max_steps // 10)
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision ({self.mixed_precision!r}) must be auto, no, bf16 or fp16")
        if self.lr_schedule not in ("cosine", "linear"):
            raise ConfigError(f"train.lr_schedule ({self.lr_schedule!r}) must be cosine or linear")
        if self.features not in ("online", "offline"):
            raise ConfigError(f"train.features ({self.features!r}) must be online or offline")
        ints = {"max_steps": 1, "micro_batch_size": 1, "grad_accum": 1, "log_every": 1, "save_every": 0,
                "keep_last": 0, "eval_every": 0, "eval_batches": 0, "warmup_steps": 0, "num_workers": 0,
                "threads": 0}
        for key, least in ints.items():
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ConfigError(f"train.{key} ({v!r}) must be an integer >= {least}")
        for key in ("lr", "weight_decay", "grad_clip", "max_minutes"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < float("inf")):
                raise ConfigError(f"train.{key} ({v!r}) must be a finite number >= 0")
        if not (isinstance(self.min_lr_ratio, (int, float)) and 0 <= self.min_lr_ratio <= 1):
            raise ConfigError(f"train.min_lr_ratio ({self.min_lr_ratio!r}) must be between 0 and 1")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas ({self.betas!r}) must be two numbers in [0, 1)")


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=list)
    """Export formats to write after training; empty = every format the drafter family supports."""
    out_dir: str = ""
    """Export root; empty = <train.output_dir>/export (one folder per format)."""
    dtype: str = "bfloat16"
    """dtype of exported weights."""
    target_adapters: str = "separate"
    """A family that trains the target (Medusa-2): separate (LoRA beside the drafter in the native export) or
    merged (also write <export>/merged_target/, the target with the adapters folded in)."""

    def __post_init__(self):
        if self.target_adapters not in ("separate", "merged"):
            raise ConfigError(f"export.target_adapters ({self.target_adapters!r}) must be separate or merged")


@dataclass
class EvalConfig:
    questions: str = "spec_bench"
    """Question file (MT-bench / Spec-Bench JSONL) or 'spec_bench' (the shipped copy)."""
    limit_per_category: int = 2
    """Questions per category scored after training (0 = all, -1 = skip the evaluation)."""
    max_new_tokens: int = 64
    """New tokens per turn."""
    num_draft_tokens: int = 5
    """Draft length k of the chain."""
    draft_confidence: float = 0.0
    """Dynamic draft length: stop drafting below this draft probability (`eval --draft-confidence`; 0 = off)."""
    adaptive: bool = False
    """Adaptive policy (`eval --adaptive`): each pass's draft length (0 = a plain step) from the measured
    verify-cost curve and the drafter's online acceptance, so drafting is skipped where it does not pay."""


@dataclass
class RunConfig:
    target: TargetConfig = field(default_factory=TargetConfig)
    """The frozen target model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training conversations."""
    drafter: Any = None
    """Drafter family config; `drafter.name` picks the family in the registry."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The Trainer."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """What the recipe exports at the end."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """The evaluation the recipe runs after export."""


# --------------------------------------------------------------------------------------------
# docstrings -> help


def field_docs(cls) -> dict[str, str]:
    """Map field name -> the string literal right below it in the class body."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(src).body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name):
            if isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                docs[a.target.id] = b.value.value.strip()
    return docs


def describe(cfg, prefix: str = "") -> list[str]:
    """Lines `key = value  # doc` for every leaf of a config, for --help."""
    lines = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            lines.append(f"# {key}: {docs.get(f.name, '')}")
            lines += describe(v, key + ".")
        else:
            lines.append(f"{key} = {v!r}  # {docs.get(f.name, '')}")
    return lines


# --------------------------------------------------------------------------------------------
# typed merging


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any or tp is None:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{key}: cannot parse {value!r} as a list") from None
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v] if value else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, inner, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an int, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a float, got {value!r}") from None
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads unquoted no/off/yes as booleans
            return "no" if not value else "yes"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _drafter_cls(name: str):
    from specdistill import drafters

    if name not in drafters.REGISTRY:
        raise ConfigError(f"drafter.name: unknown drafter {name!r}; registered: {sorted(drafters.REGISTRY)}")
    return drafters.REGISTRY[name].config_cls


def _merge(obj, updates: dict, prefix: str):
    """Apply a nested dict of updates onto a dataclass instance, type-checked; returns a new instance."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    kwargs = {n: getattr(obj, n) for n in names}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in kwargs:
            raise ConfigError(f"unknown config key {key!r}; valid keys at this level: {', '.join(names)}")
        cur = kwargs[k]
        if isinstance(obj, RunConfig) and k == "drafter":
            if not isinstance(v, dict):
                raise ConfigError(f"drafter: expected a mapping with a 'name', got {v!r}")
            name = v.get("name", getattr(cur, "name", None))
            if not name:
                raise ConfigError("drafter.name is required (e.g. drafter.name=eagle)")
            cls = _drafter_cls(name)
            if cur is None or type(cur) is not cls:
                cur = cls()
            kwargs[k] = _merge(cur, v, key + ".")
        elif dataclasses.is_dataclass(cur):
            kwargs[k] = _merge(cur, v, key + ".")
        else:
            kwargs[k] = _coerce(v, hints.get(k, Any), key)
    try:
        return type(obj)(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def parse_overrides(argv: list[str]) -> dict:
    """`a.b=c` strings -> nested dict; values parsed as YAML scalars (so 3e-4, true, [1,2] work)."""
    out: dict = {}
    for item in argv:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        # Keep the raw text: `_coerce` converts it by the field's type, so `no` stays a string
        # for str fields instead of YAML's False, and `[1, 2]` becomes a list for list fields.
        val = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with an earlier one")
        node[parts[-1]] = val
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def recipe_yaml(recipe: str) -> Path:
    return RECIPE_CONFIG_DIR / f"{recipe}.yaml"


def load(recipe: str | None, argv: list[str] | None = None, base: RunConfig | None = None) -> RunConfig:
    """Defaults -> recipes/configs/<recipe>.yaml -> `config=<user.yaml>` -> key=value overrides."""
    argv = list(argv or [])
    cfg = base or RunConfig()
    if recipe:
        cfg = _merge(cfg, _read_yaml(recipe_yaml(recipe)), "")
    user = [a for a in argv if a.startswith("config=")]
    for a in user:
        cfg = _merge(cfg, _read_yaml(Path(a.split("=", 1)[1])), "")
    cfg = _merge(cfg, parse_overrides([a for a in argv if not a.startswith("config=")]), "")
    if not cfg.train.run_name:
        cfg.train.run_name = recipe or "run"
    if not cfg.train.output_dir:
        cfg.train.output_dir = str(Path("checkpoints") / cfg.train.run_name)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> RunConfig:
    return _merge(RunConfig(), d, "")


def dump(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
