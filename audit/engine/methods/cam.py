"""CAM (Zhou et al. 2016): the class's row of the Dense kernel of a GAP head."""

from audit.engine.methods.base import Method, Needs


class CAM(Method):
    """CAM (Zhou et al. 2016): w_k = W[k, c] of the GAP -> Dense head.

    The engine passes the per-class kernel row of the explained class as
    ``head_w`` (one sigmoid or raw logit unit w: class 1 is +w, class 0 is -w).
    """

    name = "cam"
    title = "CAM"
    paper = "Zhou et al. 2016"
    rule = "w_k = W[k, c] of the GlobalAveragePooling2D -> Dense head"
    needs = Needs(gradients=False, head_weights=True)
    scan_rank = 3

    def weights(self, A, g, head_w):
        return head_w
