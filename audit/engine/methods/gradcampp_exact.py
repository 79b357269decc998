"""Grad-CAM++ from the exact diagonal 2nd and 3rd derivatives (for comparison)."""

from audit.engine.methods.base import Needs, OwnPassMethod, combine, tf


class GradCAMPlusPlusExact(OwnPassMethod):
    """Grad-CAM++ from the exact diagonal 2nd/3rd derivatives of Y = exp(S).

    Chattopadhyay et al. 2018, with the derivatives taken by nested
    batch Jacobians (the diagonal, not the row sums that nested
    ``tape.gradient`` calls give).  For comparison on small models only: it
    costs two Jacobians per layer.  Y is taken as exp(S - S0) with S0 = S held
    constant, which leaves alpha unchanged and cannot overflow.  Where the head
    above the layer is piecewise linear it equals the closed form.
    """

    name = "gradcam++exact"
    title = "Grad-CAM++ (exact derivatives)"
    paper = "Chattopadhyay et al. 2018 (exact diagonal derivatives)"
    rule = "as gradcam++ with d2Y/dA2 and d3Y/dA3 from batch Jacobians"
    needs = Needs(own_pass=True, cost="two batch Jacobians per layer (small models only)")
    scan_rank = 9

    def run(self, engine, x, target) -> list:
        fn = engine.function(self.name, lambda xb, tb: [self._layer_map(engine, xb, tb, i)
                                                         for i in range(len(engine.layers))])
        return fn(x, target)

    def _layer_map(self, engine, x, target, i):
        t = tf()
        with t.GradientTape() as t3:
            with t.GradientTape() as t2:
                with t.GradientTape() as t1:
                    acts, scores = engine.forward(x)
                    A = acts[i]
                    s = engine.head.score_of(scores, target)
                    total = t.reduce_sum(t.exp(s - t.stop_gradient(s)))
                g1 = t1.gradient(total, A)
                n = t.shape(A)[0]
                g1f = t.reshape(g1, (n, -1))
            j2 = t2.batch_jacobian(g1f, A, experimental_use_pfor=False)
            d2 = t.linalg.diag_part(t.reshape(j2, (n, g1f.shape[1], -1)))
        j3 = t3.batch_jacobian(d2, A, experimental_use_pfor=False)
        d3 = t.linalg.diag_part(t.reshape(j3, (n, g1f.shape[1], -1)))
        shape = t.shape(A)
        d2, d3 = t.reshape(d2, shape), t.reshape(d3, shape)
        sum_a = t.reduce_sum(A, axis=(1, 2), keepdims=True)
        denom = 2.0 * d2 + sum_a * d3
        ok = t.logical_and(t.not_equal(denom, 0.0), t.math.is_finite(denom))
        alpha = d2 / t.where(ok, denom, t.ones_like(denom))
        w = t.reduce_sum(alpha * t.nn.relu(g1), axis=(1, 2))  # g1 = dY/dA at Y = 1
        return t.nn.relu(combine(A, w))
