"""ImageShardDataModule: skip counting on corrupt data, epoch accounting, seeded order, rank/worker splitting."""
import os

import numpy as np
import pytest
from PIL import Image

from data_helpers import make_shards, truncate_inside
from datamodules import wds_utils as W
from datamodules.images import ImageShardDataModule
from datamodules.transforms import adm_center_crop

BAD = {(0, 3): "garbage_jpg", (0, 7): "bad_cls", (1, 0): "no_cls", (1, 5): "cut_jpg"}


def dm_for(pattern, **kw):
    args = dict(batch_size=4, num_workers=0, image_size=8, center_crop="none", seed=0)
    args.update(kw)
    return ImageShardDataModule(pattern, **args)


def keys_of(loader):
    return [k for batch in loader for k in batch["_key"]]


@pytest.fixture(scope="module")
def corrupt_pattern(tmp_path_factory):
    """3 shards x 10: four bad members, and shard 2 truncated inside sample 6 (samples 6..9 lost, 1 event)."""
    folder = str(tmp_path_factory.mktemp("corrupt"))
    pattern = make_shards(folder, 3, 10, bad=BAD)
    truncate_inside(os.path.join(folder, "train-000002.tar"), "s2_006.jpg")
    return pattern


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("as_val", [True, False])
def test_corrupt_members_skipped_and_counted_exactly(corrupt_pattern, num_workers, as_val):
    if as_val:  # the validation loader over the same shards
        dm = dm_for(corrupt_pattern, val_shards=corrupt_pattern, num_workers=num_workers, resampled=False)
        loader = dm.val_dataloader()
    else:
        dm = dm_for(corrupt_pattern, num_workers=num_workers, resampled=False)
        loader = dm.train_dataloader()
    keys = keys_of(loader)
    expected = {f"s{s}_{i:03d}" for s in range(3) for i in range(10)} - {f"s{s}_{i:03d}" for s, i in BAD}
    expected -= {f"s2_{i:03d}" for i in range(6, 10)}
    assert sorted(keys) == sorted(expected)  # 22 good samples, each exactly once
    assert dm.skipped_total() == len(BAD) + 1  # 4 bad members + 1 truncated tar


def test_skip_at_the_very_end_of_a_pass_still_reported(tmp_path):
    # 8 good samples = 2 full batches, then a garbage member: the last batch must carry the final count
    pattern = make_shards(str(tmp_path), 1, 9, bad={(0, 8): "garbage_jpg"})
    dm = dm_for(pattern, resampled=False)
    batches = list(dm.train_dataloader())
    assert [len(b["_key"]) for b in batches] == [4, 4]
    assert batches[-1]["_skipped"] == 1 and dm.skipped_total() == 1


def test_truncated_header_counted_once(tmp_path):
    pattern = make_shards(str(tmp_path), 1, 4)
    path = os.path.join(str(tmp_path), "train-000000.tar")
    with open(path, "r+b") as f:  # cut inside the header block of the third sample's first member
        import tarfile

        with tarfile.open(path) as tar:
            offset = tar.getmember("s0_002.jpg").offset
        f.truncate(offset + 100)
    dm = dm_for(pattern, resampled=False)
    assert sorted(keys_of(dm.train_dataloader())) == ["s0_000", "s0_001"]
    assert dm.skipped_total() == 1


def test_batch_contract(corrupt_pattern):
    dm = dm_for(corrupt_pattern, resampled=True, samples_per_epoch=16, random_flip=True)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].dtype.is_floating_point is False and str(batch["image"].dtype) == "torch.uint8"
    assert tuple(batch["image"].shape) == (4, 3, 8, 8) and batch["image"].is_contiguous()
    assert str(batch["label"].dtype) == "torch.int64" and tuple(batch["label"].shape) == (4,)
    assert isinstance(batch["_skipped"], int) and batch["_worker"] == 0 and len(batch["_key"]) == 4
    for key, label in zip(batch["_key"], batch["label"].tolist()):
        assert label == int(key.split("_")[1]) % 10


