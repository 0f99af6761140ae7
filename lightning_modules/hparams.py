"""The typed settings a generator module is built from: one set of defaults, shared with the experiment config.

``experiments/config.py`` composes these dataclasses into the full ``ExperimentConfig`` (YAML presets and
command-line overrides are merged over them); ``ARModule`` turns the plain dicts it is given (and records in
checkpoints, which ``weights_only=True`` can read) back into them with ``typed``, so a module built outside the
CLI trains with exactly the recipe the CLI would give it. Unknown keys and wrong types are errors here too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Literal, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

# Fixed choices are Literal fields: OmegaConf's structured merge refuses any other value, naming the key (one line).
# Choices that come from a registry (model.variant, model.flavour, model.scan, sample.schedule) stay ``str`` and are
# checked against the registry by experiments/validate.py.
Size = Literal["debug", "small", "B", "L", "XL", "XXL"]
LrSchedule = Literal["cosine", "constant"]
CfgSchedule = Literal["", "constant", "linear", "pow_cosine"]
SampleMode = Literal["official", "consistent"]
Draw = Literal["", "multinomial", "inverse_cdf"]
SamplePrecision = Literal["", "fp32", "bf16"]
Compile = Literal["auto", "on", "off"]  # lightning_modules/sampling.py::fast_path
Kernels = Literal["auto", "aten", "onednn"]  # lightning_modules/nn/onednn.py::kernel_threshold


@dataclass
class LlamaOptions:  # model.llama.*: options of the LlamaGen-style backbone
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    class_rope: str = "zero"  # the class slot's RoPE row: zero (official; its key scores 0) | identity (learnable)


@dataclass
class RarVitOptions:  # model.rar_vit.*: options of RAR's AdaLN ViT backbone
    dropout: float = 0.1
    attn_dropout: float = 0.1


@dataclass
class ModelConfig:
    variant: str = "raster"  # the ordering (lightning_modules/variants.py lists them): the only per-method code
    flavour: str = "llama"  # llama | rar_vit
    size: Size = "debug"
    dim: int = 0  # 0 = from size
    n_layer: int = 0
    n_head: int = 0
    ffn_hidden: int = 0
    num_classes: int = 10
    class_dropout: float = 0.1  # label -> null class, for classifier-free guidance
    grad_checkpointing: bool = False
    rar_anneal_start: float = 0.5  # RAR: r = 1 until this fraction of training ...
    rar_anneal_end: float = 0.75  # ... then linear to 0 here (paper: epochs 200 -> 300 of 400)
    scan: str = "raster"  # the fixed order of the scan ordering, and RAR's target order (lightning_modules/scans.py)
    scan_seed: int = 0  # scan=fixed_random: which permutation
    llama: LlamaOptions = field(default_factory=LlamaOptions)
    rar_vit: RarVitOptions = field(default_factory=RarVitOptions)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05
    warmup_steps: float = 0.05  # < 1: fraction of max_steps
    schedule: LrSchedule = "cosine"
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    no_decay_names: list = field(default_factory=list)
    max_nonfinite_in_a_row: int = 5


@dataclass
class SampleConfig:  # empty / 0 = the ordering's default
    num_steps: int = 0
    schedule: str = ""
    cfg_scale: float = 1.0
    cfg_schedule: CfgSchedule = ""  # "" = the ordering's default
    cfg_power: float = 1.0
    cfg_start: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    mode: SampleMode = "official"
    draw: Draw = ""  # "" = multinomial (the reference random stream) | inverse_cdf (one uniform per token; fast on CPU)
    precision: SamplePrecision = ""  # "" = fp32 | bf16 (the official samplers' setting: a bf16 copy of the weights)
    compile: Compile = "auto"  # the fast decode path: auto (on with CUDA outside training callbacks) | on | off (eager)
    kernels: Kernels = "auto"  # the linears' kernels: auto (oneDNN prepacked for big linears on a CPU) | aten | onednn
    tf32: bool = True  # CUDA fp32 matmuls in TF32 while generating, as the official samplers (see tf32.py)


# Sample fields whose empty value means "the ordering's default" (the others always come from the config).
SAMPLE_DEFAULTED = ("num_steps", "schedule", "cfg_schedule", "draw", "precision")


def typed(cls: type[T], data: Any, where: str = "") -> T:
    """A ``cls`` instance from a dict (or an instance): keys and types checked by OmegaConf's structured merge."""
    if isinstance(data, cls):
        return data
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), data or {})
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ValueError(f"{where or cls.__name__}.{key}: {str(err).splitlines()[0]}") from None
    return OmegaConf.to_object(merged)


def plain(obj: Any) -> Any:
    """Dataclass -> nested plain dict (what checkpoints record); anything else unchanged."""
    return asdict(obj) if is_dataclass(obj) else obj


def normalize_model(model: dict) -> tuple[dict, tuple[int, int] | None]:
    """A ``model`` dict in either layout -> (ModelConfig-shaped dict, grid or None).

    The current layout is ModelConfig's (flavour options under ``llama`` / ``rar_vit``). Checkpoints and import
    folders written before the typed settings hold the chosen flavour's options as ``backbone`` (with
    ``grad_checkpointing`` inside) and the ``grid`` next to them; they are mapped, not refused, so old runs load."""
    model = dict(model)
    grid = model.pop("grid", None)
    legacy = model.pop("backbone", None)
    if legacy is not None:
        legacy = dict(legacy)
        model["grad_checkpointing"] = bool(legacy.pop("grad_checkpointing", model.get("grad_checkpointing", False)))
        flavour = model.get("flavour", "llama")
        model[flavour] = {**model.get(flavour, {}), **legacy}
    return model, (tuple(int(g) for g in grid) if grid else None)
