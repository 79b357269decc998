"""Score-CAM (Wang et al. 2020): channel weights from forward passes, no gradients."""

from __future__ import annotations

import numpy as np

from audit.engine.methods.base import Needs, OwnPassMethod, combine, tf


def upsampled_masks(A, size):
    """Each channel of A (N, h, w, K) resized bilinearly to ``size`` (H, W) and
    min-max normalised to [0, 1] per image and channel (a constant channel is 0).

    Returns (N, H, W, K) float32.
    """
    t = tf()
    up = t.image.resize(t.cast(A, t.float32), size, method="bilinear")
    lo = t.reduce_min(up, axis=(1, 2), keepdims=True)
    hi = t.reduce_max(up, axis=(1, 2), keepdims=True)
    return t.math.divide_no_nan(up - lo, hi - lo)


class ScoreCAM(OwnPassMethod):
    """Score-CAM (Wang et al. 2020, Algorithm 1).

    For channel k of the layer: H^k = the activation map A^k upsampled to the
    input size and normalised to [0, 1]; S_k = the head's probability of the
    target class for the input X * H^k (softmax of the logits; a sigmoid for
    one-unit and multi-label heads).  Weights w = softmax_k(S); map =
    relu(sum_k w_k A^k).  The paper's "increase of confidence" subtracts the
    baseline score f(X_b), the same for every k, which the softmax over
    channels cancels, so it is not computed.

    Cost: K extra forward passes per image and layer (K = the layer's
    channels), batched in chunks of the engine's batch size, plus one pass for
    the activations.  The masked inputs are the model inputs (after
    preprocessing) multiplied by H^k.
    """

    name = "scorecam"
    title = "Score-CAM"
    paper = "Wang et al. 2020, Algorithm 1"
    rule = "w = softmax_k(p_c(X * norm(up(A^k)))); map = relu(sum_k w_k A^k)"
    needs = Needs(gradients=False, extra_forward=True, own_pass=True,
                  cost="K + 1 forward passes per image and layer (K channels), in chunks of batch_size")
    scan_rank = 7

    def run(self, engine, x, target) -> list:
        t = tf()
        acts_fn = engine.function("scorecam/acts", lambda xb: engine.forward(xb)[0])
        score_fn = engine.function("scorecam/score", lambda xm, c: t.gather(
            engine.head.tf_probabilities(engine.forward(xm)[1]), c, axis=1))
        acts = acts_fn(x)
        size = engine.input_shape[:2]
        target = np.asarray(target, np.int32)
        return [self._layer_map(score_fn, x, target, A, size, engine.batch_size) for A in acts]

    def _layer_map(self, score_fn, x, target, A, size, chunk):
        """relu(sum_k softmax_k(S) A^k) for one layer; masks made a chunk of channels at a time.

        Only (H, W, chunk) masks exist at once, never (N, H, W, K): at ResNet50's
        last layer that would be gigabytes.
        """
        t = tf()
        k = int(A.shape[-1])
        weights = np.zeros((len(x), k), np.float32)
        for n in range(len(x)):
            c = np.array(target[n], np.int32)
            scores = []
            for s in range(0, k, chunk):
                m = np.moveaxis(upsampled_masks(A[n:n + 1, :, :, s:s + chunk], size).numpy()[0], -1, 0)
                b = len(m)
                xm = x[n][None] * m[..., None]  # (b, H, W, C) masked inputs
                if b < chunk:  # one compiled shape for every chunk
                    xm = np.concatenate([xm, np.zeros((chunk - b, *xm.shape[1:]), xm.dtype)])
                scores.append(score_fn(xm, c).numpy()[:b])
            weights[n] = t.nn.softmax(np.concatenate(scores)).numpy()
        return t.nn.relu(combine(A, weights))
