"""The rerank policy: how one email's K candidates become probabilities. The one place the formula lives.

    reranked:  p = softmax((ce_weight x cross-encoder logit + retrieval_weight x retrieval score
                            + flat_weight x log p_flat) / temperature)
    gated:     p = softmax((retrieval score + gated_flat_weight x log p_flat) / retrieval_temperature)   (stage 2 skipped)

log p_flat is the flat classifier's log-probability of each candidate label (mailroute.flat_head): a softmax
over all labels on its own encoder, fused in as one more score. With both flat weights 0 (a classifier without a
flat classifier) the formula is the two-stage one alone.

The gate skips stage 2 for an email whose retrieval is sure: the margin between its best and second
best retrieval scores exceeds `gate_margin` (None = always rerank, unless ce_weight is 0:
then never); `GateTarget` says how it is fitted. Evaluation, the listwise training
loss, the in-process pipeline, the ONNX pipeline and Triton all call this class; its JSON form is saved
in every run folder and in every classifier version (pipeline.json). Fitting returns a new policy and
never changes the classifier it is fitted on.
"""

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from mailroute.settings import BrokenFile


@dataclass(frozen=True)
class RerankPolicy:
    retrieval_weight: float = 0.0  # weight of the retrieval score (label index score) added to each logit
    ce_weight: float = 1.0  # weight of the cross-encoder logit (0 only when validation finds it useless)
    temperature: float = 1.0  # divides the fused score: fitted by NLL on validation, for calibration
    retrieval_temperature: float = 0.05  # divides retrieval scores where stage 2 is skipped (also fitted)
    gate_margin: float = None  # skip stage 2 when top-1 minus top-2 retrieval score exceeds this; None = always rerank (never where ce_weight is 0)
    flat_weight: float = 0.0  # weight of the flat classifier's log-probability in the reranked fusion (0 = not fused)
    gated_flat_weight: float = 0.0  # ... beside the retrieval score where stage 2 is skipped (0 = retrieval alone)

    def __post_init__(self):
        for f in fields(self):  # a pipeline.json edited by hand ("0.5" for 0.5) is refused here, not mid-request
            v = getattr(self, f.name)
            if not (v is None and f.name == "gate_margin") and (isinstance(v, bool) or not isinstance(v, (int, float)) or v != v):
                raise ValueError(f"{type(self).__name__}.{f.name} must be a number, got {v!r}")
        if not self.temperature > 0 or not self.retrieval_temperature > 0:
            raise ValueError(f"{type(self).__name__} expects positive temperatures, but got {self.temperature}, {self.retrieval_temperature}")
        if self.gate_margin is not None and self.gate_margin < 0:
            raise ValueError(f"{type(self).__name__} expects gate_margin >= 0 or None, but got {self.gate_margin}")

    @property
    def uses_flat(self) -> bool:
        """Whether answers need the flat classifier's log-probabilities."""
        return bool(self.flat_weight or self.gated_flat_weight)

    def _flat_term(self, weight: float, flat):
        if not weight:
            return 0.0
        if flat is None:
            raise ValueError(f"this {type(self).__name__} fuses the flat classifier's log-probabilities (weight {weight:g}), "
                             f"but none were given")
        return weight * flat

    # the formula (numpy arrays or torch tensors alike: only arithmetic)
    def fused(self, logits, retrieval, flat=None):
        """(..., k) logits, retrieval scores and (where the policy uses them) flat log-probabilities -> (..., k)
        scores whose softmax is the answer."""
        return (self.ce_weight * logits + self.retrieval_weight * retrieval
                + self._flat_term(self.flat_weight, flat)) / self.temperature

    def probabilities(self, logits: np.ndarray, retrieval: np.ndarray, flat: np.ndarray = None) -> np.ndarray:
        """Reranked probabilities; logits None = stage 2 skipped (retrieval_probabilities)."""
        if logits is None:
            return self.retrieval_probabilities(retrieval, flat)
        flat = None if flat is None else np.asarray(flat, np.float64)
        return _softmax(self.fused(np.asarray(logits, np.float64), np.asarray(retrieval, np.float64), flat))

    def retrieval_probabilities(self, retrieval: np.ndarray, flat: np.ndarray = None) -> np.ndarray:
        """Probabilities where stage 2 is skipped."""
        retrieval = np.asarray(retrieval, np.float64)
        flat = None if flat is None else np.asarray(flat, np.float64)
        return _softmax((retrieval + self._flat_term(self.gated_flat_weight, flat)) / self.retrieval_temperature)

    def skip_rerank(self, retrieval: np.ndarray, gate: bool = True) -> np.ndarray:
        """(n, >=2) retrieval scores, best first -> (n,) bool: True where stage 2 is not needed: every email where the
        policy gives the cross-encoder no weight (validation found it useless: its logits would not change an answer,
        and the gated path is the fit of the same scores), else where the gate finds retrieval sure."""
        retrieval = np.atleast_2d(retrieval)
        if self.ce_weight == 0:
            return np.ones(len(retrieval), dtype=bool)
        if not gate or self.gate_margin is None or retrieval.shape[1] < 2:
            return np.zeros(len(retrieval), dtype=bool)
        return retrieval_margin(retrieval) > self.gate_margin

    def describe(self) -> str:
        """The formula with this policy's numbers, in words (the run's report; the same terms as `fused` and
        `retrieval_probabilities`)."""
        flat = f" + {self.flat_weight:.4g} x log p_flat" if self.flat_weight else ""
        gated_flat = f" + {self.gated_flat_weight:.4g} x log p_flat" if self.gated_flat_weight else ""
        return (f"score = ({self.ce_weight:g} x logit + {self.retrieval_weight:.4g} x retrieval score{flat}) / {self.temperature:.4g}; "
                f"where stage 2 is skipped, (retrieval score{gated_flat}) / {self.retrieval_temperature:.4g}"
                + (" (p_flat: the flat classifier's probability of the candidate)" if flat or gated_flat else ""))

    # JSON form
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RerankPolicy":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} got unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "RerankPolicy":
        """BrokenFile (naming the file) when it is not a policy's JSON form; OSError when it cannot be read."""
        text = Path(path).read_text()
        try:
            return cls.from_dict(json.loads(text))
        except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError; a list or number for the object: TypeError
            raise BrokenFile(f"{path} is not a rerank policy: {e}") from None

    def without_flat(self) -> "RerankPolicy":
        """The same policy answering without the flat classifier (its other weights as fitted beside it)."""
        return replace(self, flat_weight=0.0, gated_flat_weight=0.0)

    def with_gate(self, margin) -> "RerankPolicy":
        return replace(self, gate_margin=None if margin is None else float(margin))


