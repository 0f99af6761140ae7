"""Pre-tokenize WebDataset image shards into code shards (LlamaGen ``extract_codes_c2i.py`` style).

    python -m tokenizers.pretokenize --shards 'DIR/train-{000000..000003}.tar' --out OUTDIR \
        --tokenizer-kind llamagen_vq --tokenizer-path vq.safetensors --image-size 256 [--ten-crop] [--batch-size 64]
    # train and val codes in one call: OUTDIR/train/ and OUTDIR/val/ (what data.code_dir=OUTDIR reads)
    torchrun --standalone --nproc-per-node 8 -m tokenizers.pretokenize --shards 'DIR/train-*.tar' \
        --val-shards 'DIR/val-*.tar' --out OUTDIR --tokenizer-kind ... --image-size 256 --device cuda

Input samples: ``__key__``, an image under ``png``/``jpg``/``jpeg`` (grey or RGB), ``cls`` (ASCII int).
Output (read by the code-shard DataModule; keep EXACTLY):
  OUTDIR/codes-%06d.tar (codes-r{rank}-%06d.tar when world_size > 1), samples with
    ``__key__`` (input key), ``codes.npy`` (int16 if vocab <= 32767 else int32, [n_aug, h, w]), ``cls`` (ASCII int)
    variants: adm_flip -> [ADM centre crop, its horizontal flip];
              ten_crop -> torchvision TenCrop(S) of the ADM centre crop at int(S * crop_range)
  OUTDIR/manifest.json = {num_samples, shards: {name: count}, tokenizer: {kind, fingerprint, config, vocab_size},
                          grid: [h, w], crop_policy, num_variants, skipped, ...}
With --val-shards the train codes go to OUTDIR/train/ and the val codes to OUTDIR/val/ (one variant per sample: the
plain ADM centre crop, which is what validation reads); the manifest also records the image shards' classes.json.
Distributed (torchrun / srun set RANK and WORLD_SIZE, or --rank/--world-size): input shards are split round-robin by
rank (--device cuda takes GPU LOCAL_RANK); each rank writes its shards and manifest.r{rank}.json; rank 0 waits
(--merge-timeout) for all parts of this run and merges them, or run ``--merge`` afterwards (once per split folder).
A rerun into an --out removes manifest.json before it writes codes and writes it when it completes (train/ last);
rank 0 merges only parts of its run (TORCHELASTIC_RUN_ID or SLURM job.step) with its settings and input shards.
Corrupt samples (undecodable image, bad cls, unreadable tar member) are skipped and counted.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import re
import sys
import time

import numpy as np
import torch
from PIL import Image

from datamodules.transforms import adm_center_crop, to_rgb  # the image DataModule's ADM crop: the same pixels

IMAGE_KEYS = ("png", "jpg", "jpeg")


def to_tensor(img: Image.Image) -> torch.Tensor:  # PIL RGB -> uint8 [3, H, W]
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def image_variants(img: Image.Image, size: int, ten_crop: bool = False, crop_range: float = 1.1) -> torch.Tensor:
    """uint8 [n_aug, 3, size, size]: adm_flip (2 variants) or ten_crop (10, torchvision TenCrop order)."""
    img = to_rgb(img)  # 16-bit grey rescaled, as the image DataModule and the shard writer read it
    if not ten_crop:
        crop = adm_center_crop(img, size)
        return torch.stack([to_tensor(crop), to_tensor(crop.transpose(Image.FLIP_LEFT_RIGHT))])
    from torchvision.transforms.functional import ten_crop as tv_ten_crop

    crop = adm_center_crop(img, int(size * crop_range))
    return torch.stack([to_tensor(c) for c in tv_ten_crop(crop, size)])


def expand_shards(pattern: str) -> list[str]:
    """'DIR/train-{000000..000003}.tar' (brace ranges), globs, or comma/space separated lists."""
    import braceexpand

    out: list[str] = []
    for part in pattern.replace(",", " ").split() if "{" not in pattern else [pattern]:
        for name in braceexpand.braceexpand(part):
            out.extend(sorted(glob.glob(name)) if any(c in name for c in "*?[") else [name])
    missing = [s for s in out if not os.path.isfile(s)]
    if not out or missing:
        raise FileNotFoundError(f"--shards {pattern!r}: missing shard files {missing[:5]}" if missing
                                else f"--shards {pattern!r}: matched no files")
    return out


def env_rank_world() -> tuple[int, int]:
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if r in os.environ and w in os.environ:
            return int(os.environ[r]), int(os.environ[w])
    return 0, 1


class Skips:
    """Counts skipped samples; used as the webdataset handler for tar-level errors too."""

    def __init__(self):
        self.count, self.examples = 0, []

    def __call__(self, exn: BaseException) -> bool:
        self.add(f"{exn.__class__.__name__}: {str(exn)[:120]}")
        return True  # keep going

    def add(self, why: str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(why)


def iter_samples(shards: list[str], skips: Skips):
    """Yield (key, PIL image, label) from the shards in order; undecodable samples are counted in ``skips``."""
    import webdataset as wds

    for shard in shards:
        ds = wds.WebDataset([shard], shardshuffle=False, nodesplitter=None, workersplitter=None,
                            handler=skips, empty_check=False)
        for sample in ds:
            key = sample.get("__key__", "?")
            try:
                raw = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
                if raw is None:
                    raise ValueError(f"no image under {IMAGE_KEYS}")
                img = Image.open(io.BytesIO(raw))
                img.load()
                label = int(sample["cls"].decode("ascii").strip())
            except Exception as exn:  # noqa: BLE001 - any broken sample is skipped, not fatal
                skips.add(f"{shard}:{key}: {exn.__class__.__name__}: {str(exn)[:100]}")
                continue
            yield key, img, label


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def shard_pattern(rank: int, world: int) -> str:
    return "codes-%06d.tar" if world == 1 else f"codes-r{rank}-%06d.tar"


def shard_classes(shards: list[str]) -> tuple[str, dict | None]:
    """(path, map) of the classes.json (synset -> index) the shard writer put beside the image shards (None: none)."""
    path = os.path.abspath(os.path.join(os.path.dirname(shards[0]), "classes.json"))
    return path, json.load(open(path)) if os.path.isfile(path) else None


def check_same_classes(train: list[str], val: list[str]) -> None:
    """Val labels index the train class map: val shards written with another classes.json name other classes."""
    (train_path, a), (val_path, b) = shard_classes(train), shard_classes(val)
    if a is not None and b is not None and a != b:
        raise ValueError(f"--val-shards: {val_path} ({len(b)} classes) differs from the --shards' {train_path} "
                         f"({len(a)} classes): val labels would name other classes (datamodules.shards --classes)")


def pretokenize(shards: list[str], out: str, tokenizer, kind: str, image_size: int, ten_crop: bool = False,
                crop_range: float = 1.1, batch_size: int = 32, rank: int = 0, world_size: int = 1,
                maxcount: int = 10000, device: str = "cpu", plain: bool = False) -> dict:
    """Encode this rank's share of ``shards``; returns (and writes) this rank's manifest part. ``plain``: one
    variant per sample, the ADM centre crop (validation codes)."""
    import webdataset as wds

    if not 0 <= rank < world_size:
        raise ValueError(f"--rank {rank} must be in [0, --world-size {world_size})")
    os.makedirs(out, exist_ok=True)
    for old in ("manifest.json", f"manifest.r{rank}.json"):  # an earlier run's, not to be read with this run's codes
        if os.path.isfile(os.path.join(out, old)):
            os.remove(os.path.join(out, old))
    mine = shards[rank::world_size]
    tokenizer = tokenizer.to(device).eval()
    grid = list(tokenizer.grid(image_size, image_size))
    dtype = np.int16 if tokenizer.vocab_size <= 32767 else np.int32
    pattern = shard_pattern(rank, world_size)
    skips, counts, written = Skips(), {}, 0
    writer = wds.ShardWriter(os.path.join(out, pattern), maxcount=maxcount, maxsize=float("inf"), verbose=0)

    def flush(batch):
        nonlocal written
        images = torch.stack([v for _, v, _ in batch])  # [B, n_aug, 3, S, S]
        b, n_aug = images.shape[:2]
        codes = tokenizer.encode(images.flatten(0, 1).to(device)).view(b, n_aug, *grid).cpu().numpy()
        for (key, _, label), c in zip(batch, codes):
            writer.write({"__key__": key, "codes.npy": npy_bytes(c.astype(dtype)),
                          "cls": str(label).encode("ascii")})
            name = pattern % (written // maxcount)  # ShardWriter opens a new shard every ``maxcount`` samples
            counts[name] = counts.get(name, 0) + 1
            written += 1

    from lightning_modules.progress import Progress

    batch = []
    # the total is unknown until the shards are read (WebDataset tars carry no count): images done, rate, elapsed
    bar = Progress(None, f"pretokenize rank {rank}/{world_size}", "images")
    try:
        for key, img, label in iter_samples(mine, skips):
            bar.update()
            try:
                variants = image_variants(img, image_size, ten_crop and not plain, crop_range)
                batch.append((key, variants[:1] if plain else variants, label))
            except Exception as exn:  # noqa: BLE001 - e.g. truncated image data discovered while cropping
                skips.add(f"{key}: {exn.__class__.__name__}: {str(exn)[:100]}")
                continue
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    finally:
        bar.close()
        writer.close()
    # this rank's names this run did not fill: the empty tar ShardWriter opened last, an earlier run's higher ones
    own = re.compile(re.escape(pattern.split("%")[0]) + r"\d{6,}\.tar")
    for name in os.listdir(out):
        if own.fullmatch(name) and name not in counts:
            os.remove(os.path.join(out, name))
    classes = shard_classes(shards)[1]
    policy = "adm_center" if plain else "ten_crop" if ten_crop else "adm_flip"
    part = {"num_samples": written, "shards": counts, "classes": classes,
            "num_classes": len(classes) if classes else None,
            "tokenizer": {"kind": kind, "fingerprint": tokenizer.fingerprint, "config": tokenizer.config(),
                          "vocab_size": tokenizer.vocab_size},
            "grid": grid, "crop_policy": policy,
            "num_variants": {"adm_center": 1, "ten_crop": 10, "adm_flip": 2}[policy], "skipped": skips.count,
            "skipped_examples": skips.examples, "image_size": image_size,
            "crop_range": crop_range if policy == "ten_crop" else 1.0,
            "codes_dtype": np.dtype(dtype).name, "input_shards": mine, "rank": rank, "world_size": world_size,
            "run_id": "/".join(filter(None, map(os.environ.get, RUN_ENV))),
            "inputs_digest": hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]}
    if world_size > 1:
        write_json(os.path.join(out, f"manifest.r{rank}.json"), part)
    return part


def write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)  # readers never see a half-written manifest


SHARED_KEYS = ("tokenizer", "grid", "crop_policy", "num_variants", "image_size", "crop_range", "codes_dtype",
               "world_size", "classes", "num_classes")
RUN_ENV = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID")  # shared by the ranks of one launch, not the next


def merge_parts(parts: list[dict]) -> dict:
    """One manifest from per-rank parts; refuses parts made with another tokenizer or crop policy."""
    if not parts:
        raise ValueError("pretokenize --merge: no manifest.r*.json parts found")
    first = parts[0]
    for p in parts[1:]:
        for k in SHARED_KEYS:  # .get: parts written before the classes were recorded
            if p.get(k) != first.get(k):
                raise ValueError(f"pretokenize --merge: rank {p['rank']} has {k}={p.get(k)!r}, rank "
                                 f"{first['rank']} has {first.get(k)!r}")
    ranks = sorted(p["rank"] for p in parts)
    if ranks != list(range(first["world_size"])):
        raise ValueError(f"pretokenize --merge: have parts for ranks {ranks}, expected 0..{first['world_size'] - 1}")
    merged = {k: first.get(k) for k in SHARED_KEYS}
    merged["shards"] = {k: v for p in sorted(parts, key=lambda p: p["rank"]) for k, v in p["shards"].items()}
    merged["num_samples"] = sum(p["num_samples"] for p in parts)
    merged["skipped"] = sum(p["skipped"] for p in parts)
    merged["skipped_examples"] = [e for p in parts for e in p["skipped_examples"]][:10]
    merged["input_shards"] = [s for p in sorted(parts, key=lambda p: p["rank"]) for s in p["input_shards"]]
    return merged


def write_manifest(out: str, merged: dict) -> dict:
    """OUT/manifest.json, and a warning about codes tars beside it that it does not list (an earlier run's)."""
    write_json(os.path.join(out, "manifest.json"), merged)
    stale = sorted(n for n in os.listdir(out) if re.fullmatch(r"codes-.+\.tar", n) and n not in merged["shards"])
    if stale:
        print(f"pretokenize: warning: {len(stale)} stale code shard(s) in {out} not in its manifest.json (left by an "
              f"earlier run; training reads only the manifest's), e.g. {stale[0]}", file=sys.stderr)
    return merged


def read_part(out: str, rank: int) -> dict | None:
    path = os.path.join(out, f"manifest.r{rank}.json")
    return json.load(open(path)) if os.path.isfile(path) else None  # written atomically: never half a part


def part_problem(part: dict | None, ref: dict, keys: tuple) -> str | None:
    """Why ``part`` is not of the run of ``ref`` (rank 0's part), or None (same inputs_digest: shards[rank::world])."""
    if part is None:
        return "missing"
    bad = [k for k in keys if part.get(k) != ref.get(k)]
    return f"stale ({bad[0]} {repr(part.get(bad[0]))[:50]}, this run's {repr(ref.get(bad[0]))[:50]})" if bad else None


def merge_dir(out: str, world_size: int | None = None, timeout: float = 0.0, mine: dict | None = None) -> dict | None:
    """Merge OUT/manifest.r{0..world-1}.json into manifest.json once each is this run's (waits ``timeout`` s).
    ``mine``: rank 0's own part, in the run; another rank's earlier part stays until that rank starts, so run ids
    must match too. ``--merge`` by hand: rank 0's part on disk is the reference, run ids may differ (a rank rerun)."""
    deadline = time.time() + timeout
    keys = ("run_id",) * bool(mine) + ("inputs_digest",) + SHARED_KEYS
    while True:
        ref = json.loads(json.dumps(mine)) if mine else read_part(out, 0) or {}  # JSON types, as on disk
        world = world_size or ref.get("world_size") or 1
        parts = {r: read_part(out, r) for r in range(world)}
        problems = {r: why for r, p in parts.items() if (why := part_problem(p, ref, keys))}
        if not problems or time.time() >= deadline:
            break
        time.sleep(2.0)
    if problems:
        said = ", ".join(f"manifest.r{r}.json {why}" for r, why in problems.items())
        print(f"pretokenize: {world - len(problems)}/{world} manifest parts of this run in {out} ({said}); run "
              f"`python -m tokenizers.pretokenize --merge --out {out}` when all ranks are done", file=sys.stderr)
        return None
    return write_manifest(out, merge_parts(list(parts.values())))


def parse_option(item: str):
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--tokenizer-option {item!r}: expected KEY=VALUE")
    from omegaconf import OmegaConf

    return key, OmegaConf.to_container(OmegaConf.create(f"v: {value}"))["v"]  # YAML typing (ints, lists)


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description="Pre-tokenize WebDataset image shards into code shards.")
    p.add_argument("--shards", help="input shards: brace pattern, glob or list")
    p.add_argument("--val-shards", default="", help="val image shards too: codes to OUT/train/ and OUT/val/")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer-kind", help="tokenizers.registry kind (llamagen_vq, maskgit_vq, pixel, ...)")
    p.add_argument("--tokenizer-path", default="", help="local weights file of the tokenizer")
    p.add_argument("--tokenizer-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra factory argument, e.g. preset=vq16 (repeatable)")
    p.add_argument("--image-size", type=int, help="crop size S (codes grid = S / downsample)")
    p.add_argument("--ten-crop", action="store_true", help="10 TenCrop variants instead of centre crop + flip")
    p.add_argument("--crop-range", type=float, default=1.1, help="ten-crop: ADM crop at int(S * crop_range)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per encoder call")
    p.add_argument("--maxcount", type=int, default=10000, help="samples per output shard")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world-size", type=int, default=None)
    p.add_argument("--merge", action="store_true", help="only merge manifest.r*.json parts into manifest.json")
    p.add_argument("--merge-timeout", type=float, default=600.0, help="rank 0: seconds to wait for other parts")
    args = p.parse_args(argv)
    if args.merge:
        return merge_dir(args.out, args.world_size, timeout=0.0)
    missing = [f"--{n}" for n in ("shards", "tokenizer-kind", "image-size")
               if getattr(args, n.replace("-", "_")) is None]
    if missing:
        p.error(f"missing {', '.join(missing)}")
    env_rank, env_world = env_rank_world()
    rank = env_rank if args.rank is None else args.rank
    world = env_world if args.world_size is None else args.world_size
    splits = [("train", args.shards, False)] + ([("val", args.val_shards, True)] if args.val_shards else [])
    inputs = {name: expand_shards(pattern) for name, pattern, _ in splits}  # every input checked before any work
    if args.val_shards:
        check_same_classes(inputs["train"], inputs["val"])

    from tokenizers.registry import build_tokenizer

    options = dict(parse_option(o) for o in args.tokenizer_option)
    if args.tokenizer_path:
        options["path"] = args.tokenizer_path
    tokenizer = build_tokenizer(args.tokenizer_kind, **options)
    device = args.device
    if device == "cuda" and world > 1:  # one GPU per rank (torchrun / srun on a multi-GPU node)
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    results = {}
    for name, _, plain in splits:
        out = os.path.join(args.out, name) if args.val_shards else args.out
        part = pretokenize(inputs[name], out, tokenizer, args.tokenizer_kind, args.image_size, args.ten_crop,
                           args.crop_range, args.batch_size, rank, world, args.maxcount, device, plain=plain)
        print(f"pretokenize rank {rank}/{world}: {name}: {part['num_samples']} samples -> {len(part['shards'])} "
              f"shards, {part['skipped']} skipped", flush=True)
        results[name] = (out, part)
    merged = {}
    for name, (out, part) in reversed(list(results.items())):  # train/ last: its manifest says the run completed
        if world == 1:
            merged[name] = write_manifest(out, merge_parts([part]))
        elif rank == 0:
            merged[name] = merge_dir(out, world, timeout=args.merge_timeout, mine=part)
        else:
            merged[name] = part
    if rank == 0 and args.val_shards:
        print(f"pretokenize: data.code_dir={args.out} (train/ {merged['train'] and merged['train']['num_samples']}, "
              f"val/ {merged['val'] and merged['val']['num_samples']} samples)", flush=True)
    return merged if args.val_shards else merged["train"]


def cli(argv: list[str] | None = None) -> int:
    """``roar-pretokenize`` (through experiments.cli): main() returns the manifest; a console script needs an
    exit code; bad input is one line and exit 2."""
    try:
        main(argv)
    except (FileNotFoundError, ValueError) as err:
        print(f"pretokenize: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
