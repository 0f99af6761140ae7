"""WebDataset tar shards: ``write_tar`` (atomic, byte-reproducible), ``iter_tar_samples`` (streaming reader
that reports corrupt tars instead of raising) and the ImageFolder → shards CLI.

    python -m datamodules.shards --src /data/imagenet/train --out /data/imagenet-wds --split train --workers 16
    python -m datamodules.shards --src /data/imagenet/val   --out /data/imagenet-wds --split val   --workers 16 \
        --labels LOC_val_solution.csv      # a flat folder (ImageNet val): labels from a file (flat_labels.py)

Input: an ImageFolder tree (one folder per class, e.g. ImageNet synsets; class index = sorted folder order), or
a flat folder of images with ``--labels`` (formats in datamodules/flat_labels.py: ``NAME SYNSET|INDEX`` lines, or
the ILSVRC2012 devkit ground truth with ``--devkit-meta meta.mat``), whose synsets are mapped through the
classes.json the train split wrote into --out (or ``--classes``).
Output in --out: ``{split}-000000.tar ...`` with samples ``{key}.jpg`` (the original bytes when the file is
already a JPEG, else re-encoded at quality 95) and ``{key}.cls`` (ASCII class index); ``classes.json``
(synset -> index, shared by all splits) and ``{split}-manifest.json`` (sample count per shard).

Deterministic: files are sorted by (class, file name) and cut into shards by --max-count and --max-size (source
bytes + tar headers), so the same tree always gives the same shards. Parallel: each of --workers processes
owns a contiguous range of shard indices. Resumable: a shard is written to ``name.tar.tmp`` and renamed when
complete, then ``name.tar.done`` records its count and plan digest; a re-run skips shards whose marker matches
the plan and rewrites everything else (half-written, or planned differently).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import signal
import sys
import tarfile
import threading
from typing import Callable, Iterable, Iterator

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
JPEG_MAGIC = b"\xff\xd8\xff"
BLOCK = 512


# ----------------------------------------------------------------------------- tar writing
def _as_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (int, str)):
        return str(value).encode("ascii")
    raise TypeError(f"tar member value must be bytes, int or str, got {type(value).__name__}")


def write_tar(path: str, samples: Iterable[dict]) -> int:
    """Write samples {"__key__": str, ext: bytes|int|str} to ``path`` atomically; returns the sample count.

    Members are "{key}.{ext}" with mtime 0 and no owner, so equal input gives byte-equal shards.
    """
    tmp = path + ".tmp"
    count = 0
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                key = sample["__key__"]
                if "." in key:
                    raise ValueError(f"{path}: sample key {key!r} contains '.', which splits keys from extensions")
                for ext, value in sample.items():
                    if ext.startswith("__"):
                        continue
                    data = _as_bytes(value)
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o444
                    tar.addfile(info, io.BytesIO(data))
                count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a shard on disk is always complete
    return count


def tar_cost(nbytes: int) -> int:
    """Bytes one member takes in a tar: a header block plus data padded to whole blocks."""
    return BLOCK + -(-nbytes // BLOCK) * BLOCK


# ----------------------------------------------------------------------------- tar reading
def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def iter_tar_samples(url: str, on_error: Callable[[str], None]) -> Iterator[dict]:
    """Samples {"__key__", "__url__", ext: bytes} of one tar shard, grouped by key (name up to the first dot).

    A truncated or unreadable tar is ONE ``on_error`` call (the readers count it as one skip event); the sample
    being read when it broke is dropped. A missing shard raises FileNotFoundError naming it.
    """
    from webdataset.gopen import gopen  # pipe:/http(s)/s3 support for remote shards

    # a tar is a whole number of 512-byte blocks ending in a zero block; python's tarfile ends quietly at a
    # truncated header, and at end of file where the end-of-archive block should be (a copy cut at a block edge)
    size = os.path.getsize(url) if is_local(url) and os.path.isfile(url) else None
    try:
        stream = gopen(url, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"data: shard not found: {url}") from None
    current: dict | None = None
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for member in tar:
            if not member.isfile():
                continue
            folder, base = os.path.split(member.name)
            if "." not in base or base.startswith("__"):
                continue
            stem, ext = base.split(".", 1)
            key = f"{folder}/{stem}" if folder else stem
            if current is not None and key != current["__key__"]:
                yield current  # before reading on: a read error below then never costs the previous sample
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext.lower()] = tar.extractfile(member).read()
            tar.members = []  # streaming: do not keep every TarInfo of a 1 GB shard
        if current is not None:
            yield current
        if size is not None and size % BLOCK:
            on_error(f"{url}: truncated tar (size not a multiple of 512)")
        elif size is not None and size < tar.offset + BLOCK:
            on_error(f"{url}: truncated tar (no end-of-archive block after byte {tar.offset})")
    except (tarfile.TarError, OSError, EOFError, ValueError) as exn:
        on_error(f"{url}: unreadable tar after key {current and current['__key__']!r} ({exn})")
    finally:
        try:
            stream.close()  # for pipe: URLs this is where a failed download (non-zero exit) is reported
        except Exception as exn:  # noqa: BLE001
            on_error(f"{url}: {type(exn).__name__}: {exn}")


# ----------------------------------------------------------------------------- planning
def list_image_folder(src: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class folder names sorted, [(relative path, class index)] sorted by class then file name)."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src: not a folder: {src}")
    classes = sorted(d.name for d in os.scandir(src) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"--src: no class folders in {src} (a flat folder, e.g. ImageNet val, needs --labels)")
    files, nested = [], []
    for idx, cls in enumerate(classes):
        entries = list(os.scandir(os.path.join(src, cls)))
        names = sorted(e.name for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS)
        files += [(f"{cls}/{name}", idx) for name in names]
        nested += sorted(f"{cls}/{e.name}" for e in entries if e.is_dir() and not e.name.startswith("."))
    if nested:  # ImageFolder reads one level: say so rather than drop a subfolder's photos without a word
        print(f"shards: warning: {len(nested)} subfolder(s) inside class folders are not read, e.g. {nested[0]}",
              file=sys.stderr)
    if not files:
        raise ValueError(f"--src: no image files ({', '.join(sorted(IMAGE_EXTS))}) under {src}")
    return classes, files


def list_flat_folder(src: str, labels_path: str, class_map: dict | None, devkit_meta: str = "",
                     where: str = "classes.json") -> tuple[list[str], list[tuple[str, int]]]:
    """A flat folder (ImageNet val) + a label file -> (class names, [(file name, class index)] sorted by name)."""
    from datamodules.flat_labels import read_labels, to_indices

    names = sorted(e.name for e in os.scandir(src)
                   if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS)
    if not names:
        raise ValueError(f"--src: no image files ({', '.join(sorted(IMAGE_EXTS))}) in {src}")
    labels = read_labels(labels_path, names, devkit_meta)
    if class_map is None and all(isinstance(v, str) for v in labels.values()):
        class_map = {c: i for i, c in enumerate(sorted(set(labels.values())))}  # no train split yet: its synsets
        where = f"the synsets of {labels_path}"
    index = to_indices(labels, class_map, where)
    return sorted(class_map, key=class_map.get), [(n, index[n]) for n in names]


def sample_key(rel: str) -> str:
    """Tar-safe unique key: ImageNet names already start with the synset (n01440764_10026.JPEG); a flat folder's
    files (ILSVRC2012_val_00000001.JPEG) are unique by name."""
    cls, _, name = rel.rpartition("/")
    cls = cls.replace(".", "_")  # a dot splits a tar key from its extension: class folder st.bernard -> st_bernard
    stem = os.path.splitext(name)[0].replace(".", "_")
    return stem if not cls or stem.startswith(cls) else f"{cls}_{stem}"


def plan_shards(src: str, files: list[tuple[str, int]], max_count: int, max_size: int) -> list[list[tuple]]:
    """Cut the sorted file list into shards of [(rel, class index, key)] by count and estimated tar size."""
    shards: list[list[tuple]] = [[]]
    size, seen = 0, {}
    for rel, idx in files:
        key = sample_key(rel)
        if key in seen:
            raise ValueError(f"--src: files {seen[key]} and {rel} map to the same sample key {key!r}")
        seen[key] = rel
        cost = tar_cost(os.path.getsize(os.path.join(src, rel))) + tar_cost(len(str(idx)))
        if shards[-1] and (len(shards[-1]) >= max_count or size + cost > max_size):
            shards.append([])
            size = 0
        shards[-1].append((rel, idx, key))
        size += cost
    return shards


def plan_digest(shard: list[tuple]) -> str:
    return hashlib.sha256(json.dumps(shard).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- writing shards
def image_bytes(path: str) -> bytes:
    """JPEG files verbatim (no re-encoding loss); anything else decoded and re-encoded as JPEG q95."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:3] == JPEG_MAGIC:
        return data
    from PIL import Image

    from datamodules.transforms import to_8bit

    with Image.open(io.BytesIO(data)) as pil:
        pil = to_8bit(pil)
    out = io.BytesIO()
    pil.save(out, format="JPEG", quality=95)
    return out.getvalue()