def retrieval_margin(retrieval: np.ndarray) -> np.ndarray:
    """(n, >=2) retrieval scores, best first -> (n,) top-1 minus top-2: how sure retrieval is, as the gate reads it
    (and as training picks the emails the gate would send to stage 2)."""
    retrieval = np.atleast_2d(retrieval)
    return retrieval[:, 0] - retrieval[:, 1]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# fitting on validation: each returns a new policy


def _nll(z: np.ndarray, gold: np.ndarray) -> float:
    z = z - z.max(1, keepdims=True)
    return float(-(z[np.arange(len(z)), gold] - np.log(np.exp(z).sum(1))).sum())


NO_SIGNAL = 1e-6  # a fitted weight at or below this carries no signal: that score is left out and the others refitted


def conditional_logit(features: list, gold: np.ndarray, l2: float = 0.0, standardise: bool = False) -> np.ndarray:
    """Weights w of score = sum_f w_f x features[f] maximising the likelihood of the gold candidate under the
    softmax over each row's candidates. features: (n, k) arrays; gold: (n,) positions.
    l2: ridge penalty per row on the weights (of the standardised features where `standardise`); standardise: fit
    on features divided by their standard deviation (weights returned for the features as given). The served fits
    use neither; the fusion studies (benchmarks/fusion_study.py) compare many correlated features with both."""
    from scipy.optimize import minimize

    x = np.stack([np.asarray(f, np.float64) for f in features], -1)  # (n, k, F)
    gold = np.asarray(gold)
    if x.ndim != 3 or len(gold) != len(x):
        raise ValueError(f"conditional_logit expects (n, k) features and (n,) gold, but got {[np.shape(f) for f in features]}, {gold.shape}")
    scale = x.reshape(-1, x.shape[-1]).std(0) + 1e-9 if standardise else np.ones(x.shape[-1])  # (F,)
    x = x / scale
    rows, n = np.arange(len(gold)), len(gold)

    def objective(w):  # NLL (+ ridge) and its gradient
        z = x @ w  # (n, k)
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        nll = -np.log(p[rows, gold] + 1e-300).sum() + l2 * n * (w @ w)
        return nll, -(x[rows, gold] - (p[..., None] * x).sum(1)).sum(0) + 2 * l2 * n * w

    return minimize(objective, np.ones(x.shape[-1]), jac=True, method="L-BFGS-B").x / scale


