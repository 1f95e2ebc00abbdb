"""Nodes of an attribution graph: where a contribution comes from or goes to.

Every quantity of the linearised replacement model is a sum of contributions from these sources:

- ``embedding``  (layer -1, position t): the token embedding r_0[t];
- ``feature``    (layer l, position t, feature i): transcoder feature z^(l,i) writing z * f_dec^(l,i);
- ``error``      (layer l, position t): true MLP output minus transcoder output at (l, t);
- ``bias``       (layer l, position t): the constants layer l writes into the residual stream at t
  (attention output bias, the LN1 bias and value bias carried through the OV circuit, transcoder b_dec).

Targets are ``feature`` nodes (their pre-activation x @ W_enc + b_enc) or ``logit`` nodes (layer
n_layers, position t, token id: the logit read at t; or, for a target read along a direction of the
final residual stream -- an answer's log-probability, a contrast, a custom vector -- a ``name`` and
no token, t its last position read: :mod:`c2srepro.attribution.targets`).
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("embedding", "feature", "error", "bias", "logit")
# What each kind is called in legends and tables.
KIND_LABELS = {"feature": "transcoder", "error": "mlp reconstruction error", "embedding": "embedding", "bias": "bias",
               "logit": "logit"}
SOURCE_KINDS = ("embedding", "feature", "error", "bias")


@dataclass(frozen=True)
class Node:
    """A node; ``index`` is the feature id (feature) or the token id (logit), else None; ``name``
    names a logit node read along a direction rather than one token's logit."""

    kind: str
    layer: int
    position: int
    index: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"node kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "logit":
            if (self.index is None) == (self.name is None):
                raise ValueError("a logit node needs either a token index or a name (a direction target), not both")
        elif self.name is not None:
            raise ValueError(f"only logit nodes take a name, got one on a {self.kind} node")
        elif (self.index is None) != (self.kind in ("embedding", "error", "bias")):
            raise ValueError(f"a {self.kind} node {'needs' if self.index is None else 'takes no'} index")

    @classmethod
    def feature(cls, layer: int, position: int, feature: int) -> "Node":
        return cls("feature", int(layer), int(position), int(feature))

    @classmethod
    def embedding(cls, position: int) -> "Node":
        return cls("embedding", -1, int(position))

    @classmethod
    def error(cls, layer: int, position: int) -> "Node":
        return cls("error", int(layer), int(position))

    @classmethod
    def bias(cls, layer: int, position: int) -> "Node":
        return cls("bias", int(layer), int(position))

    @property
    def id(self) -> str:
        """A readable unique string id, used as the networkx node key and the JSON ``node_id``."""
        if self.kind == "feature":
            return f"L{self.layer}F{self.index}@{self.position}"
        if self.kind == "logit":
            return f"logit{self.index}@{self.position}" if self.name is None else f"{self.name}@{self.position}"
        if self.kind == "embedding":
            return f"emb@{self.position}"
        return f"L{self.layer}{self.kind}@{self.position}"
