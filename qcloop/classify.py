"""Few-shot particle-shape classifier on top of any embedder.

A :class:`Classifier` maps embedding vectors (one row per particle, from
:mod:`qcloop.embed`) to shape classes chosen by the chemist (``sphere``, ``dumbbell``, ...).
It is trained from a handful of labelled crops per class (``qcloop train``) and then annotates
every particle the pipeline measures (``class``, ``class_probability``; below the configured
threshold the class is ``"unknown"``).

Preprocessing
-------------
Every embedding column is standardised with the *training* mean and standard deviation
(a column with zero spread keeps scale 1). Both vectors are stored in the model file, so the
embedder itself stays a plain, weight-free function.

Kinds
-----
``logreg``  multinomial logistic regression (L2, lbfgs) — the default.
``svm``     support-vector machine, RBF kernel, probabilities by cross-validated Platt scaling.
``rf``      random forest.
``nb``      Gaussian naive Bayes.
``auto``    needs a validation set: a small grid over all four kinds (as in Barnatan et al.),
            scored by macro-F1 on the validation set; the best one is kept and every kind's
            best validation score is recorded in the model.

File format (no pickle anywhere)
--------------------------------
``save(path)`` writes ``path`` (JSON: format tag, kind, hyper-parameters, embedder spec,
classes, training counts, validation scores, library versions, SHA-256 of the array file) and
``path.with_suffix(".npz")`` (NumPy arrays only, read back with ``allow_pickle=False``):

* ``mean``, ``scale``: standardisation;
* ``X_train``, ``y_train``: the raw training embeddings and class indices (for audit and refit);
* the fitted parameters — logreg: ``coef``, ``intercept``; nb: ``theta``, ``var``,
  ``class_prior``; rf: every tree's ``children_left``, ``children_right``, ``feature``,
  ``threshold`` and leaf class fractions, concatenated with per-tree offsets;
* svm: a kernel SVM with its calibration is not a few plain arrays, so it is **refitted on load** from
  ``X_train``/``y_train`` with the stored hyper-parameters and seed (deterministic); the file
  also stores the training-set probabilities computed at save time and loading checks the
  refitted model reproduces them (within 1e-6), else it refuses the file (e.g. another
  scikit-learn version).

For logreg, nb and rf the predictions are computed from the stored arrays by this module's own
NumPy code, both before and after saving, so a loaded model predicts exactly what the trained
one did. A file that is not this JSON (a pickle, say) is refused with :class:`ModelError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from qcloop.errors import ModelError

FORMAT = "qcloop-classifier"
FORMAT_VERSION = 1
KINDS = ("logreg", "svm", "rf", "nb")
UNKNOWN = "unknown"

#: hyper-parameter grids searched with a validation set (``kind="auto"``)
GRIDS: dict[str, list[dict[str, Any]]] = {
    "logreg": [{"C": c} for c in (0.1, 1.0, 10.0, 100.0)],
    "svm": [{"C": c, "gamma": g} for c in (1.0, 10.0, 100.0) for g in ("scale", 0.01, 0.1)],
    "rf": [{"n_estimators": n, "max_depth": d} for n in (100, 300) for d in (None, 8)],
    "nb": [{"var_smoothing": v} for v in (1e-9, 1e-6, 1e-3)],
}
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "logreg": {"C": 1.0},
    "svm": {"C": 10.0, "gamma": "scale"},
    "rf": {"n_estimators": 200, "max_depth": None},
    "nb": {"var_smoothing": 1e-9},
}


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Unweighted mean of per-class F1 over ``labels`` (default: classes present in y_true)."""
    from sklearn.metrics import f1_score

    labels = list(labels) if labels is not None else sorted(set(y_true))
    return float(f1_score(list(y_true), list(y_pred), labels=labels, average="macro", zero_division=0))


# ============================================================================ estimators
def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _fit_sklearn(kind: str, params: Mapping[str, Any], X: np.ndarray, y: np.ndarray, seed: int):
    if kind == "logreg":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=float(params["C"]), max_iter=5000, tol=1e-6).fit(X, y)
    if kind == "svm":
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.model_selection import StratifiedKFold
        from sklearn.svm import SVC

        # Platt (sigmoid) scaling of the decision values, cross-validated; deterministic folds
        n_splits = int(min(5, np.bincount(y).min()))
        svc = SVC(C=float(params["C"]), gamma=params["gamma"], kernel="rbf", random_state=seed)
        return CalibratedClassifierCV(svc, method="sigmoid", cv=StratifiedKFold(n_splits), ensemble=False).fit(X, y)
    if kind == "rf":
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(n_estimators=int(params["n_estimators"]), max_depth=params["max_depth"],
                                      random_state=seed, n_jobs=1).fit(X, y)
    if kind == "nb":
        from sklearn.naive_bayes import GaussianNB

        return GaussianNB(var_smoothing=float(params["var_smoothing"])).fit(X, y)
    raise ModelError(f"unknown classifier kind {kind!r}; choose one of {', '.join(KINDS)} or auto")


