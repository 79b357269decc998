"""The base of every CAM method: it owns the combination and the ReLU.

A method says what it needs (:class:`Needs`) and computes only its channel
weights (:meth:`Method.weights`) or, for methods that weight each position,
its map before the ReLU (:meth:`Method.raw_map`).  The engine
(:class:`audit.engine.explainer.Explainer`) owns the tape, the compiled step,
the batching and the degenerate-map check.  The arithmetic runs on TensorFlow
tensors and on NumPy arrays alike (TensorFlow converts them), so each rule can
be checked against a float64 NumPy reference without a model.

Shapes: activations ``A`` and gradients ``g`` are (N, h, w, K), channel
weights (N, K), maps (N, h, w).  ``g`` is the gradient of the target class
score (the logit, see :mod:`audit.engine.heads`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


def tf():
    import tensorflow

    return tensorflow


@dataclass(frozen=True)
class Needs:
    """What a method reads, and what it costs beyond the one forward + backward pass.

    Attributes:
        gradients: dS/dA of the target score at the layer.
        head_weights: the per-class kernel of a GAP -> Dense head (CAM).
        extra_forward: forward passes of modified inputs (Score-CAM).
        own_pass: computed outside the one compiled forward + backward pass
            (extra forward passes, or higher-order derivatives).
        cost: the extra cost in words, for the docs table.
    """

    gradients: bool = True
    head_weights: bool = False
    extra_forward: bool = False
    own_pass: bool = False
    cost: str = "none: shares the one forward + backward pass"


def combine(A, w):
    """sum_k w_k A^k: (N, h, w, K) x (N, K) -> (N, h, w), before the ReLU."""
    t = tf()
    A = t.convert_to_tensor(A)
    return t.einsum("nhwk,nk->nhw", A, t.cast(w, A.dtype))


class Method:
    """A CAM method.  Subclasses set the class attributes and override one of
    :meth:`weights` (channel weights) or :meth:`raw_map` (a map before the ReLU).

    Class attributes:
        name: the method's name in job specs, records and the CLI.
        title: a short human name.
        paper: the reference (authors, year) and the equation used.
        rule: the formula in one line, for the docs table.
        needs: what the method reads (:class:`Needs`).
        scan_rank: the scan uses the present method of lowest rank.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    rule: ClassVar[str] = ""
    needs: ClassVar[Needs] = Needs()
    scan_rank: ClassVar[int] = 100

    def weights(self, A, g, head_w):
        """(N, K) channel weights."""
        raise NotImplementedError(f"{type(self).__name__} overrides neither weights nor raw_map")

    def raw_map(self, A, g=None, head_w=None):
        """(N, h, w) map before the ReLU; by default sum_k weights_k A^k."""
        return combine(A, self.weights(A, g, head_w))

    def __call__(self, A, g=None, head_w=None):
        """The map: relu(raw_map), (N, h, w)."""
        return tf().nn.relu(self.raw_map(A, g, head_w))

    def __repr__(self) -> str:
        return f"<method {self.name}>"


class OwnPassMethod(Method):
    """A method computed outside the one forward + backward pass.

    :meth:`run` gets the engine (for its forward function and compiled-function
    cache), a padded batch and the classes to explain, and returns one map per
    target layer.
    """

    def run(self, engine, x, target) -> list:
        """Maps (N, h, w) for each of ``engine.layers`` (ReLU applied)."""
        raise NotImplementedError
