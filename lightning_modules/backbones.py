"""Named model sizes and the backbone factory (flavour name -> class). Sizes follow the method digests."""
from __future__ import annotations

from lightning_modules.nn.llama import LlamaBackbone
from lightning_modules.nn.rar_vit import RARViTBackbone

# (n_layer, n_head, dim[, ffn_hidden]) per flavour. `debug` and `small` are for tests and the embedded demo.
MODEL_SIZES = {
    "llama": {
        "debug": dict(n_layer=2, n_head=4, dim=64),
        "small": dict(n_layer=4, n_head=4, dim=128),
        "B": dict(n_layer=12, n_head=12, dim=768),
        "L": dict(n_layer=24, n_head=16, dim=1024),
        "XL": dict(n_layer=36, n_head=20, dim=1280),
        "XXL": dict(n_layer=48, n_head=24, dim=1536),
    },
    "rar_vit": {
        "debug": dict(n_layer=2, n_head=4, dim=64),
        "small": dict(n_layer=4, n_head=4, dim=128),
        "B": dict(n_layer=24, n_head=16, dim=768, ffn_hidden=3072),
        "L": dict(n_layer=24, n_head=16, dim=1024, ffn_hidden=4096),
        "XL": dict(n_layer=32, n_head=16, dim=1280, ffn_hidden=5120),
        "XXL": dict(n_layer=40, n_head=16, dim=1408, ffn_hidden=6144),
    },
}

FLAVOURS = {"llama": LlamaBackbone, "rar_vit": RARViTBackbone}


def resolve_size(flavour: str, size: str, **overrides) -> dict:
    """Size preset merged with explicit non-zero overrides (dim, n_layer, n_head, ffn_hidden)."""
    if flavour not in MODEL_SIZES:
        raise ValueError(f"model.flavour: unknown flavour {flavour!r} (choose from {sorted(MODEL_SIZES)})")
    if size not in MODEL_SIZES[flavour]:
        raise ValueError(f"model.size: unknown size {size!r} for {flavour} (choose from {list(MODEL_SIZES[flavour])})")
    dims = dict(MODEL_SIZES[flavour][size])
    dims.update({k: v for k, v in overrides.items() if v})
    return dims


def build_backbone(flavour: str, **kwargs):
    if flavour not in FLAVOURS:
        raise ValueError(f"model.flavour: unknown flavour {flavour!r} (choose from {sorted(FLAVOURS)})")
    return FLAVOURS[flavour](**kwargs)
