"""Attribution targets: the scalar a graph explains, as objects.

Each target is a quantity of the model on one prompt that the frozen replacement
(:mod:`c2srepro.attribution.linearised`) reads linearly from the residual stream, plus a constant.
:meth:`Target.resolve` turns it, on one replacement, into a :class:`ResolvedTarget`: the graph node
that stands for it, its :class:`~c2srepro.attribution.contributions.Reading` (positions, reading
vectors, constant, when the backward pass seeds it) and its exact value on the real run, so that a
graph row over every source satisfies ``row.sum() + constant + dropped == value``.

1. ``FeatureTarget(layer, position, feature)``: the feature's pre-activation x @ f_enc + b_enc
   (it must fire on the prompt).
2. ``LogitTarget(token, position, demeaned=True)``: logit[t, token] - mean_v logit[t, v], the
   unembedding direction circuit-tracer reads by default; ``demeaned=False`` the raw logit.
3. ``DirectionTarget(vector, position)``: the final norm's output at t dotted with ``vector``
   (width d_model; circuit-tracer's ``CustomTarget``).
4. ``LabelTarget(label)``: the answer's log-probability sum_j log p(y_j | prompt, y_<j), the answer
   being the tokens of `` {label}.``. It is teacher-forced: the replacement is built on the prompt
   followed by the answer less its last token (:func:`teacher_forced`), and y_j is read at position
   prompt_length - 1 + j. Each term is linearised at the operating point along a_j = e_{y_j} - p(j),
   the gradient of log-softmax: log p_y = a . logits + (log p_y - a . logits), the first part read
   by the graph row, the second (fixed by the clean run) added to the constant, so the row plus
   the constant is the log-probability exactly.
5. ``LabelTarget(label, candidates=labels)``: the label's log-probability among the candidates,
   read through their prefix tree: at answer position j the label's token competes only with the
   tokens the candidates sharing its first j tokens have there, q the softmax over those tokens'
   logits, a_j = e_{y_j} - q. Positions where no other candidate continues the same prefix
   contribute nothing (the label's token is the only choice there).
6. ``ContrastTarget(a, b)``: log p(a) - log p(b) where the two answers part: on their shared prefix
   the terms cancel, and after it b's tokens would need other inputs than a's, so it is the
   difference of the two parting tokens' log-probabilities, logit[t, a_j] - logit[t, b_j]
   (exactly linear). The replacement is built on the prompt plus a's answer (teacher-forced).

Weights of several targets in one graph may have either sign; influence and pruning use |w|, as
circuit-tracer does.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from c2srepro.attribution.contributions import Reading, node_reading
from c2srepro.attribution.linearised import LinearisedReplacement
from c2srepro.attribution.nodes import Node

# The answers' token ids, per label: what a label target needs besides the replacement.
Answers = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class ResolvedTarget:
    """A target on one replacement: its graph node, reading and exact value on the real run."""

    target: "Target"
    node: Node
    reading: Reading
    value: float


class Target(ABC):
    """What an attribution graph explains (module docstring)."""

    @abstractmethod
    def resolve(
        self, rep: LinearisedReplacement, *, prompt_length: int | None = None, answers: Answers | None = None
    ) -> ResolvedTarget:
        """This target on ``rep``; ``prompt_length``: the prompt's tokens (default: all of ``rep``'s),
        ``answers``: the answer token ids of every label the target names (:attr:`labels`)."""

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels whose answer tokens :meth:`resolve` needs."""
        return ()

    def to_dict(self) -> dict:
        return {"kind": type(self).__name__, **{k: v for k, v in vars(self).items() if k != "vector"}}


def _prompt_length(rep: LinearisedReplacement, prompt_length: int | None) -> int:
    if prompt_length is None:
        return rep.n_pos
    if not 1 <= prompt_length <= rep.n_pos:
        raise ValueError(f"prompt_length must be in 1..{rep.n_pos} (the replacement's tokens), got {prompt_length}")
    return prompt_length


def _position(rep: LinearisedReplacement, position: int | None, prompt_length: int) -> int:
    """The position a target reads: default the prompt's last token; never past the tokens run."""
    if position is None:
        return prompt_length - 1
    if not 0 <= position < rep.n_pos:
        raise ValueError(
            f"position {position} is past the prompt: the replacement was run on {rep.n_pos} tokens "
            f"(positions 0..{rep.n_pos - 1}); pass a position inside it, or None for the last prompt token"
        )
    return position


def _logits(rep: LinearisedReplacement, position: int) -> Float[Tensor, "vocab"]:
    """The real run's logits at one position, at least in float32 (as label scoring takes them)."""
    logits = rep.run.logits[position]
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _logit_reading(
    rep: LinearisedReplacement, position: int, coefficients: Float[Tensor, "vocab"]
) -> tuple[Float[Tensor, "d_model"], float, float]:
    """(v, c, a . logits[t]) for the coefficient vector a over the vocabulary."""
    a = coefficients.to(rep.weights.dtype)
    v, c = rep.weights.logit_reading(rep.run, position, a)
    return v, c, float(coefficients @ _logits(rep, position).to(coefficients.dtype))