def _shard_samples(src: str, shard: list[tuple], bad: list[str]) -> Iterable[dict]:
    for rel, idx, key in shard:
        try:
            data = image_bytes(os.path.join(src, rel))
        except Exception as exn:  # noqa: BLE001  an unreadable source file is reported, not fatal
            bad.append(f"{rel}: {type(exn).__name__}: {exn}")
            print(f"shards: skipped source file {rel} ({exn})", file=sys.stderr)
            continue
        yield {"__key__": key, "jpg": data, "cls": idx}


def _marker_ok(marker: str, tar_path: str, digest: str) -> dict | None:
    try:
        with open(marker) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return None
    return done if done.get("plan") == digest and os.path.isfile(tar_path) else None


def write_shard_range(src: str, out: str, split: str, first: int, shards: list[list[tuple]]) -> list[dict]:
    """Write shards ``first, first+1, ...`` (one process's contiguous range); skip the ones already done."""
    results = []
    for i, shard in enumerate(shards, start=first):
        name = f"{split}-{i:06d}.tar"
        path, marker, digest = os.path.join(out, name), os.path.join(out, name + ".done"), plan_digest(shard)
        done = _marker_ok(marker, path, digest)
        if done is None:
            bad: list[str] = []
            count = write_tar(path, _shard_samples(src, shard, bad))
            done = {"count": count, "plan": digest, "skipped_files": bad}
            with open(marker + ".tmp", "w") as f:
                json.dump(done, f)
            os.replace(marker + ".tmp", marker)
            print(f"shards: wrote {name} ({count} samples)", flush=True)
            done = dict(done, resumed=False)
        else:
            done = dict(done, resumed=True)
        results.append(dict(done, name=name))
    return results


