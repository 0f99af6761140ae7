"""Config system: presets load, paper presets match the papers' parameter counts, and every malformed config
is refused with one line naming the key (exit 2 from the CLIs, no traceback)."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from experiments.config import ConfigError, batch_layout, load_config, run_name

PRESETS = sorted(glob.glob(os.path.join(REPO, "experiments", "configs", "*.yaml")) +
                 glob.glob(os.path.join(REPO, "experiments", "configs", "demo", "*.yaml")))
DEMO = os.path.join(REPO, "experiments", "configs", "demo", "raster.yaml")

# (preset, vocabulary, paper parameter count) — RAR Tab. 1, RandAR/ARPG/LlamaGen as in the method digests
PAPER_COUNTS = [("rar_B", 1024, 261e6), ("rar_L", 1024, 461e6), ("rar_XL", 1024, 955e6), ("rar_XXL", 1024, 1499e6),
                ("randar_L", 16384, 343e6), ("randar_XL", 16384, 775e6), ("arpg_L", 16384, 320e6),
                ("arpg_XL", 16384, 719e6), ("arpg_XXL", 16384, 1.3e9), ("llamagen_L", 16384, 343e6)]


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: os.path.basename(p))
def test_every_preset_loads(path):
    cfg = load_config([path])
    assert run_name(cfg)


@pytest.mark.parametrize("preset,vocab,paper", PAPER_COUNTS)
def test_paper_presets_parameter_counts(preset, vocab, paper):
    from experiments.build import build_lightning_module

    cfg = load_config([os.path.join(REPO, "experiments", "configs", f"{preset}.yaml")],
                      ["tokenizer.kind=codes", "tokenizer.path=", f"tokenizer.vocab_size={vocab}"])
    with torch.device("meta"):
        module = build_lightning_module(cfg, (16, 16))
    count = sum(p.numel() for p in module.backbone.parameters())
    assert abs(count - paper) / paper < 0.01, f"{preset}: {count / 1e6:.1f}M vs paper {paper / 1e6:.0f}M"


def test_batch_layout_is_derived_from_the_global_batch():
    cfg = load_config([DEMO], ["trainer.global_batch_size=64", "trainer.devices=2", "trainer.num_nodes=2",
                               "trainer.micro_batch_size=8"])
    assert batch_layout(cfg) == (4, 8, 2)


def test_run_names_survive_an_upgrade_that_adds_a_key():
    """A run's name (and so resume=auto, a requeued SLURM job, ablate's skipping of finished arms) comes from the
    config hash. A key added later must leave it as it was (experiments/config.py::HASH_NEUTRAL), or every run
    started before the upgrade starts again from step 0 under a new name. Pinned: the demo preset's hash before
    trainer.tf32 / sample.tf32 were added. Changing an existing default changes it on purpose (update the pin)."""
    from experiments.config import HASH_NEUTRAL, config_hash

    cfg = load_config([DEMO])
    assert config_hash(cfg) == "b006cd05"
    for key, value in HASH_NEUTRAL.items():  # any other value of a neutral key is another run
        assert config_hash(load_config([DEMO], [f"{key}={not value}"])) != config_hash(cfg), key
    assert run_name(cfg) == "raster-llama-small-s0-b006cd05"


MALFORMED = [
    # unknown keys
    ("model.foo=1", "model.foo"), ("modle.variant=rar", "modle"), ("trainer.gpus=2", "trainer.gpus"),
    ("optim.momentum=0.9", "optim.momentum"), ("data.path=/x", "data.path"), ("sample.steps=3", "sample.steps"),
    ("eval.fid=1", "eval.fid"), ("callbacks.ema=0.9", "callbacks.ema"), ("model.llama.dropout=0.1", "model.llama.dropout"),
    ("tokenizer.vocab=3", "tokenizer.vocab"),
    # wrong types
    ("trainer.max_steps=abc", "trainer.max_steps"), ("optim.lr=fast", "optim.lr"), ("seed=x", "seed"),
    ("model.num_classes=ten", "model.num_classes"), ("trainer.devices=two", "trainer.devices"),
    ("data.num_workers=1.5", "data.num_workers"), ("sample.top_k=0.5", "sample.top_k"),
    ("model.grad_checkpointing=maybe", "model.grad_checkpointing"), ("trainer.global_batch_size=[1]", "trainer.global_batch_size"),
    ("sample.temperature=hot", "sample.temperature"), ("model.dim=big", "model.dim"),
    ("callbacks.sample_classes=[1,x]", "callbacks.sample_classes"),
    ("tokenizer.options.foo=1", "tokenizer.options.foo"), ("optim.warmup_steps=2.5", "optim.warmup_steps"),
    ("data.samples_per_epoch=3", "data.samples_per_epoch"),
    # bad values
    ("model.variant=spiral", "model.variant"), ("model.flavour=gpt2", "model.flavour"), ("model.size=huge", "model.size"),
    ("model.class_dropout=1.5", "model.class_dropout"), ("model.class_dropout=-0.1", "model.class_dropout"),
    ("model.llama.token_dropout=1.0", "model.llama.token_dropout"), ("model.num_classes=0", "model.num_classes"),
    ("model.rar_anneal_start=1.5", "model.rar_anneal_start"), ("model.dim=-8", "model.dim"),
    ("tokenizer.kind=bpe", "tokenizer.kind"), ("tokenizer.levels=1", "tokenizer.levels"),
    ("data.kind=folder", "data.kind"), ("data.image_size=0", "data.image_size"), ("data.center_crop=random", "data.center_crop"),
    ("data.num_workers=-1", "data.num_workers"), ("optim.lr=0", "optim.lr"), ("optim.lr=-1e-3", "optim.lr"),
    ("optim.betas=[0.9]", "optim.betas"), ("optim.betas=[0.9,1.5]", "optim.betas"), ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.schedule=step", "optim.schedule"), ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
    ("optim.grad_clip=-1", "optim.grad_clip"), ("optim.max_nonfinite_in_a_row=0", "optim.max_nonfinite_in_a_row"),
    ("trainer.max_steps=0", "trainer.max_steps"), ("trainer.global_batch_size=0", "trainer.global_batch_size"),
    ("trainer.devices=0", "trainer.devices"), ("trainer.strategy=fsdp2", "trainer.strategy"),
    ("trainer.precision=fp8", "trainer.precision"), ("trainer.accelerator=tpu", "trainer.accelerator"),
    ("trainer.val_every_steps=0", "trainer.val_every_steps"), ("sample.temperature=0", "sample.temperature"),
    ("sample.top_p=0", "sample.top_p"), ("sample.top_p=1.5", "sample.top_p"), ("sample.mode=fast", "sample.mode"),
    ("sample.precision=fp16", "sample.precision"), ("sample.draw=gumbel", "sample.draw"),
    ("sample.compile=static", "sample.compile"), ("sample.kernels=mkl", "sample.kernels"),
    ("sample.schedule=linear", "sample.schedule"), ("sample.cfg_schedule=cosine", "sample.cfg_schedule"),
    ("sample.cfg_scale=-1", "sample.cfg_scale"), ("callbacks.ema_decay=1.0", "callbacks.ema_decay"),
    ("callbacks.sample_classes=[12]", "callbacks.sample_classes"), ("eval.extractor=clip", "eval.extractor"),
    ("resume=sometimes", "resume"), ("seed=-3", "seed"),
]
# impossible combinations need more than one override
COMBOS = [
    (["sample.kernels=onednn", "trainer.accelerator=gpu"], "sample.kernels"),  # oneDNN packs for a CPU only
    (["trainer.global_batch_size=63", "trainer.devices=2"], "trainer.global_batch_size"),
    (["trainer.global_batch_size=64", "trainer.devices=2", "trainer.micro_batch_size=24"], "trainer.micro_batch_size"),
    (["model.flavour=rar_vit", "model.variant=randar"], "model.flavour"),
    (["model.flavour=rar_vit", "model.variant=arpg"], "model.flavour"),
    (["model.variant=rar", "model.rar_anneal_start=0.8", "model.rar_anneal_end=0.6"], "model.rar_anneal_end"),
    (["model.rar_anneal_start=0.25"], "model.rar_anneal_start"),  # raster never reads it: an error, not ignored
    (["model.dim=100", "model.n_head=3"], "model.dim"),
    (["eval.fid_num_samples=100", "eval.extractor=inception"], "eval.inception_weights"),
    (["optim.warmup_steps=50", "trainer.max_steps=10"], "optim.warmup_steps"),
    (["data.kind=images"], "data.train_shards"),
    (["tokenizer.kind=codes", "tokenizer.vocab_size=0"], "tokenizer.vocab_size"),
]


def test_at_least_fifty_malformed_configs():
    assert len(MALFORMED) + len(COMBOS) >= 50


@pytest.mark.parametrize("overrides,key", [([o], k) for o, k in MALFORMED] + COMBOS,
                         ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_malformed_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config([DEMO], overrides)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(key) or f" {key}" in message or key in message.split(":")[0], message


def test_command_line_strings_are_taken_verbatim():
    """YAML would turn name=off into False ("False" on disk) and a path like 1e3 into 1000.0; str fields keep the
    text as typed (one level of quotes stripped), every other field is still parsed and type-checked."""
    cfg = load_config([DEMO], ["name=off", "tokenizer.kind=digits_vq", "tokenizer.path=1e3", "data.root='yes'",
                               "trainer.max_steps=7", "model.class_dropout=0.25", "trainer.precision=32"])
    assert (cfg.name, cfg.tokenizer.path, cfg.data.root) == ("off", "1e3", "yes")
    assert cfg.trainer.precision == "32"  # a Literal of strings is a string field too
    assert cfg.trainer.max_steps == 7 and cfg.model.class_dropout == 0.25
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        load_config([DEMO], ["trainer.max_steps=off"])


def test_malformed_yaml_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {variant: raster\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config([str(bad)])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  width: 3\n")
    with pytest.raises(ConfigError, match=r"^model\.width"):
        load_config([str(unknown)])


@pytest.mark.parametrize("args,key", [(["model.foo=1"], "model.foo"), (["trainer.max_steps=abc"], "trainer.max_steps"),
                                      (["trainer.global_batch_size=7", "trainer.devices=2"], "trainer.global_batch_size")])
def test_cli_exits_2_with_one_line(args, key):
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "-c", DEMO, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_cli_help_and_print_config():
    for args in (["--help"], ["-c", DEMO, "--print-config", "model.variant=arpg"]):
        proc = subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert "variant: arpg" in proc.stdout


# ------------------------------------------------------------------ no silently ignored setting
UNREAD_EXAMPLES = {  # key -> (a value to set, overrides under which nothing reads it)
    "model.llama.token_dropout": (0.3, ["model.flavour=rar_vit", "model.variant=rar"]),
    "model.llama.resid_dropout": (0.3, ["model.flavour=rar_vit", "model.variant=rar"]),
    "model.llama.ffn_dropout": (0.3, ["model.flavour=rar_vit", "model.variant=rar"]),
    "model.llama.norm_eps": (1e-6, ["model.flavour=rar_vit", "model.variant=rar"]),
    "model.llama.rope_base": (500.0, ["model.flavour=rar_vit", "model.variant=rar"]),
    "model.llama.class_rope": ("identity", ["model.flavour=rar_vit", "model.variant=rar"]),
    "model.rar_vit.dropout": (0.3, []), "model.rar_vit.attn_dropout": (0.3, []),
    "tokenizer.path": ("vq.safetensors", []), "tokenizer.levels": (9, ["tokenizer.kind=codes",
                                                                       "tokenizer.vocab_size=17"]),
    "tokenizer.vocab_size": (64, []),
    "data.root": ("/elsewhere", ["data.kind=images", "data.train_shards=/x/train-{000000..000001}.tar"]),
    "data.code_dir": ("/some/codes", []), "data.train_shards": ("/x/train-000000.tar", []),
    "data.val_shards": ("/x/val-000000.tar", []),
    "data.center_crop": ("adm", ["data.kind=codes", "data.code_dir=/codes"]),
    "data.random_flip": (True, ["data.kind=codes", "data.code_dir=/codes"]),
    "sample.cfg_power": (2.0, []), "sample.cfg_start": (2.0, []),
    "callbacks.sample_classes": ([1, 2], ["callbacks.sample_every_steps=0"]),
    "callbacks.sample_per_class": (2, ["callbacks.sample_every_steps=0"]),
    "callbacks.sample_seed": (3, ["callbacks.sample_every_steps=0"]),
    "eval.fid_every_steps": (100, []), "eval.extractor": ("inception", []), "eval.reference": ("ref.npz", []),
    "eval.extractor_weights": ("w.safetensors", []), "eval.inception_weights": ("i.pth", []),
}


def test_every_config_key_says_who_reads_it():
    from omegaconf import OmegaConf

    from experiments.config import ExperimentConfig
    from experiments.readers import READERS, When, config_leaves

    leaves = config_leaves(OmegaConf.structured(ExperimentConfig))
    assert sorted(leaves) == sorted(READERS), "a config key without a READERS entry (experiments/readers.py)"
    conditional = sorted(k for k, rule in READERS.items() if isinstance(rule, When))
    assert conditional == sorted(UNREAD_EXAMPLES), "every conditionally read key needs an example here"


@pytest.mark.parametrize("key", sorted(UNREAD_EXAMPLES))
def test_a_key_nothing_reads_is_refused_naming_it(key):
    value, context = UNREAD_EXAMPLES[key]
    debug = os.path.join(REPO, "experiments", "configs", "debug_raster.yaml")
    load_config([debug], context)  # the context alone is a valid config
    text = json.dumps(value) if not isinstance(value, str) else value
    with pytest.raises(ConfigError) as err:
        load_config([debug], [*context, f"{key}={text}"])
    assert str(err.value).startswith(f"{key}: is only read when"), str(err.value)


def test_paper_presets_draw_order_maps_with_their_sample_grids():
    for path in glob.glob(os.path.join(REPO, "experiments", "configs", "*_*.yaml")):
        if os.path.basename(path).split("_")[0] in ("rar", "randar", "arpg", "llamagen"):
            c = load_config([path]).callbacks
            assert c.order_map_every_steps == c.sample_every_steps > 0, path


def test_a_run_that_differs_only_in_operational_keys_is_pointed_to(tmp_path):
    """A re-run with another trainer.ckpt_every_steps (or log interval, timeouts) gets another name (the hash keeps
    them: taking them out would rename existing runs), so train says which existing run it is and how to continue it
    (experiments/config.py::operational_twin); a run that differs in what it computes has no twin."""
    from omegaconf import OmegaConf

    from experiments.config import operational_twin

    out = [f"out_dir={tmp_path}"]
    first = load_config([DEMO], out)
    os.makedirs(tmp_path / run_name(first))
    OmegaConf.save(first, tmp_path / run_name(first) / "config.yaml")
    again = load_config([DEMO], [*out, "trainer.ckpt_every_steps=7", "trainer.stop_grace_s=5"])
    assert run_name(again) != run_name(first)
    name, keys = operational_twin(again)
    assert name == run_name(first) and keys == [f"trainer.ckpt_every_steps={first.trainer.ckpt_every_steps}",
                                                f"trainer.stop_grace_s={first.trainer.stop_grace_s}"]
    assert operational_twin(load_config([DEMO], [*out, "trainer.ckpt_every_steps=7", "optim.lr=0.0123"])) is None
    assert operational_twin(first) is None  # itself: nothing differs