CV_FOLDS = 5  # folds of the validation emails for held-out likelihoods (cross_validated_nll)
FLAT_FUSION_MIN_GAIN = 1e-3  # the share of held-out NLL fusing the flat classifier must save (BANKING77: 8.6%)


def cross_fitted_scores(features: list, gold: np.ndarray, folds: int = CV_FOLDS, seed: int = 0, **fit) -> np.ndarray:
    """(n, k) fused scores of these rows, each fold's under the conditional-logit weights fitted on the other folds
    (`conditional_logit`, with `fit`'s options): how a fusion of these features scores emails its weights never saw.
    Rows whose gold is -1 (not among the candidates) are scored but never fitted on."""
    gold = np.asarray(gold)
    x = np.stack([np.asarray(f, np.float64) for f in features], -1)  # (n, k, F)
    order = np.random.default_rng(seed).permutation(len(gold))
    out = np.zeros(x.shape[:2])
    for f in range(min(folds, len(gold))):
        held = order[f::folds]
        rest = np.setdiff1d(order, held)
        rest = rest[gold[rest] >= 0]
        w = conditional_logit([x[rest, :, j] for j in range(x.shape[-1])], gold[rest], **fit)
        out[held] = x[held] @ w
    return out


def cross_validated_nll(features: list, gold: np.ndarray, folds: int = CV_FOLDS, seed: int = 0) -> float:
    """Summed NLL of the gold candidate under `cross_fitted_scores`: how well a fusion of these features does on
    emails its weights never saw (rows whose gold was retrieved only)."""
    gold = np.asarray(gold)
    if (gold < 0).any():
        raise ValueError(f"cross_validated_nll expects the gold candidate's position in every row, but got {int((gold < 0).sum())} rows without one")
    return _nll(cross_fitted_scores(features, gold, folds, seed), gold)


def flat_fusion_helps(logits: np.ndarray, retrieval: np.ndarray, gold: np.ndarray, flat: np.ndarray) -> dict:
    """Whether fusing the flat classifier's log-probabilities lowers the held-out NLL (cross_validated_nll) of the two
    ways a policy answers: reranked (logit, retrieval [, flat]) and gated (retrieval [, flat]), summed. The fit itself
    cannot say: in-sample, one more feature never raises the likelihood. Where the flat classifier is weak and validation
    small (the demo taxonomy: 9 training emails a label, 50 validation emails) its fitted weight follows noise and cost
    0.5-2 test points in each of four seeds; on BANKING77 it lowers the held-out NLL (benchmarks/RESULTS.md, README).
    -> {"fused": bool, "cv_nll_with_flat", "cv_nll_without_flat", "folds"}"""
    with_flat = cross_validated_nll([logits, retrieval, flat], gold) + cross_validated_nll([retrieval, flat], gold)
    without = cross_validated_nll([logits, retrieval], gold) + cross_validated_nll([retrieval], gold)
    # fused only on a real gain: at least FLAT_FUSION_MIN_GAIN of the NLL (not rounding: a flat score that is constant
    # across the candidates changes nothing, yet can come out 1e-10 lower), and with rows enough for every fold to hold
    # out two
    fused = len(gold) >= 2 * CV_FOLDS and with_flat < without * (1 - FLAT_FUSION_MIN_GAIN)
    return {"fused": bool(fused), "cv_nll_with_flat": with_flat, "cv_nll_without_flat": without, "folds": CV_FOLDS}


