"""Grad-CAM++ in closed form (Chattopadhyay et al. 2018)."""

from audit.engine.methods.base import Method, tf


def gradcampp_weights(A, g):
    """Grad-CAM++ closed form (Chattopadhyay et al. 2018, eq. 19 with Y = exp(S)).

    alpha = g^2 / (2 g^2 + sum_ab(A) g^3), w_k = sum_ij alpha * relu(g).
    Computed from the gradient of the logit S; the factor exp(S) cancels, so
    it is never formed (it overflows float32 above S = 88.7).  A zero or
    non-finite denominator is replaced by 1 (alpha is then 0 where g is 0).
    """
    t = tf()
    g2 = t.square(g)
    g3 = g2 * g
    sum_a = t.reduce_sum(A, axis=(1, 2), keepdims=True)
    denom = 2.0 * g2 + sum_a * g3
    ok = t.logical_and(t.not_equal(denom, 0.0), t.math.is_finite(denom))
    alpha = g2 / t.where(ok, denom, t.ones_like(denom))
    return t.reduce_sum(alpha * t.nn.relu(g), axis=(1, 2))


class GradCAMPlusPlus(Method):
    """Grad-CAM++, closed form from the first derivative of the class logit."""

    name = "gradcam++"
    title = "Grad-CAM++"
    paper = "Chattopadhyay et al. 2018, eq. 19 (closed form with Y = exp(S))"
    rule = "alpha = g^2 / (2 g^2 + sum_ab(A) g^3); w_k = sum_ij alpha relu(g)"
    scan_rank = 1

    def weights(self, A, g, head_w):
        return gradcampp_weights(A, g)
