"""Run parity fixtures and decode traces (formats: tests/assets/parity/README.md) against our modules.

    report = run_fixture("randar_tiny.pt")      # teacher-forced outputs; decode traces are dispatched to run_trace
    report = run_trace("decode_arpg_tiny.pt")   # the sampler, step by step, with the official tokens forced
    report.ok, report.max_abs_diff(), report.failures()

A report maps an output name to a number: the max |ours - official| for float outputs, or, for integer /
structural outputs (VQ codes, decode positions, the final grid, step counts), the number of mismatching
elements, which must be exactly 0 whatever the tolerance. Everything runs in float32 on the CPU. Nothing here
depends on the shipped sizes or seeds: shapes, orders and settings are read from each file.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from lightning_modules.official import GENERATORS, TOKENIZERS
REQUIRED = ("family", "config", "state_dict", "inputs", "outputs")


class FixtureError(ValueError):
    """The file is not a readable parity fixture (CLI exit code 2)."""


class ParityReport(dict):
    """name -> max abs diff (float outputs) or mismatch count (names in ``exact``), in insertion order."""

    def __init__(self, source: str, atol: float = 1e-4):
        super().__init__()
        self.source, self.atol = source, atol
        self.exact: set[str] = set()
        self.notes: list[str] = []

    def diff(self, name: str, ours, ref) -> None:
        ours, ref = torch.as_tensor(ours, dtype=torch.float32), torch.as_tensor(ref, dtype=torch.float32)
        if ours.shape != ref.shape:  # incomparable: an infinite difference can never pass
            self.notes.append(f"{name}: shape {list(ours.shape)} vs official {list(ref.shape)}")
            self[name] = math.inf
        else:
            self[name] = float((ours - ref).abs().max()) if ours.numel() else 0.0

    def mismatches(self, name: str, ours, ref) -> None:
        ours, ref = torch.as_tensor(ours), torch.as_tensor(ref)
        self.exact.add(name)
        if ours.shape != ref.shape:
            self.notes.append(f"{name}: shape {list(ours.shape)} vs official {list(ref.shape)}")
            self[name] = max(ours.numel(), ref.numel(), 1)
        else:
            self[name] = int((ours.long() != ref.long()).sum())

    def passed(self, name: str) -> bool:
        value = self[name]
        return value == 0 if name in self.exact else value <= self.atol

    def failures(self) -> list[str]:
        return [name for name in self if not self.passed(name)]

    @property
    def ok(self) -> bool:
        return not self.failures()

    def max_abs_diff(self) -> float:
        """The largest float difference (mismatch counts are not differences and are reported apart)."""
        return max((v for k, v in self.items() if k not in self.exact), default=0.0)


# ---------------------------------------------------------------------------------------------- loading
def load_fixture(path_or_dict) -> dict:
    """A fixture dict, read with weights_only=True; FixtureError (naming the file) when it is not one."""
    if isinstance(path_or_dict, dict):
        fx, name = path_or_dict, "<dict>"
    else:
        name = os.fspath(path_or_dict)
        if not os.path.isfile(name):
            raise FixtureError(f"{name}: file not found")
        try:
            fx = torch.load(name, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any reason means "not a fixture we can read"
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise FixtureError(f"{name}: not a readable parity fixture ({type(err).__name__}: {first})") from None
    if not isinstance(fx, dict) or any(k not in fx for k in REQUIRED):
        have = sorted(map(str, fx)) if isinstance(fx, dict) else type(fx).__name__
        raise FixtureError(f"{name}: not a parity fixture (needs keys {list(REQUIRED)}, has {have})")
    if fx["family"] not in GENERATORS + TOKENIZERS:
        raise FixtureError(f"{name}: unknown family {fx['family']!r} (known: {list(GENERATORS + TOKENIZERS)})")
    if is_trace(fx) and fx["family"] not in GENERATORS:
        raise FixtureError(f"{name}: decode trace of a non-generator family {fx['family']!r}")
    return fx


def is_trace(fx: dict) -> bool:
    """Decode traces record per-step ``logits_cond``; teacher-forced fixtures do not."""
    return isinstance(fx.get("outputs"), dict) and "logits_cond" in fx["outputs"]


def _source(path_or_dict) -> str:
    return "<dict>" if isinstance(path_or_dict, dict) else os.path.basename(os.fspath(path_or_dict))


def build_official_generator(fx: dict):
    """Our module at the fixture's configuration, official weights loaded strictly, eval mode, CPU fp32."""
    from lightning_modules.official.generators import build_generator, load_official_weights

    module = build_generator(fx["family"], fx["config"])
    load_official_weights(module, fx["family"], fx["state_dict"])
    return module.float().eval()


# ---------------------------------------------------------------------------------------------- fixtures
def run_fixture(path_or_dict, atol: float = 1e-4) -> ParityReport:
    """Compare every stored output of a fixture (or a decode trace, see ``run_trace``) with ours."""
    fx = load_fixture(path_or_dict)
    if is_trace(fx):
        return run_trace(fx, atol=atol, source=_source(path_or_dict))
    report = ParityReport(_source(path_or_dict), atol)
    with torch.no_grad():
        if fx["family"] in GENERATORS:
            _generator_outputs(fx, report)
        elif fx["family"] == "llamagen_vq":
            _llamagen_vq_outputs(fx, report)
        else:
            _maskgit_vq_outputs(fx, report)
    return report