def _export_params(kind: str, model: Any, n_classes: int) -> dict[str, np.ndarray]:
    """Fitted parameters as plain arrays (the SVM stores none: it is refitted on load)."""
    if kind == "logreg":
        coef, intercept = np.asarray(model.coef_, float), np.asarray(model.intercept_, float)
        if coef.shape[0] == 1 and n_classes == 2:  # binary: sigmoid of one score == softmax of (0, s)
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.r_[0.0, intercept]
        return {"coef": coef, "intercept": intercept}
    if kind == "nb":
        return {"theta": np.asarray(model.theta_, float), "var": np.asarray(model.var_, float),
                "class_prior": np.asarray(model.class_prior_, float)}
    if kind == "rf":
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("left", "right", "feature", "threshold", "leaf")}
        offsets = [0]
        for est in model.estimators_:
            t = est.tree_
            parts["left"].append(t.children_left.astype(np.int64))
            parts["right"].append(t.children_right.astype(np.int64))
            parts["feature"].append(t.feature.astype(np.int64))
            parts["threshold"].append(t.threshold.astype(np.float64))
            value = np.asarray(t.value, float)[:, 0, :]
            # the tree's classes are model.classes_ (all of them; y holds indices 0..k-1)
            full = np.zeros((value.shape[0], n_classes))
            full[:, np.asarray(est.classes_, int)] = value
            s = full.sum(axis=1, keepdims=True)
            parts["leaf"].append(np.divide(full, s, out=np.zeros_like(full), where=s > 0))
            offsets.append(offsets[-1] + t.node_count)
        out = {f"rf_{k}": np.concatenate(v) for k, v in parts.items()}
        out["rf_offsets"] = np.asarray(offsets, np.int64)
        return out
    return {}


def _predict_arrays(kind: str, arrays: Mapping[str, np.ndarray], Z: np.ndarray) -> np.ndarray:
    """Class probabilities (n, k) from stored parameters and standardised features Z."""
    if kind == "logreg":
        return _softmax(Z @ arrays["coef"].T + arrays["intercept"])
    if kind == "nb":
        theta, var, prior = arrays["theta"], arrays["var"], arrays["class_prior"]
        ll = -0.5 * (np.log(2 * np.pi * var).sum(axis=1)[None, :]
                     + (((Z[:, None, :] - theta[None]) ** 2) / var[None]).sum(axis=2))
        return _softmax(ll + np.log(prior)[None, :])
    if kind == "rf":
        left, right = arrays["rf_left"], arrays["rf_right"]
        feat, thr, leaf = arrays["rf_feature"], arrays["rf_threshold"], arrays["rf_leaf"]
        offsets = arrays["rf_offsets"]
        n_trees = len(offsets) - 1
        proba = np.zeros((Z.shape[0], leaf.shape[1]))
        rows = np.arange(Z.shape[0])
        Z = Z.astype(np.float32)  # scikit-learn trees split float32 features
        for t in range(n_trees):
            base = int(offsets[t])
            node = np.zeros(Z.shape[0], np.int64)
            while True:
                g = base + node
                internal = left[g] != -1
                if not internal.any():
                    break
                gi = g[internal]
                go_left = Z[rows[internal], feat[gi]] <= thr[gi]
                node[internal] = np.where(go_left, left[gi], right[gi])
            proba += leaf[base + node]
        return proba / max(n_trees, 1)
    raise ModelError(f"no stored parameters for classifier kind {kind!r}")