def _in_processes(fn, jobs: list[tuple]) -> list:
    """``[fn(*job) for job in jobs]``, one process per job. A SIGTERM, Ctrl-C or error in the caller terminates
    every worker (multiprocessing's Pool, not ProcessPoolExecutor, whose running workers outlive a killed writer
    and race its re-run); SIGTERM exits 143 as elsewhere in roar."""
    import multiprocessing

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    in_main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    previous = signal.signal(signal.SIGTERM, stop) if in_main else None
    pool = multiprocessing.get_context("fork").Pool(len(jobs), initializer=signal.signal,
                                                    initargs=(signal.SIGTERM, signal.SIG_DFL))
    try:
        pending = [pool.apply_async(fn, job) for job in jobs]
        results = [p.get() for p in pending]
        pool.close()
        return results
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _read_class_map(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return {str(k): int(v) for k, v in json.load(f).items()}
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a classes.json (synset -> index): {err}") from None


def write_image_folder_shards(src: str, out: str, split: str = "train", max_count: int = 1000,
                              max_size: float = 1e9, workers: int = 1, labels: str = "", devkit_meta: str = "",
                              classes_file: str = "") -> dict:
    """ImageFolder tree (or flat folder + ``labels``) -> shards + classes.json + {split}-manifest.json."""
    if max_count < 1 or max_size < 1 or workers < 1:
        raise ValueError("--max-count, --max-size and --workers must be >= 1")
    if not split or any(c in split for c in "-/. "):
        raise ValueError(f"--split: {split!r} must not contain '-', '/', '.' or spaces (it prefixes shard names)")
    classes_path = os.path.join(out, "classes.json")
    if classes_file and not os.path.isfile(classes_file):
        raise FileNotFoundError(f"--classes: file not found: {classes_file}")
    if labels:
        known = classes_file or classes_path
        classes, files = list_flat_folder(src, labels, _read_class_map(known), devkit_meta, known)
    else:
        if devkit_meta or classes_file:
            raise ValueError("--devkit-meta and --classes only apply to a flat folder with --labels")
        classes, files = list_image_folder(src)
    os.makedirs(out, exist_ok=True)
    class_map = {c: i for i, c in enumerate(classes)}
    old = _read_class_map(classes_path)
    if old is not None:
        if old != class_map:
            raise ValueError(f"{classes_path}: classes of {src} differ from the ones already written there")
    else:
        with open(classes_path, "w") as f:
            json.dump(class_map, f, indent=0)
    plan = plan_shards(src, files, max_count, int(max_size))
    n, workers = len(plan), min(workers, len(plan))
    bounds = [k * n // workers for k in range(workers + 1)]  # contiguous shard ranges, one per process
    if workers == 1:
        results = write_shard_range(src, out, split, 0, plan)
    else:
        jobs = [(src, out, split, bounds[k], plan[bounds[k]:bounds[k + 1]]) for k in range(workers)]
        results = [r for part in _in_processes(write_shard_range, jobs) for r in part]
    manifest = {
        "split": split, "num_samples": sum(r["count"] for r in results),
        "shards": {r["name"]: r["count"] for r in results}, "num_classes": len(classes),
        "classes_file": "classes.json", "max_count": max_count, "max_size": int(max_size),
        "source": os.path.abspath(src), "skipped_files": [b for r in results for b in r["skipped_files"]],
    }
    path = os.path.join(out, f"{split}-manifest.json")
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(path + ".tmp", path)
    resumed = sum(r["resumed"] for r in results)
    stale = sorted(e for e in os.listdir(out) if e.startswith(f"{split}-") and e.endswith(".tar")
                   and e not in manifest["shards"])
    if stale:
        print(f"shards: warning: {len(stale)} stale shard(s) not in the manifest, e.g. {stale[0]}", file=sys.stderr)
    print(f"shards: {split}: {n} shards ({n - resumed} written, {resumed} already done), "
          f"{manifest['num_samples']} samples, {len(manifest['skipped_files'])} source files skipped -> {path}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="ImageFolder root (one folder per class)")
    p.add_argument("--out", required=True, help="output folder for shards and manifests")
    p.add_argument("--split", default="train")
    p.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
    p.add_argument("--max-size", type=float, default=1e9, help="bytes per shard at most (estimated)")
    p.add_argument("--workers", type=int, default=1, help="writer processes")
    p.add_argument("--labels", default="", help="a flat folder's label file (formats: datamodules/flat_labels.py)")
    p.add_argument("--devkit-meta", default="", help="ILSVRC2012 devkit data/meta.mat (ground-truth IDs -> synsets)")
    p.add_argument("--classes", default="", help="classes.json to map synsets (default: the one in --out)")
    a = p.parse_args(argv)
    try:
        write_image_folder_shards(a.src, a.out, a.split, a.max_count, a.max_size, a.workers, a.labels,
                                  a.devkit_meta, a.classes)
    except (OSError, ValueError) as exn:
        print(f"shards: error: {exn}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