def fit_fusion(logits: np.ndarray, retrieval: np.ndarray, gold: np.ndarray, flat: np.ndarray = None) -> RerankPolicy:
    """Conditional-logit fit of score = a x logit + b x retrieval (+ c x log p_flat) by NLL of the gold candidate.

    Args:
        logits, retrieval: (n, k) per email and candidate, rows whose gold was retrieved only.
        gold: (n,) position of the gold candidate in each row.
        flat: (n, k) the flat classifier's log-probabilities of the candidates, or None (not fused).
    Returns a policy with ce_weight 1, retrieval_weight b/a, flat_weight c/a, temperature 1/a; where the
    cross-encoder carries no signal (a <= NO_SIGNAL), ce_weight 0 and the other scores refitted without it: retrieval_weight
    1, flat_weight c/b, temperature 1/b, or, where retrieval carries none either (b <= NO_SIGNAL < c), the flat classifier
    alone (retrieval_weight 0, flat_weight 1, temperature 1/c). Gate and retrieval temperature stay the defaults'.
    """
    logits, retrieval = np.asarray(logits, np.float64), np.asarray(retrieval, np.float64)
    if logits.shape != retrieval.shape or logits.ndim != 2 or len(gold) != len(logits) or (flat is not None and np.shape(flat) != logits.shape):
        raise ValueError(f"fit_fusion expects (n, k) logits, retrieval (and flat) and (n,) gold, but got {logits.shape}, "
                         f"{retrieval.shape}, {np.shape(gold)}" + ("" if flat is None else f", flat {np.shape(flat)}"))
    others = [retrieval] + ([] if flat is None else [flat])
    a, *rest = conditional_logit([logits] + others, gold)
    if a <= NO_SIGNAL:  # the cross-encoder carries no signal: the other scores alone
        b, *c = conditional_logit(others, gold)
        if c and b <= NO_SIGNAL < c[0]:  # nor retrieval: the flat classifier alone
            return RerankPolicy(ce_weight=0.0, retrieval_weight=0.0, flat_weight=1.0, temperature=float(1.0 / c[0]))
        b = max(b, NO_SIGNAL)
        return RerankPolicy(ce_weight=0.0, retrieval_weight=1.0, flat_weight=float(c[0] / b) if c else 0.0, temperature=float(1.0 / b))
    return RerankPolicy(ce_weight=1.0, retrieval_weight=float(rest[0] / a), flat_weight=float(rest[1] / a) if flat is not None else 0.0,
                        temperature=float(1.0 / a))


def fit_ce_only(logits: np.ndarray, gold: np.ndarray) -> RerankPolicy:
    """The reranker alone (retrieval weight 0), its temperature fitted by NLL where its logit carries signal (else the
    default's): the "cross-encoder only" row of a run's variants, as evaluation and benchmarks/design_claims.py report it."""
    logits = np.asarray(logits, np.float64)
    fitted = fit_fusion(logits, np.zeros_like(logits), gold)
    return RerankPolicy(ce_weight=1.0, retrieval_weight=0.0, **({"temperature": fitted.temperature} if fitted.ce_weight else {}))


