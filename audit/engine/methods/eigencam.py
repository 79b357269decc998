"""Eigen-CAM (Muhammad & Yeasin 2020): no gradients, no class."""

from audit.engine.methods.base import Method, Needs, tf


class EigenCAM(Method):
    """Eigen-CAM (Muhammad & Yeasin 2020): A projected on its first principal component.

    Per image the activations are a matrix M (h*w positions x K channels).
    With Mc = M minus its mean over positions and Mc = U S V^T its SVD, the
    map is Mc v_1 = s_1 u_1 (one value per position).  The sign of a singular
    vector is arbitrary; it is fixed so that the map correlates positively
    with the centred channel sum sum_k Mc[:, k] (where the layer is most
    active is positive), and +1 when that correlation is 0.  Then the ReLU.
    The map does not depend on the target class.
    """

    name = "eigencam"
    title = "Eigen-CAM"
    paper = "Muhammad & Yeasin 2020"
    rule = "map = relu(+-(A - mean A) v_1), v_1 the first right singular vector; sign: along sum_k A^k"
    needs = Needs(gradients=False, cost="an SVD of the (h*w, K) activations per image; no backward pass needed")
    scan_rank = 8

    def raw_map(self, A, g=None, head_w=None):
        t = tf()
        A = t.convert_to_tensor(A)
        shape = t.shape(A)
        m = t.reshape(A, (shape[0], shape[1] * shape[2], shape[3]))
        mc = m - t.reduce_mean(m, axis=1, keepdims=True)
        s, u, _ = t.linalg.svd(mc, full_matrices=False)
        proj = u[:, :, 0] * s[:, :1]
        along = t.reduce_sum(proj * t.reduce_sum(mc, axis=2), axis=1, keepdims=True)
        sign = t.where(along < 0, -t.ones_like(along), t.ones_like(along))
        return t.reshape(proj * sign, shape[:3])
