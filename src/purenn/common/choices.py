"""Option values shared by the API and the ``purenn`` command, in a module that imports nothing.

The command builds its parser from these without importing torch or scikit-learn, so that
``purenn --help`` starts fast. :mod:`purenn.model.gates` and :mod:`purenn.fit.cluster` re-export them.
"""

__all__ = ["GATES", "DEFAULT_CONCEPT_GATE", "PRECISIONS", "SCORES", "DEFAULT_SCORE", "CONCEPT_SCORE", "MAX_DPI",
           "RULES", "ARCH_KEY", "score_text", "is_score_kind"]

#: what selects a purified neuron's virtual neuron (see :mod:`purenn.model.gates`); the first three use circuits
GATES = ("circuit", "circuit+map", "joint-circuit", "activation", "upstream", "map")
#: the gate of purify_concept and ``purenn unlearn``: one circuit for the concept's channels together, one
#: backward pass per input however many channels are suppressed (README: "Removing a Clever-Hans shortcut")
DEFAULT_CONCEPT_GATE = "joint-circuit"
#: polysemanticity scores of :class:`purenn.fit.cluster.CircuitKMeans`; ``"contrast+upstream"`` also reads the
#: references' pooled upstream activations (``CircuitKMeans.fit(circuits, upstream)``)
SCORES = ("silhouette", "contrast", "contrast+upstream")
#: the highest resolution a figure is drawn at (one at a higher dpi needs gigabytes)
MAX_DPI = 1200
#: arithmetic of the relevance stage (see :mod:`purenn.attribution.precision`)
PRECISIONS = ("float32", "tf32", "bf16")
#: the default score of purify_model, the purenn command and the demo (CircuitKMeans, which sees circuits only,
#: defaults to "contrast"): over four trained Fashion-MNIST models the product of the circuit split's contrast
#: and the upstream split's contrast ranks neurons that mix two classes above the contrast score on every model
#: (AUROC 0.894 vs 0.887 at layer4, 0.922 vs 0.909 at layer4.1; the silhouette 0.700; README, "Score and
#: block-gate variants")
DEFAULT_SCORE = "contrast+upstream"
#: relevance rules of :mod:`purenn.attribution.rules` (PURE's gradient, then zennit's LRP rules)
RULES = ("gradient", "epsilon", "zplus", "alpha2beta1", "gamma")
#: ``PureLayer.score_kind`` of layers split by :func:`purenn.fit.concept.purify_concept`: their scores are the
#: concept's effect on each neuron's activation mass, not a polysemanticity score
CONCEPT_SCORE = "concept"


def is_score_kind(kind: object) -> bool:
    """Whether ``kind`` is a valid ``PureLayer.score_kind``: ``None`` or a short lower-case name."""
    return kind is None or (isinstance(kind, str) and 0 < len(kind) <= 40
                            and all(c.islower() or c.isdigit() or c in "_+-" for c in kind))


def score_text(kind: str | None) -> str:
    """What a layer's ``scores`` measure, in words, from its ``score_kind`` (``None``: a file that does not say).

    Example:
        >>> score_text("contrast")
        'polysemanticity (contrast score)'
        >>> score_text(CONCEPT_SCORE)
        "the concept's effect on the neuron's activation mass"
    """
    if kind is None:
        return "score (kind not recorded)"
    if kind == CONCEPT_SCORE:
        return "the concept's effect on the neuron's activation mass"
    return f"polysemanticity ({kind} score)"

#: where purenn records a trained model's architecture in its checkpoint: a safetensors metadata entry,
#: or a string entry beside ``"state_dict"`` in a ``.pt`` dict (JSON of
#: :func:`purenn.io.architecture.describe_architecture`)
ARCH_KEY = "purenn_architecture"