def fit_retrieval_temperature(retrieval: np.ndarray, gold: np.ndarray, base: RerankPolicy, flat: np.ndarray = None) -> RerankPolicy:
    """The softmax used where the gate skips stage 2, by NLL: its temperature (and, with the flat classifier's
    log-probabilities, their weight beside the retrieval score)."""
    retrieval = np.asarray(retrieval, np.float64)
    if flat is not None:
        b, c = conditional_logit([retrieval, flat], gold)
        if b > NO_SIGNAL:
            return replace(base, retrieval_temperature=float(1.0 / b), gated_flat_weight=float(c / b))
    grid = np.exp(np.linspace(np.log(1e-3), np.log(2.0), 200))
    best = min(grid, key=lambda t: _nll(retrieval / t, gold))
    return replace(base, retrieval_temperature=float(best), gated_flat_weight=0.0)


@dataclass(frozen=True)
class GateTarget:
    """What fitting the gate aims for (the one place its defaults live).

    tolerance: validation accuracy the gate may give up versus reranking every email.
    rerank_budget: share of emails the operator means to send through stage 2: a target, exceeded (and
        reported as `within_budget: false`) only when validation accuracy needs more. The gate spends it:
        it reranks up to this share of the least sure emails rather than the fewest that validation
        can tell apart, because the few hundred validation emails around the margin cannot tell a gate
        that reranks 1% from one that reranks 25%, and every email reranked lands closer to reranking all.
        0 = rerank as few emails as the tolerance allows.
    """
    tolerance: float = 0.0
    rerank_budget: float = 0.25

    def __post_init__(self):
        if not 0 <= self.tolerance <= 1 or not 0 <= self.rerank_budget <= 1:
            from mailroute.settings import BadSetting

            raise BadSetting(f"--gate-tolerance and --rerank-budget must be shares in [0, 1] (e.g. 0.25, not 25), "
                             f"got tolerance {self.tolerance}, rerank_budget {self.rerank_budget}")


def fit_gate(policy: RerankPolicy, logits: np.ndarray, retrieval: np.ndarray, gold: np.ndarray,
             target: GateTarget = GateTarget(), flat: np.ndarray = None) -> tuple:
    """The gate margin on validation. Feasible gates keep validation accuracy within `target.tolerance`
    of always reranking; among them the one reranking the largest share within `target.rerank_budget`
    (or, when every feasible gate reranks more than the budget, the one reranking the fewest).
    Rows: every email (gold = -1 where retrieval missed it); flat: the flat classifier's log-probabilities of the
    candidates where the policy fuses them.

    Returns (policy with gate_margin, {"margin", "share_reranked", "accuracy_gated", "accuracy_ungated",
    "within_budget"}).
    """
    logits, retrieval, gold = np.asarray(logits, np.float64), np.asarray(retrieval, np.float64), np.asarray(gold)
    if policy.ce_weight == 0:  # the reranker has no weight: stage 2 never runs, whatever the gate (skip_rerank)
        acc = float(np.mean(policy.retrieval_probabilities(retrieval, flat).argmax(1) == gold))
        return policy.with_gate(None), {"margin": None, "share_reranked": 0.0, "accuracy_gated": acc, "accuracy_ungated": acc,
                                        "within_budget": True, "reranker_weightless": True}
    reranked_ok = policy.probabilities(logits, retrieval, flat).argmax(1) == gold  # (n,)
    retrieval_ok = policy.retrieval_probabilities(retrieval, flat).argmax(1) == gold  # what the gated path answers
    margin = retrieval_margin(retrieval)
    ungated = reranked_ok.mean()
    feasible = [(None, 1.0, float(ungated))]  # no gate
    for m in np.unique(margin):
        skip = margin > m
        acc = np.where(skip, retrieval_ok, reranked_ok).mean()
        if acc >= ungated - target.tolerance:
            feasible.append((float(m), float((~skip).mean()), float(acc)))
    in_budget = [f for f in feasible if f[1] <= target.rerank_budget]
    if target.rerank_budget >= 1:
        best = feasible[0]  # every email may be reranked: no gate
    else:
        best = max(in_budget, key=lambda f: f[1]) if in_budget else min(feasible, key=lambda f: f[1])
    gated = policy.with_gate(best[0])
    return gated, {"margin": best[0], "share_reranked": best[1], "accuracy_gated": best[2], "accuracy_ungated": float(ungated),
                   "within_budget": bool(in_budget)}