def test_epoch_length_per_worker_in_whole_batches(tmp_path):
    pattern = make_shards(str(tmp_path), 4, 20)
    # 100 per epoch over 2 workers -> 50 per worker -> 6 whole batches of 8 -> 12 batches, 96 images
    dm = dm_for(pattern, num_workers=2, batch_size=8, samples_per_epoch=100)
    loader = dm.train_dataloader()
    assert len(loader) == 12
    for _ in range(2):  # persistent workers: the second epoch has the same length
        sizes = [len(b["_key"]) for b in loader]
        assert len(sizes) == 12 and sum(sizes) == 96


def test_samples_per_epoch_defaults_to_manifest(tmp_path):
    pattern = make_shards(str(tmp_path), 2, 10)
    assert dm_for(pattern).samples_per_epoch == 20
    nomani = make_shards(str(tmp_path / "x"), 2, 10, manifest=False)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        dm_for(nomani).train_dataloader()
    with pytest.raises(ValueError, match="less than one batch"):
        dm_for(pattern, samples_per_epoch=3).train_dataloader()


def test_same_seed_same_order_next_epoch_differs(tmp_path):
    pattern = make_shards(str(tmp_path), 4, 16)
    runs = []
    for seed in (5, 5, 6):
        loader = dm_for(pattern, num_workers=2, samples_per_epoch=32, seed=seed, random_flip=True).train_dataloader()
        runs.append([keys_of(loader), keys_of(loader)])  # epoch 0, epoch 1
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]  # the next epoch reshuffles
    assert runs[0][0] != runs[2][0]  # another seed, another order
    loader = dm_for(pattern, num_workers=2, samples_per_epoch=32, seed=5).train_dataloader()
    loader.set_epoch(1)  # what Lightning does (through loader.sampler.set_epoch) at each epoch start
    assert keys_of(loader) == runs[0][1]
    loader.sampler.set_epoch(0)
    assert keys_of(loader) == runs[0][0]


def test_flips_are_seeded(tmp_path):
    folder = str(tmp_path)
    from datamodules.shards import write_tar

    half = np.zeros((8, 8, 3), np.uint8)
    half[:, :4] = 255  # left half white: a flip is visible
    import io

    buf = io.BytesIO()
    Image.fromarray(half).save(buf, format="PNG")
    write_tar(os.path.join(folder, "train-000000.tar"),
              [{"__key__": f"k{i:03d}", "png": buf.getvalue(), "cls": 0} for i in range(64)])
    images = []
    for _ in range(2):
        dm = dm_for(os.path.join(folder, "train-000000.tar"), samples_per_epoch=64, batch_size=64)
        images.append(next(iter(dm.train_dataloader()))["image"])
    flipped = images[0][:, 0, 0, 0] == 0  # [B]: left column black means flipped
    assert 10 < int(flipped.sum()) < 54
    assert (images[0] == images[1]).all()


def test_ranks_and_workers_get_disjoint_samples(tmp_path, monkeypatch):
    pattern = make_shards(str(tmp_path), 3, 10)  # fewer shards (3) than rank x worker slots (4)
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = dm_for(pattern, val_shards=pattern, num_workers=2, resampled=False)
        seen.append((keys_of(dm.train_dataloader()), keys_of(dm.val_dataloader())))
    for i in (0, 1):  # train (one pass) and val: disjoint across ranks, together everything once
        a, b = seen[0][i], seen[1][i]
        assert not set(a) & set(b) and len(a) + len(b) == 30 and len(set(a + b)) == 30


def test_fewer_shards_than_workers_resampled(tmp_path):
    pattern = make_shards(str(tmp_path), 1, 12)
    dm = dm_for(pattern, num_workers=2, samples_per_epoch=16)
    batches = list(dm.train_dataloader())
    assert len(batches) == 4 and {b["_worker"] for b in batches} == {0, 1}
    per_worker = [{k for b in batches if b["_worker"] == w for k in b["_key"]} for w in (0, 1)]
    assert not per_worker[0] & per_worker[1]  # the one shard is split by sample position