def _teacher_forced(module, tokens, labels, order, seq_edit=None):
    """Our training forward over a fixed order -> (logits, targets); ``seq_edit`` may adjust the Seq first."""
    seq, targets = module.ordering.train_inputs(tokens, labels, 0, None, order=order)
    if seq_edit is not None:
        seq_edit(seq)
    return module.backbone(seq), targets


def _loss(logits, targets) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _kv_cache_logits(module, tokens, labels, order) -> torch.Tensor:
    """Our cached sampler, fed the fixture's tokens one per step, no CFG -> logits [B, N, V] (official KV path)."""
    from lightning_modules.sampling import generate

    rec = []
    settings = module.sample_settings(schedule="one_per_step", num_steps=tokens.shape[1], cfg_schedule="constant",
                                      cfg_scale=1.0, mode="official", tf32=False)  # fp32 references
    generate(module, labels, settings, None, draw=lambda logits, pos: torch.gather(tokens, 1, pos),
             recorder=rec.append, order=order)
    return torch.cat([r["logits_cond"] for r in rec], 1)


def _generator_outputs(fx: dict, report: ParityReport) -> None:
    inp, out = fx["inputs"], fx["outputs"]
    module = build_official_generator(fx)
    tokens, labels = inp["tokens"].long(), inp["class_labels"].long()
    B, N = tokens.shape
    raster = torch.arange(N).expand(B, -1)
    # What is compared follows the fixture's layout, not its family name. Two orders over one weight set (RAR's:
    # r = 1, the file's random permutations, and r = 0, raster): official logits have N + 1 slots; the last one
    # follows the last token and predicts nothing, so slots [:N] are compared.
    if any(part in out for part in ("random", "raster")):
        if "condition_ids" in inp:
            report.mismatches("condition_ids", module.backbone.class_ids(labels), inp["condition_ids"])
        for part in ("random", "raster"):
            if part not in out:
                continue
            ref, order = out[part], out[part]["token_order"].long()
            logits, targets = _teacher_forced(module, tokens, labels, order)
            report.diff(f"{part}.logits", logits, ref["logits"][:, :N])
            if "labels_permuted" in ref:
                report.mismatches(f"{part}.labels_permuted", targets, ref["labels_permuted"])
            if "loss" in ref:
                report.diff(f"{part}.loss", _loss(logits, targets), ref["loss"])
            if "logits_kvcache" in ref:
                report.diff(f"{part}.logits_kvcache", _kv_cache_logits(module, tokens, labels, order),
                            ref["logits_kvcache"])
        return
    order = inp["token_order"].long() if "token_order" in inp else raster  # no order in the file: raster
    logits, targets = _teacher_forced(module, tokens, labels, order)
    report.diff("logits", logits, out["logits"])
    if "targets_permuted" in inp:
        report.mismatches("targets_permuted", targets, inp["targets_permuted"])
    if "loss" in out:
        report.diff("loss", _loss(logits, targets), out["loss"])
    if "logits_kvcache" in out:
        report.diff("logits_kvcache", _kv_cache_logits(module, tokens, labels, order), out["logits_kvcache"])
    if "logits_all_slots" in out:  # RandAR: the head at every slot, not only the position-instruction slots
        every, _ = _teacher_forced(module, tokens, labels, order, lambda seq: setattr(seq, "out", None))
        report.diff("logits_all_slots", every, out["logits_all_slots"])
    if "logits_eval_mode_unmasked" in out:
        # ARPG in eval mode runs with no mask in either pass (its released inference path): not the training
        # computation, but ours must reproduce it when told to drop both masks.
        def unmask(seq):
            L, Q = seq.kind.shape[1], seq.query_pos.shape[1]
            seq.mask = torch.ones(1, 1, L, L, dtype=torch.bool)
            seq.query_mask = torch.ones(1, 1, Q, L, dtype=torch.bool)

        free, _ = _teacher_forced(module, tokens, labels, order, unmask)
        report.diff("logits_eval_mode_unmasked", free, out["logits_eval_mode_unmasked"])


def _codes_report(report: ParityReport, codes, out: dict) -> None:
    report.mismatches("codes", codes.reshape(out["codes"].shape), out["codes"])
    if report["codes"] and "min_code_margin" in out:
        report.notes.append(f"codes: {report['codes']} mismatching; the file's min_code_margin is "
                            f"{float(out['min_code_margin']):.2e} (a near-tie flips on tiny pre_quant differences)")


