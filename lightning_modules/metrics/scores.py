"""Scores from extractor outputs: FID, Inception Score, k-NN precision/recall, and a rank-syncing accumulator.

One numerics path, used by the CLI (``experiments.evaluate``), the reference cache and ``FIDCallback`` alike:

* FID: features -> float64 moments (sum x, sum x x^T, n) -> (mu, unbiased sigma) -> ``fid_from_stats`` (scipy
  ``sqrtm``; ADM's fallback adds eps*I to both covariances when the root is not finite).
* IS (ADM / improved-GAN convention): softmax of the logits, samples cut into ``num_splits`` contiguous chunks by
  their *global* sample index, score = mean over chunks of exp(E_i KL(p_i || p_chunk)). Per chunk this only needs
  sum_i sum_c p log p, sum_i p_i and n, all additive, so ranks can sum them and the result does not depend on
  how samples were spread across ranks.
* Precision / recall: Kynkäänniemi et al. 2019 manifold estimate with k=3 as in the ADM evaluator: a sample is
  "in" a set's manifold when it lies within the k-th-nearest-neighbour radius (self excluded) of some member.

``FeatureStats`` (a torchmetrics ``Metric`` with sum-reduced states only) holds those moments; its dist sync is
what spreads FID/IS across ranks, and states of fixed shape mean a rank with no batches still syncs cleanly.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torchmetrics import Metric

FID_EPS = 1e-6          # ADM evaluator's offset when sqrtm of the covariance product is not finite
IS_SPLITS = 10
PR_K = 3                # ADM evaluator: nhood_sizes=[3]


# ----------------------------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------------------------
def moments(features: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[N, F] -> (sum [F], sum of outer products [F, F], N), float64."""
    x = torch.as_tensor(features).to(torch.float64)
    return x.sum(0), x.T @ x, x.shape[0]


