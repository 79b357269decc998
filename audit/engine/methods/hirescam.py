"""HiResCAM (Draelos & Carin 2020)."""

from audit.engine.methods.base import Method, tf


class HiResCAM(Method):
    """HiResCAM (Draelos & Carin 2020): map = relu(sum_k g^k * A^k), element-wise.

    Unlike Grad-CAM the gradient is not averaged over positions, so the map
    is exactly the part of the score each position contributes when the
    head above the layer is linear.
    """

    name = "hirescam"
    title = "HiResCAM"
    paper = "Draelos & Carin 2020"
    rule = "map = relu(sum_k g^k * A^k) (element-wise, no averaging)"
    scan_rank = 4

    def raw_map(self, A, g=None, head_w=None):
        t = tf()
        return t.reduce_sum(t.convert_to_tensor(A) * g, axis=-1)
