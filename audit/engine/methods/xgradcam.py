"""XGrad-CAM (Fu et al. 2020)."""

from audit.engine.methods.base import Method, tf


class XGradCAM(Method):
    """XGrad-CAM (Fu et al. 2020): w_k = sum_ij (A^k_ij / sum_ab A^k_ab) g^k_ij.

    A channel whose activations sum to 0 gets weight 0.
    """

    name = "xgradcam"
    title = "XGrad-CAM"
    paper = "Fu et al. 2020"
    rule = "w_k = sum_ij (A^k_ij / sum_ab A^k_ab) g_ij; map = relu(sum_k w_k A^k)"
    scan_rank = 6

    def weights(self, A, g, head_w):
        t = tf()
        A = t.convert_to_tensor(A)
        num = t.reduce_sum(A * g, axis=(1, 2))
        return t.math.divide_no_nan(num, t.reduce_sum(A, axis=(1, 2)))