def test_missing_shard_one_line_error(tmp_path):
    pattern = make_shards(str(tmp_path), 2, 4)
    os.remove(os.path.join(str(tmp_path), "train-000001.tar"))
    with pytest.raises(FileNotFoundError) as err:
        dm_for(pattern)
    msg = str(err.value)
    assert "train-000001.tar" in msg and "\n" not in msg


def test_all_corrupt_resampled_stream_fails_loudly(tmp_path):
    pattern = make_shards(str(tmp_path), 1, 4, bad={(0, i): "garbage_jpg" for i in range(4)})
    dm = dm_for(pattern, samples_per_epoch=8)
    old = W.MAX_CONSECUTIVE_SKIPS
    W.MAX_CONSECUTIVE_SKIPS = 50
    try:
        with pytest.raises(RuntimeError, match="in a row failed"):
            list(dm.train_dataloader())
    finally:
        W.MAX_CONSECUTIVE_SKIPS = old


def test_adm_center_crop_matches_the_recipe():
    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 256, (768, 1030, 3), dtype=np.uint8))
    out = adm_center_crop(pil, 256)
    assert out.size == (256, 256) and out.mode == "RGB"
    # the recipe by hand: one BOX halving (768 >= 512), bicubic to short side 256, centre crop
    step = pil.resize((515, 384), resample=Image.BOX)
    step = step.resize((round(515 * 256 / 384), 256), resample=Image.BICUBIC)
    left = (step.width - 256) // 2
    assert np.array_equal(np.asarray(out), np.asarray(step)[:, left:left + 256])
    assert adm_center_crop(Image.new("L", (40, 30), 77), 16).size == (16, 16)
    small = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8))
    assert np.array_equal(np.asarray(adm_center_crop(small, 8)), np.asarray(small))  # already the size


def test_grey_images_become_rgb(tmp_path):
    from data_helpers import image_bytes
    from datamodules.shards import write_tar

    path = os.path.join(str(tmp_path), "train-000000.tar")
    write_tar(path, [{"__key__": "g", "png": image_bytes(90, 12, "PNG", "L"), "cls": 1}])
    dm = ImageShardDataModule(path, val_shards=path, batch_size=1, num_workers=0, image_size=8)
    batch = next(iter(dm.val_dataloader()))
    assert tuple(batch["image"].shape) == (1, 3, 8, 8) and int(batch["image"].min()) == int(batch["image"].max())


def test_slot_assignment_partitions():
    urls = [f"u{i}" for i in range(5)]
    for world, workers in [(1, 1), (2, 2), (2, 3), (4, 2), (8, 1)]:
        owned = set()
        for r in range(world):
            for w in range(workers):
                shards, mod, rem = W.slot_assignment(urls, r, world, w, workers)
                cells = {(u, j) for u in shards for j in range(12) if j % mod == rem}
                assert not owned & cells
                owned |= cells
        assert len(owned) == 5 * 12


def test_shard_specs_braces_globs_lists(tmp_path):
    make_shards(str(tmp_path), 3, 2)
    names = [os.path.join(str(tmp_path), f"train-{i:06d}.tar") for i in range(3)]
    assert W.expand_shards(os.path.join(str(tmp_path), "train-{000000..000002}.tar")) == names
    assert W.expand_shards(os.path.join(str(tmp_path), "train-*.tar")) == names
    assert W.expand_shards(f"{names[2]}::{names[0]}") == [names[2], names[0]]
    assert W.expand_shards(names[:2]) == names[:2]
    with pytest.raises(FileNotFoundError, match="codes-"):
        W.expand_shards(os.path.join(str(tmp_path), "codes-*.tar"))