def _llamagen_vq_outputs(fx: dict, report: ParityReport) -> None:
    from lightning_modules.official.checkpoint_io import strict_load
    from tokenizers.vq import LlamaGenVQ

    model = strict_load(LlamaGenVQ(**fx["config"]), fx["state_dict"], f"{report.source} state_dict").float().eval()
    pixels, out = fx["inputs"]["pixels"], fx["outputs"]
    images = model.to_model_space(pixels)
    z = model.pre_quant(images)
    report.diff("pre_quant", z, out["pre_quant"])
    codes = model.encode(pixels)  # the tokenizer's public encode: uint8 pixels -> codes [B, h, w]
    _codes_report(report, codes, out)
    if "quant" in out:
        report.diff("quant", model.quantize.lookup(codes), out["quant"])
    grid = out["codes"].long().view(codes.shape)  # decoders are compared on the official codes
    if "decoded_from_codes" in out:
        report.diff("decoded_from_codes", model.decode_code(grid), out["decoded_from_codes"])
    if "reconstruction" in out:
        report.diff("reconstruction", model(images)[0], out["reconstruction"])


def _maskgit_vq_outputs(fx: dict, report: ParityReport) -> None:
    from lightning_modules.official.checkpoint_io import strict_load
    from tokenizers.maskgit_vq import MaskGITVQ, config_from_official

    cfg = fx["config"]
    cfg = config_from_official(cfg) if "vqgan_config" in cfg else cfg
    model = strict_load(MaskGITVQ(**cfg), fx["state_dict"], f"{report.source} state_dict").float().eval()
    pixels, out = fx["inputs"]["pixels"], fx["outputs"]
    z = model.encoder(model.to_model_space(pixels))
    report.diff("pre_quant", z, out["pre_quant"])
    codes = model.encode(pixels)
    _codes_report(report, codes, out)
    grid = out["codes"].long().view(codes.shape)
    if "decoded" in out:
        report.diff("decoded", model.decode_code(grid), out["decoded"])
    if "decoded_unclamped" in out:
        report.diff("decoded_unclamped", model.decoder(model.quantize.lookup(grid)), out["decoded_unclamped"])


# ---------------------------------------------------------------------------------------------- traces
def run_trace(path_or_dict, atol: float = 1e-4, mode: str = "official", source: str | None = None) -> ParityReport:
    """Drive our sampler with the trace's forced tokens and compare it step by step with the official generate.

    Per step t: ``step{t}.positions`` (exact), ``.logits_cond``, ``.logits_uncond``, ``.logits_cfg``, ``.probs``
    and ``.cfg_scale``; then ``num_steps`` and ``tokens`` (the final grid, exact). ``mode="consistent"`` runs our
    training-consistent sampler instead, which must NOT match RandAR/ARPG traces (used to prove the quirk).
    """
    from lightning_modules.official.generators import family_module
    from lightning_modules.sampling import SampleSettings, generate

    fx = load_fixture(path_or_dict)
    if not is_trace(fx):
        raise FixtureError(f"{source or _source(path_or_dict)}: not a decode trace (no outputs.logits_cond)")
    report = ParityReport(source or _source(path_or_dict), atol)
    inp, out = fx["inputs"], fx["outputs"]
    module = build_official_generator(fx)
    settings = dict(family_module(fx["family"]).trace_settings(inp), mode=mode, tf32=False)  # fp32 references
    for key, cast in (("temperature", float), ("top_k", int), ("top_p", float)):
        if key in inp:
            settings[key] = cast(inp[key])
    fields = SampleSettings.__dataclass_fields__
    forced = inp["forced_tokens"].long()
    rec: list[dict] = []
    with torch.no_grad():
        grid = generate(module, inp["class_labels"].long(), SampleSettings(**{k: v for k, v in settings.items()
                                                                               if k in fields}),
                        None, draw=lambda logits, pos: torch.gather(forced, 1, pos), recorder=rec.append,
                        order=inp["token_order"].long())
    plain = settings["top_k"] == 0 and settings["top_p"] >= 1.0  # probs = softmax(logits / T) exactly
    for t in range(max(len(rec), len(out["positions"]))):
        name = f"step{t}"
        if t >= len(rec) or t >= len(out["positions"]):
            report.exact.add(f"{name}.positions")  # a step that only one side ran
            report[f"{name}.positions"] = 1
            continue
        r = rec[t]
        report.mismatches(f"{name}.positions", r["positions"], out["positions"][t])
        report.diff(f"{name}.logits_cond", r["logits_cond"], out["logits_cond"][t])
        uncond = r["logits_uncond"] if r["logits_uncond"] is not None else torch.full_like(r["logits_cond"], math.inf)
        report.diff(f"{name}.logits_uncond", uncond, out["logits_uncond"][t])
        report.diff(f"{name}.logits_cfg", r["logits_cfg"], out["logits_cfg"][t])
        if plain and "probs" in out:
            probs = (r["logits_cfg"] / max(settings["temperature"], 1e-5)).softmax(-1)
            report.diff(f"{name}.probs", probs, out["probs"][t])
        report.diff(f"{name}.cfg_scale", r["cfg_scale"], float(out["cfg_scale"][t]))
    report.mismatches("num_steps", len(rec), int(out.get("num_steps", len(out["positions"]))))
    report.mismatches("tokens", grid, out["tokens"])
    return report
