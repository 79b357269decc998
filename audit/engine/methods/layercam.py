"""LayerCAM (Jiang et al. 2021)."""

from audit.engine.methods.base import Method, tf


class LayerCAM(Method):
    """LayerCAM (Jiang et al. 2021): map = relu(sum_k relu(g^k) * A^k)."""

    name = "layercam"
    title = "LayerCAM"
    paper = "Jiang et al. 2021"
    rule = "map = relu(sum_k relu(g^k) * A^k) (element-wise)"
    scan_rank = 5

    def raw_map(self, A, g=None, head_w=None):
        t = tf()
        return t.reduce_sum(t.convert_to_tensor(A) * t.nn.relu(g), axis=-1)