@dataclass(frozen=True)
class FeatureTarget(Target):
    """A transcoder feature's pre-activation at one position (it must fire there)."""

    layer: int
    position: int | None
    feature: int

    def resolve(self, rep, *, prompt_length=None, answers=None) -> ResolvedTarget:
        position = _position(rep, self.position, _prompt_length(rep, prompt_length))
        node = Node.feature(self.layer, position, self.feature)
        rep.check_target(node)
        return ResolvedTarget(self, node, node_reading(rep, node), rep.value(node))


@dataclass(frozen=True)
class LogitTarget(Target):
    """One token's logit at one position, minus the mean logit there unless ``demeaned=False``."""

    token: int
    position: int | None = None
    demeaned: bool = True

    def resolve(self, rep, *, prompt_length=None, answers=None) -> ResolvedTarget:
        position = _position(rep, self.position, _prompt_length(rep, prompt_length))
        node = Node("logit", rep.n_layers, position, int(self.token))
        rep.check_target(node)
        if not self.demeaned:
            return ResolvedTarget(self, node, node_reading(rep, node), rep.value(node))
        vocab = rep.weights.W_U.shape[0]
        a = torch.full((vocab,), -1.0 / vocab, dtype=torch.float64, device=rep.weights.W_U.device)
        a[self.token] += 1.0
        v, c, value = _logit_reading(rep, position, a)
        return ResolvedTarget(self, node, Reading((position,), v[None], c, 2 * rep.n_layers), value)


@dataclass(frozen=True)
class DirectionTarget(Target):
    """The final norm's output at one position dotted with ``vector`` (circuit-tracer's CustomTarget)."""

    vector: Float[Tensor, "d_model"]
    position: int | None = None
    name: str = "direction"

    def resolve(self, rep, *, prompt_length=None, answers=None) -> ResolvedTarget:
        position = _position(rep, self.position, _prompt_length(rep, prompt_length))
        vector = torch.as_tensor(self.vector)
        if vector.shape != (rep.weights.d_model,):
            raise ValueError(
                f"the direction has shape {tuple(vector.shape)}, but the model's residual stream has width "
                f"{rep.weights.d_model}: give a vector of shape ({rep.weights.d_model},)"
            )
        if not bool(torch.isfinite(vector).all()):
            raise ValueError("the direction holds NaN or infinite entries; give a finite vector")
        v, c = rep.weights.final_reading(rep.run, position, vector.to(rep.weights.W_U))
        value = float(rep.run.resid[-1, position] @ v) + c
        node = Node("logit", rep.n_layers, position, name=self.name)
        return ResolvedTarget(self, node, Reading((position,), v[None], c, 2 * rep.n_layers), value)

    def to_dict(self) -> dict:
        return {"kind": "DirectionTarget", "position": self.position, "name": self.name}


def _answer(answers: Answers | None, label: str) -> list[int]:
    if answers is None or label not in answers:
        raise ValueError(
            f"no answer tokens for the label {label!r}: pass answers={{label: token ids}} "
            "(ReplacementModel.attribute does this from the tokenizer)"
        )
    ids = [int(i) for i in answers[label]]
    if not ids:
        raise ValueError(f"the answer of {label!r} has no tokens")
    return ids


