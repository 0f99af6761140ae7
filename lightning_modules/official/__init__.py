"""Importers for officially released weights (LlamaGen GPT, RandAR, ARPG, RAR, LlamaGen VQ, MaskGIT VQGAN).

Per generator family (llamagen_gpt, randar, arpg, rar): ``model_config(official_cfg)``, ``to_ours(sd)``,
``to_official(sd)``, ``SAMPLE_DEFAULTS``, ``trace_settings(inputs)``; ``generators`` builds / loads them strictly.
Tokenizer families (llamagen_vq, maskgit_vq) load through their own modules into ``tokenizers/``.
``checkpoint_io`` reads files safely (never unpickling objects); ``parity`` runs the parity fixtures and decode
traces of tests/assets/parity. CLIs: experiments.import_official, experiments.parity (docs/official.md).
"""

# family -> (kind, module under lightning_modules.official); the CLIs validate --family against this
FAMILIES = {
    "llamagen_gpt": ("generator", "llamagen_gpt"),
    "randar": ("generator", "randar"),
    "arpg": ("generator", "arpg"),
    "rar": ("generator", "rar"),
    "llamagen_vq": ("tokenizer", "llamagen_vq"),
    "maskgit_vq": ("tokenizer", "maskgit_vq"),
}
