"""FID / IS / precision-recall numerics and the rank-summed accumulator (no extractor training, < 10 s)."""
import numpy as np
import pytest
import torch

from lightning_modules.metrics.scores import (FeatureStats, fid_from_stats, gaussian_stats, inception_score,
                                              is_from_split_sums, precision_recall)


def _feats(n=500, d=16, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g) / d ** 0.5
    return torch.randn(n, d, generator=g) @ a + 0.3 + shift        # correlated, non-centred


def test_fid_of_a_set_against_itself_is_zero():
    mu, sigma = gaussian_stats(_feats())
    fid = fid_from_stats(mu, sigma, mu, sigma)
    assert abs(fid) < 1e-3 * 2 * np.trace(sigma)                   # relative to the covariance scale
    assert abs(fid) < 1e-6


def test_fid_matches_closed_form_and_numpy_cov():
    x, y = _feats(seed=1), _feats(seed=2, shift=0.5)
    mu1, s1 = gaussian_stats(x)
    np.testing.assert_allclose(s1, np.cov(x.double().numpy(), rowvar=False), rtol=1e-9, atol=1e-12)
    # diagonal covariances: FID = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    fid = fid_from_stats(np.zeros(3), np.diag(a), np.ones(3), np.diag(b))
    assert fid == pytest.approx(3 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-9)
    assert fid_from_stats(mu1, s1, *gaussian_stats(y)) > 0.5 ** 2 * 16 * 0.9  # mean shift dominates


def test_fid_handles_rank_deficient_covariances():
    x = _feats(n=8, d=32)                                           # fewer samples than dims: singular sigma
    fid = fid_from_stats(*gaussian_stats(x), *gaussian_stats(_feats(n=8, d=32, seed=3)))
    assert np.isfinite(fid)


def test_fid_refuses_mismatched_feature_sizes():
    with pytest.raises(ValueError, match="feature sizes differ"):
        fid_from_stats(np.zeros(4), np.eye(4), np.zeros(8), np.eye(8))


def test_inception_score_limits():
    n, k = 100, 10
    assert inception_score(torch.zeros(n, k))[0] == pytest.approx(1.0)          # no confidence: IS = 1
    confident = torch.full((n, k), -30.0)
    confident[torch.arange(n), torch.arange(n) % k] = 30.0                      # sharp and every class per split
    mean, std = inception_score(confident)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6
    one_class = torch.full((n, k), -30.0)
    one_class[:, 3] = 30.0
    assert inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-6)       # sharp but no diversity


def test_inception_score_uses_contiguous_splits_like_adm():
    logits = torch.randn(1000, 7, generator=torch.Generator().manual_seed(0)) * 3
    p = torch.softmax(logits.double(), -1).numpy()
    ref = []
    for part in np.split(p, 10):                                    # improved-GAN / ADM formula, per 100-sample chunk
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        ref.append(np.exp(kl.sum(1).mean()))
    mean, std = inception_score(logits)
    assert mean == pytest.approx(np.mean(ref), rel=1e-10)
    assert std == pytest.approx(np.std(ref), rel=1e-8)


def test_feature_stats_is_independent_of_how_samples_are_spread():
    """Per-rank accumulators whose states are summed (what dist sync does) equal one pass over the set."""
    n = 230
    feats, logits = _feats(n=n), torch.randn(n, 5, generator=torch.Generator().manual_seed(4))
    full = FeatureStats(16, 5, total=n)
    full.update(feats, logits, torch.arange(n))
    want = full.compute()
    ranks = [FeatureStats(16, 5, total=n) for _ in range(3)]
    batches = torch.arange(n).split(32)
    for b, idx in reversed(list(enumerate(batches))):               # any order, any rank assignment
        ranks[b % 3].update(feats[idx], logits[idx], idx)
    merged = FeatureStats(16, 5, total=n)
    for name in ("feat_sum", "feat_outer", "count", "is_plogp", "is_psum", "is_count"):
        setattr(merged, name, sum(getattr(r, name) for r in ranks))
    merged._update_count = 1
    got = merged.compute()
    np.testing.assert_allclose(got["mu"], want["mu"], rtol=1e-12)
    np.testing.assert_allclose(got["sigma"], want["sigma"], rtol=1e-9, atol=1e-12)
    assert got["is"] == pytest.approx(want["is"], rel=1e-12)
    assert want["is"] == pytest.approx(inception_score(logits)[0], rel=1e-12)
    mu, sigma = gaussian_stats(feats)
    np.testing.assert_allclose(want["sigma"], sigma, rtol=1e-12)


def test_is_from_split_sums_skips_empty_splits():
    h = torch.tensor([0.0, 0.0])
    psum = torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    assert is_from_split_sums(h, psum, torch.tensor([1.0, 0.0]))[0] == pytest.approx(np.exp(np.log(2)))


def test_precision_recall_identical_and_disjoint():
    x = _feats(n=300)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    far = _feats(n=300, seed=5) + 100.0                             # disjoint manifolds
    assert precision_recall(x, far) == (0.0, 0.0)
    # fakes collapsed onto one real mode: precision stays high, recall drops
    collapsed = x[:20].repeat(15, 1) + 1e-3 * _feats(n=300, seed=6)
    p, r = precision_recall(x, collapsed)
    assert p > 0.9 and r < 0.5


def test_precision_recall_batching_does_not_change_the_answer():
    x, y = _feats(n=257, seed=7), _feats(n=190, seed=8, shift=0.3)
    assert precision_recall(x, y, batch_size=4096) == precision_recall(x, y, batch_size=37)


@pytest.mark.parametrize("k", [3, 5])
def test_precision_recall_equals_torch_fidelity(k):
    """torch-fidelity 0.4's k-NN precision/recall (metric_prc.py) on the same feature sets. Its public
    calculate_metrics(prc=True) needs images and Inception weights (none offline), so its feature-level function
    is called. Same definition: radius = distance to the k-th neighbour of the own set with the point itself
    counted (kthvalue(k + 1)), a point is in when within some radius (<=), fakes vs real radii for precision."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    real, fake = _feats(n=400, seed=11), _feats(n=300, seed=12, shift=0.4)
    ours = precision_recall(real, fake, k=k, batch_size=128)
    # torch-fidelity's convention: features_1 = generated, features_2 = real; float64 like ours (no cdist rounding)
    for save_cpu_ram in (False, True):
        theirs = prc_features_to_metric(fake.double(), real.double(), prc_neighborhood=k, prc_batch_size=128,
                                        save_cpu_ram=save_cpu_ram, verbose=False)
        # identical counts (their mean is float32: equal to ~1e-7, far below one point in 300)
        assert ours == pytest.approx((theirs["precision"], theirs["recall"]), abs=1e-6)
    # in float32 (their default dtype) a point at the radius can flip: equal within a few points of the sets
    theirs = prc_features_to_metric(fake.float(), real.float(), prc_neighborhood=k, verbose=False)
    assert ours == pytest.approx((theirs["precision"], theirs["recall"]), abs=3 / 300)
