"""Float64 NumPy definitions of the CAM methods, written from their papers (for tests).

Each takes activations A (N, h, w, K) and the gradient g = dS_c/dA of the
explained class score, as float64 arrays, and returns (N, h, w) maps.
"""

import numpy as np


def relu(x):
    return np.maximum(x, 0.0)


def combine(A, w):
    return np.einsum("nhwk,nk->nhw", A, w)


def gradcam(A, g):
    """Selvaraju et al. 2017: w_k = mean_ij g."""
    return relu(combine(A, g.mean(axis=(1, 2))))


def gradcampp(A, g):
    """Chattopadhyay et al. 2018, closed form: alpha = g^2 / (2 g^2 + sum A g^3)."""
    s = A.sum(axis=(1, 2), keepdims=True)
    den = 2 * g**2 + s * g**3
    alpha = np.where(den != 0, g**2 / np.where(den != 0, den, 1), 0)
    return relu(combine(A, (alpha * relu(g)).sum(axis=(1, 2))))


def cam(A, w_class):
    """Zhou et al. 2016: w_k = W[k, c]; w_class (N, K)."""
    return relu(combine(A, w_class))


def hirescam(A, g):
    """Draelos & Carin 2020: relu(sum_k g * A)."""
    return relu((g * A).sum(axis=-1))


def layercam(A, g):
    """Jiang et al. 2021: relu(sum_k relu(g) * A)."""
    return relu((relu(g) * A).sum(axis=-1))


def xgradcam(A, g):
    """Fu et al. 2020: w_k = sum_ij (A_ij / sum_ab A_ab) g_ij (0 where sum A = 0)."""
    s = A.sum(axis=(1, 2))
    num = (A * g).sum(axis=(1, 2))
    return relu(combine(A, np.where(s != 0, num / np.where(s != 0, s, 1), 0)))


def eigencam(A):
    """Muhammad & Yeasin 2020: projection of the centred activations on their first
    principal component; sign along the centred channel sum (see EigenCAM's docstring)."""
    out = []
    for a in A:
        h, w, k = a.shape
        m = a.reshape(h * w, k)
        mc = m - m.mean(axis=0)
        _, _, vt = np.linalg.svd(mc, full_matrices=False)
        proj = mc @ vt[0]
        if (proj * mc.sum(axis=1)).sum() < 0:
            proj = -proj
        out.append(relu(proj).reshape(h, w))
    return np.stack(out)


def bilinear(img, size):
    """Half-pixel-centre bilinear resize of (h, w, K) to size (H, W), edges clamped (as tf.image.resize)."""
    h, w = img.shape[:2]
    H, W = size

    def axis(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, fy = axis(h, H)
    x0, x1, fx = axis(w, W)
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bot = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bot * fy[:, None, None]


def scorecam(A, x, target, prob_fn):
    """Wang et al. 2020, Algorithm 1: H^k = normalised upsampled A^k; S_k = p_c(x * H^k);
    weights = softmax_k(S); map = relu(sum_k w_k A^k).  prob_fn: (B, H, W, C) -> (B, classes)."""
    out = []
    for n, a in enumerate(A):
        up = bilinear(a, x.shape[1:3])
        lo, hi = up.min(axis=(0, 1)), up.max(axis=(0, 1))
        masks = np.where(hi > lo, (up - lo) / np.where(hi > lo, hi - lo, 1), 0)  # (H, W, K)
        masked = x[n][None] * np.moveaxis(masks, -1, 0)[..., None]
        s = np.asarray(prob_fn(masked), np.float64)[:, target[n]]
        w = np.exp(s - s.max())
        w /= w.sum()
        out.append(relu(np.einsum("hwk,k->hw", a, w)))
    return np.stack(out)