# ============================================================================ classifier
@dataclass
class Classifier:
    """Trained shape classifier. Build with :meth:`fit`; persist with :meth:`save` / :meth:`load`.

    Attributes
    ----------
    kind : str
        One of :data:`KINDS`.
    classes : list of str
        Column order of the probabilities.
    embedder_spec : str
        Spec of the embedder whose vectors it was trained on (``"morphology-v1"``, ...).
    params : dict
        Hyper-parameters of the fitted estimator.
    mean, scale : ndarray of float64, shape (d,)
        Standardisation (training mean and standard deviation; zero spread → 1).
    training_counts : dict of str to int
    validation_scores : dict
        Per kind: best macro-F1 on the validation set and its parameters; ``selected`` kind;
        per-class F1 of the selected model. Empty without a validation set.
    """

    kind: str
    classes: list[str]
    embedder_spec: str
    params: dict[str, Any]
    mean: np.ndarray
    scale: np.ndarray
    X_train: np.ndarray
    y_train: np.ndarray
    training_counts: dict[str, int]
    validation_scores: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _svm: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------ training
    @classmethod
    def fit(
        cls,
        X: np.ndarray,
        y: Sequence[str],
        kind: str = "logreg",
        *,
        embedder_spec: str = "morphology-v1",
        validation: tuple[np.ndarray, Sequence[str]] | None = None,
        params: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> "Classifier":
        """Train on embeddings ``X`` (n, d) with labels ``y`` (n,).

        Parameters
        ----------
        kind : {"logreg", "svm", "rf", "nb", "auto"}
            ``auto`` searches :data:`GRIDS` over every kind and needs ``validation``.
        embedder_spec : str
            Recorded in the model; :meth:`check_embedder` refuses another one.
        validation : (X_val, y_val), optional
            Scored by macro-F1 (for every kind in ``auto``, else for ``kind``'s grid, the best
            hyper-parameters being kept).
        params : mapping, optional
            Hyper-parameters for a single kind (default :data:`DEFAULT_PARAMS`).
        seed : int
            Random state of the SVM's Platt scaling and the random forest.

        Raises
        ------
        ModelError
            Fewer than two classes, a class with fewer than 2 examples, NaN embeddings,
            mismatched shapes, unknown kind.
        """
        X = np.asarray(X, np.float64)
        y_arr = np.asarray([str(v) for v in y])
        if X.ndim != 2 or X.shape[0] != len(y_arr):
            raise ModelError(f"embeddings shape {X.shape} does not match {len(y_arr)} labels")
        if not np.all(np.isfinite(X)):
            raise ModelError("training embeddings contain NaN or inf")
        classes = sorted(set(y_arr.tolist()))
        if len(classes) < 2:
            raise ModelError(f"need at least two classes to train, got {classes}")
        counts = {c: int((y_arr == c).sum()) for c in classes}
        few = {c: n for c, n in counts.items() if n < 2}
        if few:
            raise ModelError(f"every class needs at least 2 labelled examples; too few: {few}")
        if kind != "auto" and kind not in KINDS:
            raise ModelError(f"unknown classifier kind {kind!r}; choose one of {', '.join(KINDS)} or auto")
        if kind == "auto" and validation is None:
            raise ModelError("kind 'auto' (grid search) needs a validation set")
        mean = X.mean(axis=0)
        scale = X.std(axis=0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        y_idx = np.searchsorted(np.asarray(classes), y_arr).astype(np.int64)

        def build(k: str, p: Mapping[str, Any]) -> "Classifier":
            model = cls(kind=k, classes=list(classes), embedder_spec=embedder_spec, params=dict(p),
                        mean=mean, scale=scale, X_train=X, y_train=y_idx, training_counts=counts, seed=seed)
            model._train()
            return model

        if validation is None:
            return build(kind, params or DEFAULT_PARAMS[kind])

        Xv = np.asarray(validation[0], np.float64)
        yv = [str(v) for v in validation[1]]
        if Xv.ndim != 2 or Xv.shape[1] != X.shape[1] or Xv.shape[0] != len(yv):
            raise ModelError(f"validation embeddings shape {Xv.shape} does not match the training set / labels")
        unseen = sorted(set(yv) - set(classes))
        if unseen:
            raise ModelError(f"validation set has classes not in the training set: {unseen}")
        kinds = list(KINDS) if kind == "auto" else [kind]
        scores: dict[str, Any] = {}
        best: tuple[float, int, Classifier] | None = None
        for k_i, k in enumerate(kinds):
            grid = [dict(params)] if (params and kind != "auto") else GRIDS[k]
            kind_best: tuple[float, dict[str, Any]] | None = None
            for p in grid:
                cand = build(k, p)
                labels, _ = cand.predict(Xv)
                f1 = macro_f1(yv, labels.tolist(), classes)
                if kind_best is None or f1 > kind_best[0]:
                    kind_best = (f1, dict(p))
                # ties keep the earlier kind (logreg first: the simplest)
                if best is None or f1 > best[0]:
                    best = (f1, k_i, cand)
            assert kind_best is not None
            scores[k] = {"macro_f1": round(kind_best[0], 6), "params": kind_best[1]}
        assert best is not None
        chosen = best[2]
        labels, _ = chosen.predict(Xv)
        from sklearn.metrics import f1_score

        per_class = f1_score(yv, labels.tolist(), labels=classes, average=None, zero_division=0)
        chosen.validation_scores = {
            "metric": "macro_f1",
            "n_validation": len(yv),
            "validation_counts": {c: int(sum(1 for v in yv if v == c)) for c in sorted(set(yv))},
            "kinds": scores,
            "selected": chosen.kind,
            "selected_params": chosen.params,
            "selected_macro_f1": round(best[0], 6),
            "per_class_f1": {c: round(float(f), 6) for c, f in zip(classes, per_class)},
        }
        return chosen

    def _train(self) -> None:
        Z = self._standardise(self.X_train)
        model = _fit_sklearn(self.kind, self.params, Z, self.y_train, self.seed)
        if self.kind == "svm":
            self._svm = model
            self._arrays = {}
        else:
            self._arrays = _export_params(self.kind, model, len(self.classes))

    # ------------------------------------------------------------------ prediction
    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, np.float64) - self.mean) / self.scale

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, len(classes)), columns in :attr:`classes` order."""
        X = np.asarray(X, np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ModelError(f"embeddings have shape {X.shape}; this classifier expects (n, {self.n_features}) "
                             f"from embedder {self.embedder_spec!r}")
        if X.shape[0] == 0:
            return np.zeros((0, len(self.classes)))
        Z = np.nan_to_num(self._standardise(X), nan=0.0, posinf=0.0, neginf=0.0)
        if self.kind == "svm":
            proba = np.zeros((Z.shape[0], len(self.classes)))
            proba[:, np.asarray(self._svm.classes_, int)] = self._svm.predict_proba(Z)
            return proba
        return _predict_arrays(self.kind, self._arrays, Z)

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Most probable class per row.

        Returns
        -------
        classes : ndarray of str, shape (n,)
        probabilities : ndarray of float64, shape (n, len(self.classes))
            Full probability matrix; ``probabilities.max(axis=1)`` is the winning class's.
        """
        proba = self.predict_proba(X)
        if proba.shape[0] == 0:
            return np.zeros(0, dtype=object).astype(str), proba
        return np.asarray(self.classes)[proba.argmax(axis=1)], proba

    def annotate(self, particles: pd.DataFrame, embeddings: np.ndarray, unknown_below: float = 0.5) -> pd.DataFrame:
        """Copy of ``particles`` with ``class`` and ``class_probability`` columns.

        Rows whose best probability is below ``unknown_below`` get class ``"unknown"`` (their
        ``class_probability`` is still the best class's probability).
        """
        if len(particles) != len(embeddings):
            raise ModelError(f"{len(particles)} particles but {len(embeddings)} embedding rows")
        out = particles.copy()
        labels, proba = self.predict(np.asarray(embeddings).reshape(len(particles), -1) if len(particles)
                                     else np.zeros((0, self.n_features)))
        best = proba.max(axis=1) if len(proba) else np.zeros(0)
        cls = np.where(best >= unknown_below, labels, UNKNOWN) if len(best) else np.zeros(0, dtype=str)
        out["class"] = pd.Series(cls, index=out.index, dtype=object)
        out["class_probability"] = pd.Series(best, index=out.index, dtype=float)
        return out

    def check_embedder(self, spec: str) -> None:
        """Raise ModelError unless the model was trained on embeddings of ``spec``."""
        if spec != self.embedder_spec:
            raise ModelError(f"classifier was trained on embeddings {self.embedder_spec!r} but the pipeline's "
                             f"embedder is {spec!r}: retrain it (qcloop train) or configure that embedder")

    # ------------------------------------------------------------------ persistence
    def _metadata(self) -> dict[str, Any]:
        import sklearn

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "params": self.params,
            "seed": self.seed,
            "embedder_spec": self.embedder_spec,
            "classes": self.classes,
            "n_features": self.n_features,
            "preprocessing": {"standardise": "z-score with training mean/std (arrays 'mean', 'scale')"},
            "training_counts": self.training_counts,
            "validation_scores": self.validation_scores,
            "versions": {"numpy": np.__version__, "scikit-learn": sklearn.__version__},
        }

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (JSON) and ``path.with_suffix('.npz')`` (arrays). Returns the JSON path."""
        path = Path(path)
        if path.suffix.lower() == ".npz":
            path = path.with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mean": self.mean, "scale": self.scale, "X_train": self.X_train, "y_train": self.y_train,
                  **self._arrays}
        if self.kind == "svm":
            arrays["svm_check_proba"] = self.predict_proba(self.X_train)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        blob = buf.getvalue()
        meta = self._metadata()
        meta["arrays_file"] = path.with_suffix(".npz").name
        meta["arrays_sha256"] = hashlib.sha256(blob).hexdigest()
        path.with_suffix(".npz").write_bytes(blob)
        path.write_text(json.dumps(meta, indent=2, sort_keys=True, default=_json_default) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Classifier":
        """Read a model written by :meth:`save` (the ``.json`` or its ``.npz``).

        Raises
        ------
        ModelError
            Missing file, not a qcloop classifier JSON (e.g. a pickle), array file missing,
            altered (checksum) or holding object arrays, SVM refit not reproducible.
        """
        path = Path(path)
        if path.suffix.lower() == ".npz":
            path = path.with_suffix(".json")
        if not path.is_file():
            raise ModelError(f"classifier file not found: {path}")
        raw = path.read_bytes()
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelError(f"{path}: not a qcloop classifier (expected JSON written by 'qcloop train'; "
                             "pickled models are refused)") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ModelError(f"{path}: not a qcloop classifier file (format tag missing)")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"{path}: classifier format version {meta.get('format_version')} not supported")
        npz = path.with_name(str(meta.get("arrays_file", path.with_suffix(".npz").name)))
        if npz.parent != path.parent or not npz.is_file():
            raise ModelError(f"{path}: its array file {npz.name} is missing")
        blob = npz.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta.get("arrays_sha256"):
            raise ModelError(f"{npz}: checksum does not match {path.name} (file altered or from another model)")
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except ValueError as exc:
            raise ModelError(f"{npz}: refused ({exc})") from None
        except Exception as exc:  # zipfile/format errors
            raise ModelError(f"{npz}: unreadable array file ({type(exc).__name__}: {exc})") from None
        kind = meta.get("kind")
        if kind not in KINDS:
            raise ModelError(f"{path}: unknown classifier kind {kind!r}")
        try:
            model = cls(kind=kind, classes=[str(c) for c in meta["classes"]], embedder_spec=str(meta["embedder_spec"]),
                        params=dict(meta["params"]), mean=arrays.pop("mean"), scale=arrays.pop("scale"),
                        X_train=arrays.pop("X_train"), y_train=arrays.pop("y_train"),
                        training_counts={str(k): int(v) for k, v in meta["training_counts"].items()},
                        validation_scores=dict(meta.get("validation_scores") or {}), seed=int(meta.get("seed", 0)))
        except KeyError as exc:
            raise ModelError(f"{path}: missing field or array {exc}") from None
        if model.mean.shape != (int(meta["n_features"]),):
            raise ModelError(f"{path}: standardisation arrays do not match n_features={meta['n_features']}")
        if kind == "svm":
            check = arrays.pop("svm_check_proba", None)
            model._train()
            again = model.predict_proba(model.X_train)
            if check is None or check.shape != again.shape or not np.allclose(check, again, atol=1e-6):
                raise ModelError(f"{path}: the SVM refitted from its stored training set does not reproduce the "
                                 "saved probabilities (another scikit-learn version?); retrain it")
        else:
            model._arrays = arrays
        return model

    def summary(self) -> str:
        """Human-readable training counts and validation scores."""
        lines = [f"classifier: {self.kind} {self.params} on {self.embedder_spec} ({self.n_features} features)",
                 "training counts: " + ", ".join(f"{c}={n}" for c, n in self.training_counts.items())]
        vs = self.validation_scores
        if vs:
            lines.append(f"validation ({vs['n_validation']} particles), macro-F1 by kind:")
            for k, v in vs["kinds"].items():
                mark = "  <- selected" if k == vs["selected"] else ""
                lines.append(f"  {k:7s} {v['macro_f1']:.3f}  {v['params']}{mark}")
            lines.append("per-class F1 (selected): " + ", ".join(f"{c}={f:.3f}" for c, f in vs["per_class_f1"].items()))
        return "\n".join(lines)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        v = float(o)
        return v if math.isfinite(v) else None
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
