"""Option values shared by the API and the ``purenn`` command, in a module that imports nothing.

The command builds its parser from these without importing torch or scikit-learn, so that
``purenn --help`` starts fast. :mod:`purenn.gating` and :mod:`purenn.cluster` re-export them.
"""

__all__ = ["GATES", "PRECISIONS", "SCORES", "DEFAULT_SCORE", "MAX_DPI", "RULES"]

#: what selects a purified neuron's virtual neuron (see :mod:`purenn.gating`); the first two use circuits
GATES = ("circuit", "circuit+map", "activation", "upstream", "map")
#: polysemanticity scores of :class:`purenn.cluster.CircuitKMeans`
SCORES = ("silhouette", "contrast")
#: the highest resolution a figure is drawn at (one at a higher dpi needs gigabytes)
MAX_DPI = 1200
#: arithmetic of the relevance stage (see :mod:`purenn.precision`)
PRECISIONS = ("float32", "tf32", "bf16")
#: the default score of purify_model, CircuitKMeans, the purenn command and the demo: the contrast score ranks
#: neurons that mix two classes higher than the silhouette (AUROC 0.872 vs 0.662 over four Fashion-MNIST models
#: at layer4, 0.902 vs 0.665 at layer4.1; README, "Probing, unlearning and disentanglement on Fashion-MNIST")
DEFAULT_SCORE = "contrast"
#: relevance rules of :mod:`purenn.rules` (PURE's gradient, then zennit's LRP rules)
RULES = ("gradient", "epsilon", "zplus", "alpha2beta1", "gamma")