def teacher_forced(prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> list[int]:
    """The tokens a label target's replacement is built on: the prompt, then the answer less its
    last token (the last answer token is predicted, never read)."""
    return [int(i) for i in prompt_ids] + [int(i) for i in answer_ids[:-1]]


def _check_teacher_forced(rep: LinearisedReplacement, prompt_length: int, answer: list[int], label: str) -> None:
    forced = [int(i) for i in rep.input_ids[prompt_length : prompt_length + len(answer) - 1]]
    if forced != answer[: len(answer) - 1]:
        raise ValueError(
            f"the replacement does not carry the answer of {label!r} after the prompt (expected tokens "
            f"{answer[:-1]} from position {prompt_length}, found {forced}); build it on "
            "teacher_forced(prompt_ids, answer_ids)"
        )


@dataclass(frozen=True)
class LabelTarget(Target):
    """The log-probability of a label's answer, summed over its tokens (module docstring, 4-5)."""

    label: str
    candidates: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.candidates is not None:
            object.__setattr__(self, "candidates", tuple(self.candidates))
            if self.label not in self.candidates:
                raise ValueError(
                    f"the label {self.label!r} is not among the candidates {list(self.candidates)}; "
                    "add it, or leave candidates=None for its log-probability over the whole vocabulary"
                )

    @property
    def labels(self) -> tuple[str, ...]:
        return self.candidates if self.candidates is not None else (self.label,)

    def competitors(self, answers: Answers) -> list[list[int]]:
        """Per answer position, the tokens the label's token competes with there (itself first);
        every token of the vocabulary (an empty list) when there are no candidates."""
        answer = _answer(answers, self.label)
        if self.candidates is None:
            return [[] for _ in answer]
        others = [_answer(answers, c) for c in self.candidates if c != self.label]
        tree = []
        for j, token in enumerate(answer):
            siblings = {o[j] for o in others if len(o) > j and o[:j] == answer[:j]} - {token}
            tree.append([token, *sorted(siblings)])
        return tree

    def resolve(self, rep, *, prompt_length=None, answers=None) -> ResolvedTarget:
        prompt_length = _prompt_length(rep, prompt_length)
        answer = _answer(answers, self.label)
        _check_teacher_forced(rep, prompt_length, answer, self.label)
        positions, vectors, constant, value = [], [], 0.0, 0.0
        for j, (token, tokens) in enumerate(zip(answer, self.competitors(answers))):
            position = prompt_length - 1 + j
            logits = _logits(rep, position).to(torch.float64)
            a = torch.zeros_like(logits)
            if self.candidates is None:
                log_p = torch.log_softmax(logits, dim=-1)
                a -= log_p.exp()
            elif len(tokens) == 1:
                continue  # no competitor at this node of the prefix tree: the token is certain
            else:
                chosen = torch.tensor(tokens, device=logits.device)
                log_q = torch.log_softmax(logits[chosen], dim=-1)
                log_p = torch.full_like(logits, -math.inf).index_put_((chosen,), log_q)
                a[chosen] -= log_q.exp()
            a[token] += 1.0
            v, c, linear = _logit_reading(rep, position, a)
            term = float(log_p[token])
            positions.append(position)
            vectors.append(v)
            constant += c + (term - linear)  # the linearisation's offset at the operating point
            value += term
        if not positions:
            raise ValueError(
                f"the label {self.label!r} has no competitor at any answer position among the candidates "
                f"{list(self.candidates)}: its log-probability among them is 0; add other candidates"
            )
        name = f"label:{self.label}" if self.candidates is None else f"label:{self.label}|{len(self.candidates)}"
        node = Node("logit", rep.n_layers, positions[-1], name=name)
        return ResolvedTarget(self, node, Reading(tuple(positions), torch.stack(vectors), constant,
                                                  2 * rep.n_layers), value)


@dataclass(frozen=True)
class ContrastTarget(Target):
    """log p(a) - log p(b) where the answers of labels a and b part (module docstring, 6)."""

    label_a: str
    label_b: str

    @property
    def labels(self) -> tuple[str, ...]:
        return (self.label_a, self.label_b)

    def resolve(self, rep, *, prompt_length=None, answers=None) -> ResolvedTarget:
        prompt_length = _prompt_length(rep, prompt_length)
        a, b = _answer(answers, self.label_a), _answer(answers, self.label_b)
        j = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if j is None:
            raise ValueError(
                f"the answers of {self.label_a!r} and {self.label_b!r} never part ({a} and {b}): "
                "one is a prefix of the other, so no single position tells them apart"
            )
        _check_teacher_forced(rep, prompt_length, a[: j + 1], self.label_a)
        position = prompt_length - 1 + j
        coefficients = torch.zeros(rep.weights.W_U.shape[0], dtype=torch.float64, device=rep.weights.W_U.device)
        coefficients[a[j]], coefficients[b[j]] = 1.0, -1.0
        v, c, value = _logit_reading(rep, position, coefficients)
        node = Node("logit", rep.n_layers, position, name=f"contrast:{self.label_a}|{self.label_b}")
        return ResolvedTarget(self, node, Reading((position,), v[None], c, 2 * rep.n_layers), value)


def as_target(target: "Target | Node") -> Target:
    """A target object from a target or a feature/logit node (a logit node: its raw logit)."""
    if isinstance(target, Target):
        return target
    if isinstance(target, Node):
        if target.kind == "feature":
            return FeatureTarget(target.layer, target.position, target.index)
        if target.kind == "logit" and target.index is not None:
            return LogitTarget(target.index, target.position, demeaned=False)
    raise ValueError(
        f"a target must be a Target (FeatureTarget, LogitTarget, LabelTarget, ContrastTarget, DirectionTarget) "
        f"or a feature or logit node, got {target!r}"
    )


def check_weights(weights: Sequence[float] | None, n: int) -> Float[Tensor, "target"]:
    """Target weights as float64 scaled to sum |w| = 1 (default equal); either sign, never NaN or all 0."""
    w = torch.ones(n, dtype=torch.float64) if weights is None else torch.tensor(list(weights), dtype=torch.float64)
    if w.shape != (n,):
        raise ValueError(f"target_weights must be {n} numbers (one per target), got {list(weights)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"target_weights must be finite numbers, got {list(weights)} (a NaN or infinite weight)")
    if not bool((w != 0).all()):
        raise ValueError(f"target_weights must be nonzero (drop a target instead of weighting it 0), got {list(weights)}")
    return w / w.abs().sum()

