"""Grad-CAM (Selvaraju et al. 2017)."""

from audit.engine.methods.base import Method, tf


class GradCAM(Method):
    """Grad-CAM (Selvaraju et al. 2017, eq. 1-2): w_k = mean_ij dS/dA^k_ij."""

    name = "gradcam"
    title = "Grad-CAM"
    paper = "Selvaraju et al. 2017, eq. 1-2"
    rule = "w_k = mean_ij g_ij; map = relu(sum_k w_k A^k)"
    scan_rank = 2

    def weights(self, A, g, head_w):
        return tf().reduce_mean(g, axis=(1, 2))
