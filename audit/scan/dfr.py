"""Deep feature re-weighting (DFR, Kirichenko et al. 2022): re-train only the last layer on a group-balanced set.

The groups come from the audit's export (``metadata.csv``: label ``y`` x
inferred cue group ``place``, :mod:`audit.scan.export`).  The model's body
is kept; its penultimate features (the input of the final Dense layer) of a
group-balanced subset (:func:`balanced`: the same number of images from every
non-empty group) are standardised and fitted by an L2 logistic regression
(scikit-learn), which then replaces the final layer (:func:`head_weights`:
the standardisation folded into its weights, a binary regression written as
two softmax logits).  Seconds on a CPU for small models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from audit.engine.models import model_input
from audit.errors import AuditError


@dataclass
class DfrResult:
    """What :func:`retrain` did."""

    model: object  # the re-trained keras model
    groups: dict = field(default_factory=dict)  # {(y, place): images used}
    train_accuracy: float = float("nan")


def final_dense(model):
    """The Dense layer that produces the model's output (its input is the penultimate features).

    Raises:
        AuditError: the output does not come straight from a Dense layer.
    """
    import keras

    layer = model.layers[-1]
    if not isinstance(layer, keras.layers.Dense):
        raise AuditError(f"DFR re-trains a final Dense layer; {model.name}'s last layer is {type(layer).__name__}")
    return layer


def balanced(y, place, per_group: int | None = None, seed: int = 0) -> np.ndarray:
    """Indices of a group-balanced subset: ``per_group`` (default: the smallest non-empty group's size)
    images drawn without replacement from each group ``(y, place)``."""
    y, place = np.asarray(y), np.asarray(place)
    keys = sorted({(int(a), int(b)) for a, b in zip(y, place)})
    members = {k: np.nonzero((y == k[0]) & (place == k[1]))[0] for k in keys}
    k = per_group or min(len(v) for v in members.values())
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(v, min(k, len(v)), replace=False) for v in members.values()]))


def head_weights(coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray, std: np.ndarray,
                 n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(W (d, C), b (C,)) of a Dense softmax layer equal to a logistic regression on standardised features.

    ``coef`` (1, d) or (C, d), ``intercept`` (1,) or (C,) from scikit-learn; a
    binary regression's logit z becomes the logits (-z/2, z/2), whose softmax
    is the regression's probability.
    """
    coef = np.atleast_2d(np.asarray(coef, np.float64)) / std[None, :]
    b = np.asarray(intercept, np.float64) - coef @ mean
    if coef.shape[0] == 1 and n_classes == 2:
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        b = np.array([-b[0] / 2, b[0] / 2])
    return coef.T.astype(np.float32), b.astype(np.float32)


def fit(features: np.ndarray, y: np.ndarray, n_classes: int, C: float = 1.0):
    """(W, b, training accuracy) of the logistic regression on standardised ``features``."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    lr = LogisticRegression(C=C, max_iter=2000).fit((x - mean) / std, y)
    if len(lr.classes_) != n_classes:
        raise AuditError(f"the balanced set holds {len(lr.classes_)} of the {n_classes} classes; DFR needs all")
    W, b = head_weights(lr.coef_, lr.intercept_, mean, std, n_classes)
    return W, b, float(lr.score((x - mean) / std, y))


def retrain(model, images: np.ndarray, y, place, *, preprocess: str = "none", C: float = 1.0,
            per_group: int | None = None, seed: int = 0) -> DfrResult:
    """A copy of ``model`` whose final Dense layer is re-fitted on a group-balanced subset of ``images``.

    Args:
        model: a Keras classifier ending in a Dense softmax layer.
        images: (N, H, W, 3) uint8 at the model input.
        y, place: (N,) labels and cue groups (metadata.csv).
        preprocess: the job's ``model.preprocess``.
        C: inverse L2 strength of the regression.
        per_group: images per group (default: the smallest group's size).
        seed: the subset's draw.

    Returns:
        A :class:`DfrResult` with the new model.
    """
    import keras

    head = final_dense(model)
    idx = balanced(y, place, per_group, seed)
    feats = keras.Model(model.inputs, head.input)
    x = model_input(np.asarray(images)[idx], int(model.inputs[0].shape[-1]), preprocess)
    f = np.asarray(feats.predict(x, verbose=0, batch_size=64))
    W, b, acc = fit(f, np.asarray(y)[idx], int(head.units), C)
    new = keras.models.clone_model(model)
    new.set_weights(model.get_weights())
    new.get_layer(head.name).set_weights([W, b])
    groups = {}
    for a, p in zip(np.asarray(y)[idx], np.asarray(place)[idx]):
        groups[(int(a), int(p))] = groups.get((int(a), int(p)), 0) + 1
    return DfrResult(new, groups, acc)
