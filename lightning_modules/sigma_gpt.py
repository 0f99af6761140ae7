"""sigma-GPT-style any-order AR: a random order throughout training, sampled in random order (Pannatier et al.,
"sigma-GPTs: A New Approach to Autoregressive Models", 2024), on the shared backbone.

The raster layout (``next_token_inputs``) over a fresh random permutation per sample at every step, with the
target-aware position embedding of RAR (each slot carries the position it predicts next: sigma-GPT's "double
positional encoding"). It is RAR with r = 1 for all of training, and unlike RAR it is *sampled* in a random order
too, one token per step with the KV cache. Because the order is chosen at sampling time, known positions go
first (inpainting and editing see every kept token, like RandAR / ARPG), and the order policies
(``sample.schedule=locality|halton``) apply. The comparison it enables: what any-order training costs against a
fixed order at equal compute, without RandAR's position tokens or ARPG's query stream. sigma-GPT's rejection
sampling (several tokens per step) is not implemented: one token per step.
"""
from __future__ import annotations

from lightning_modules.base import ARModule
from lightning_modules.order_policies import ORDER_POLICIES
from lightning_modules.ordering import AnyOrder, Capabilities
from lightning_modules.raster import RasterOrdering


class SigmaGPTOrdering(AnyOrder, RasterOrdering):
    """The raster ordering's next-token layout and one-token decode steps (RasterOrdering), over AnyOrder's
    random orders: a fresh one per sample for training and for decoding, known positions first."""

    capabilities = Capabilities(any_order=True, parallel=False, per_sample_orders=True, flavours=("llama", "rar_vit"),
                                schedules=("one_per_step", *ORDER_POLICIES))
    default_sample = dict(schedule="one_per_step", cfg_schedule="constant")

    def backbone_options(self, dims):
        return {"target_aware": True}


class SigmaGPTModule(ARModule):
    ordering_class = SigmaGPTOrdering