def gaussian_from_moments(s1: torch.Tensor, s2: torch.Tensor, n: int | float) -> tuple[np.ndarray, np.ndarray]:
    """(sum, outer sum, n) -> (mu [F], sigma [F, F]) as float64 numpy; sigma unbiased like ``np.cov``."""
    n = float(n)
    if n < 2:
        raise ValueError(f"FID needs at least 2 samples to estimate a covariance, got {int(n)}")
    s1, s2 = s1.detach().cpu().double(), s2.detach().cpu().double()
    mu = s1 / n
    sigma = (s2 - n * torch.outer(mu, mu)) / (n - 1)
    return mu.numpy(), sigma.numpy()


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, F] features -> (mu [F], sigma [F, F]) through the same moments the distributed accumulator uses."""
    return gaussian_from_moments(*moments(features))


# Ours, not torchmetrics' FrechetInceptionDistance / torch-fidelity's FID: they bind their own Inception and keep
# the features; we need ADM's float64 numerics (scipy sqrtm) on moments summed across ranks, for any extractor.
def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                   eps: float = FID_EPS) -> float:
    """||mu1 - mu2||^2 + Tr(s1 + s2 - 2 (s1 s2)^1/2), ADM numerics."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"FID: feature sizes differ ({mu1.shape[0]}-d vs {mu2.shape[0]}-d): samples and reference "
                         "were not made with the same extractor")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product (fewer samples than dims, dead features): ADM regularises both covariances.
        warnings.warn(f"FID: sqrtm not finite, adding {eps} to the covariance diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has a large imaginary part ({np.max(np.abs(covmean.imag)):.3g}); "
                             "too few samples for the feature size?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------------------------
def split_ids(index: torch.Tensor, total: int, num_splits: int = IS_SPLITS) -> torch.Tensor:
    """Global sample index -> chunk id, contiguous chunks (= ADM's 5000-sample chunks for 50k, 10 splits)."""
    return (index.long() * num_splits) // int(total)


def is_split_sums(logits: torch.Tensor, splits: torch.Tensor, num_splits: int = IS_SPLITS
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, K], chunk ids [B] -> (sum p log p [S], sum p [S, K], count [S]), float64."""
    p = torch.softmax(logits.double(), dim=-1)                            # [B, K]
    plogp = torch.special.xlogy(p, p).sum(-1)                             # [B]
    s = splits.long().to(p.device)
    out_h = torch.zeros(num_splits, dtype=torch.float64, device=p.device).index_add_(0, s, plogp)
    out_p = torch.zeros(num_splits, p.shape[1], dtype=torch.float64, device=p.device).index_add_(0, s, p)
    out_n = torch.zeros(num_splits, dtype=torch.float64, device=p.device).index_add_(0, s, torch.ones_like(plogp))
    return out_h, out_p, out_n


def is_from_split_sums(plogp: torch.Tensor, psum: torch.Tensor, count: torch.Tensor) -> tuple[float, float]:
    """E_i KL(p_i || pbar) = E_i sum p log p - sum pbar log pbar per chunk; returns (mean, std) of exp over chunks."""
    plogp, psum, count = plogp.cpu().double(), psum.cpu().double(), count.cpu().double()
    keep = count > 0                                  # fewer samples than splits leaves empty chunks
    n = count[keep]
    pbar = psum[keep] / n[:, None]                                         # [S', K]
    kl = plogp[keep] / n - torch.special.xlogy(pbar, pbar).sum(-1)         # [S']
    scores = torch.exp(kl)
    return float(scores.mean()), float(scores.std(correction=0)) if len(scores) > 1 else 0.0


# Ours, not torchmetrics' InceptionScore: that shuffles before splitting; ADM cuts contiguous splits by global index.
def inception_score(logits: torch.Tensor | np.ndarray, num_splits: int = IS_SPLITS) -> tuple[float, float]:
    """logits [N, K] in sample order -> (IS mean, std over chunks)."""
    logits = torch.as_tensor(logits)
    ids = split_ids(torch.arange(logits.shape[0]), logits.shape[0], num_splits)
    return is_from_split_sums(*is_split_sums(logits, ids, num_splits))


# ----------------------------------------------------------------------------------------------------------------
# Precision / recall (k-NN manifolds)
# ----------------------------------------------------------------------------------------------------------------
def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # float64 so a point's distance to itself is ~0 in every batch layout (identical sets must give exactly 1.0)
    return torch.cdist(a.double(), b.double()).clamp_min_(0)


def manifold_radii(features: torch.Tensor, k: int = PR_K, batch_size: int = 4096) -> torch.Tensor:
    """[N, F] -> [N] distance to the k-th nearest neighbour, the point itself counted as neighbour 0 (ADM)."""
    x = torch.as_tensor(features)
    if x.shape[0] <= k:
        raise ValueError(f"precision/recall: need more than k={k} samples per set, got {x.shape[0]}")
    radii = []
    for i in range(0, len(x), batch_size):
        best = None                                                        # running k+1 smallest, [R, k+1]
        for j in range(0, len(x), batch_size):
            d = _dist(x[i:i + batch_size], x[j:j + batch_size])
            cand = d if best is None else torch.cat([best, d], 1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


def manifold_coverage(query: torch.Tensor, support: torch.Tensor, support_radii: torch.Tensor,
                      batch_size: int = 4096) -> torch.Tensor:
    """bool [Nq]: query point lies within radius of at least one support point."""
    query, support = torch.as_tensor(query), torch.as_tensor(support)
    r = support_radii.double()
    inside = torch.zeros(len(query), dtype=torch.bool, device=query.device)
    for i in range(0, len(query), batch_size):
        for j in range(0, len(support), batch_size):
            d = _dist(query[i:i + batch_size], support[j:j + batch_size])      # [R, C]
            inside[i:i + batch_size] |= (d <= r[None, j:j + batch_size].to(d.device)).any(1)
    return inside


# Ours, batched in float64 and rank-free; torch-fidelity's (metric_prc.py) is the same definition and is tested equal
# (tests/test_eval_scores.py), but wants its own feature extraction through calculate_metrics.
def precision_recall(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, k: int = PR_K,
                     batch_size: int = 4096) -> tuple[float, float]:
    """precision = share of fakes on the real manifold; recall = share of reals on the fake manifold."""
    real, fake = torch.as_tensor(real), torch.as_tensor(fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision/recall: feature sizes differ ({fake.shape[1]}-d vs {real.shape[1]}-d)")
    r_real, r_fake = manifold_radii(real, k, batch_size), manifold_radii(fake, k, batch_size)
    precision = manifold_coverage(fake, real, r_real, batch_size).double().mean()
    recall = manifold_coverage(real, fake, r_fake, batch_size).double().mean()
    return float(precision), float(recall)


# ----------------------------------------------------------------------------------------------------------------
# Distributed accumulator
# ----------------------------------------------------------------------------------------------------------------
class FeatureStats(Metric):
    """Accumulates FID moments and IS chunk sums; every state is summed across ranks on ``compute()``.

    ``update(features [B, F], logits [B, K] | None, index [B] | None)``: ``index`` is each sample's global
    position in [0, total) and picks its IS chunk, so IS matches ``inception_score`` on the ordered set.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, num_features: int, num_classes: int = 0, total: int = 0, num_splits: int = IS_SPLITS,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_features, self.num_classes, self.total, self.num_splits = num_features, num_classes, total, num_splits
        f64 = torch.float64
        self.add_state("feat_sum", torch.zeros(num_features, dtype=f64), dist_reduce_fx="sum")
        self.add_state("feat_outer", torch.zeros(num_features, num_features, dtype=f64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        if num_classes:
            self.add_state("is_plogp", torch.zeros(num_splits, dtype=f64), dist_reduce_fx="sum")
            self.add_state("is_psum", torch.zeros(num_splits, num_classes, dtype=f64), dist_reduce_fx="sum")
            self.add_state("is_count", torch.zeros(num_splits, dtype=f64), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor, logits: torch.Tensor | None = None,
               index: torch.Tensor | None = None) -> None:
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"FeatureStats: expected features [B, {self.num_features}], got {tuple(features.shape)}")
        s1, s2, n = moments(features.to(self.feat_sum.device))
        self.feat_sum += s1
        self.feat_outer += s2
        self.count += n
        if logits is not None and self.num_classes:
            if index is None or not self.total:
                raise ValueError("FeatureStats: IS needs the global sample index and total (set total=)")
            h, p, c = is_split_sums(logits.to(self.feat_sum.device), split_ids(index, self.total, self.num_splits),
                                    self.num_splits)
            self.is_plogp += h
            self.is_psum += p
            self.is_count += c

    def compute(self) -> dict:
        mu, sigma = gaussian_from_moments(self.feat_sum, self.feat_outer, float(self.count))
        out = {"mu": mu, "sigma": sigma, "num_samples": int(round(float(self.count)))}
        if self.num_classes and float(self.is_count.sum()) > 0:
            out["is"], out["is_std"] = is_from_split_sums(self.is_plogp, self.is_psum, self.is_count)
        return out
