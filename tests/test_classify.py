"""Classifier: few-shot accuracy on synthetic particles, safe save/load, refusals, annotate."""

from __future__ import annotations

import hashlib
import io
import json
import pickle

import numpy as np
import pandas as pd
import pytest

from qcloop.classify import KINDS, Classifier, macro_f1
from qcloop.embed.morphology import MorphologyEmbedder
from qcloop.errors import ModelError
from qcloop.records import ParticleMasks
from qcloop.synth import SynthSpec, generate_image

SIX = ("sphere", "cube", "triangle", "truncated_triangle", "rod", "dumbbell")


@pytest.fixture(scope="module")
def synthetic_embeddings():
    """Morphology embeddings of whole synthetic particles (true masks), 6 classes."""
    spec = SynthSpec(class_mix={c: 1 for c in SIX}, width_px=768, height_px=576, touching_fraction=0.0,
                     overlap_fraction=0.0)
    X, y = [], []
    for seed in (1, 2):
        s = generate_image(spec, seed)
        t = s.truth[~s.truth["touches_border"] & (s.truth["visible_fraction"] > 0.99)]
        n = int(s.labels.max())
        masks = ParticleMasks(labels=s.labels, lobe_labels=s.labels, lobe_parent=np.arange(n + 1, dtype=np.int32),
                              touches_border=np.zeros(n + 1, bool))
        X.append(MorphologyEmbedder()(s.to_sem_image(), masks, pd.DataFrame({"particle_id": t["particle"]})))
        y += list(t["class"])
    return np.vstack(X), np.array(y)


def split(y: np.ndarray, per_class: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tr = np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in sorted(set(y))])
    return tr, np.setdiff1d(np.arange(len(y)), tr)


def test_ten_shots_per_class_separate_six_shapes(synthetic_embeddings):
    X, y = synthetic_embeddings
    tr, te = split(y, 10)
    assert len(te) >= 150
    model = Classifier.fit(X[tr], y[tr])
    labels, proba = model.predict(X[te])
    assert proba.shape == (len(te), 6)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert macro_f1(y[te], labels) >= 0.95
    assert model.training_counts == {c: 10 for c in sorted(SIX)}
    assert model.embedder_spec == "morphology-v1"


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_predicts_identically(kind, synthetic_embeddings, tmp_path):
    X, y = synthetic_embeddings
    tr, te = split(y, 10, seed=1)
    model = Classifier.fit(X[tr], y[tr], kind)
    before = model.predict_proba(X[te])
    path = model.save(tmp_path / "model.json")
    assert path.is_file() and path.with_suffix(".npz").is_file()
    meta = json.loads(path.read_text())
    assert meta["kind"] == kind and meta["classes"] == sorted(SIX)
    assert meta["embedder_spec"] == "morphology-v1"
    assert meta["training_counts"] == {c: 10 for c in sorted(SIX)}
    loaded = Classifier.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(X[te]), before)
    assert list(loaded.predict(X[te])[0]) == list(model.predict(X[te])[0])
    # a real classifier, not a constant
    assert macro_f1(y[te], loaded.predict(X[te])[0]) > 0.8


def test_stored_parameters_reproduce_scikit_learn(synthetic_embeddings):
    """The NumPy inference of logreg / nb / rf equals scikit-learn's own predict_proba."""
    from qcloop.classify import _fit_sklearn

    X, y = synthetic_embeddings
    tr, te = split(y, 10, seed=2)
    for kind in ("logreg", "nb", "rf"):
        model = Classifier.fit(X[tr], y[tr], kind)
        sk = _fit_sklearn(kind, model.params, model._standardise(X[tr]), model.y_train, model.seed)
        np.testing.assert_allclose(model.predict_proba(X[te]), sk.predict_proba(model._standardise(X[te])),
                                   atol=1e-9, err_msg=kind)


def test_grid_search_with_validation_reports_every_kind(synthetic_embeddings, tmp_path):
    X, y = synthetic_embeddings
    tr, rest = split(y, 10, seed=3)
    val = rest[:120]
    model = Classifier.fit(X[tr], y[tr], "auto", validation=(X[val], y[val]))
    vs = model.validation_scores
    assert set(vs["kinds"]) == set(KINDS)
    assert vs["selected"] == model.kind
    assert vs["selected_macro_f1"] == max(v["macro_f1"] for v in vs["kinds"].values())
    assert vs["n_validation"] == 120
    assert set(vs["per_class_f1"]) == set(SIX)
    loaded = Classifier.load(model.save(tmp_path / "m.json"))
    assert loaded.validation_scores == json.loads(json.dumps(vs))
    assert "selected" in loaded.summary()
    with pytest.raises(ModelError, match="validation"):
        Classifier.fit(X[tr], y[tr], "auto")


def test_annotate_marks_low_confidence_unknown(synthetic_embeddings):
    X, y = synthetic_embeddings
    tr, te = split(y, 10)
    model = Classifier.fit(X[tr], y[tr])
    df = pd.DataFrame({"particle_id": np.arange(len(te)) + 1, "ecd_nm": 1.0})
    out = model.annotate(df, X[te], unknown_below=0.0)
    assert list(out.columns) == ["particle_id", "ecd_nm", "class", "class_probability"]
    assert "unknown" not in set(out["class"])
    best = model.predict_proba(X[te]).max(axis=1)
    np.testing.assert_allclose(out["class_probability"], best)
    cut = float(np.median(best))
    out2 = model.annotate(df, X[te], unknown_below=cut)
    assert (out2["class"] == "unknown").sum() == (best < cut).sum() > 0
    assert "class" not in df.columns  # input untouched
    empty = model.annotate(df.iloc[:0], X[:0], 0.5)
    assert len(empty) == 0 and {"class", "class_probability"} <= set(empty.columns)
    with pytest.raises(ModelError, match="embedding rows"):
        model.annotate(df, X[te][:-1], 0.5)
    with pytest.raises(ModelError, match="expects"):
        model.predict(X[te][:, :5])


def test_check_embedder_refuses_another_spec(synthetic_embeddings):
    X, y = synthetic_embeddings
    tr, _ = split(y, 5)
    model = Classifier.fit(X[tr], y[tr], embedder_spec="morphology-v1")
    model.check_embedder("morphology-v1")
    with pytest.raises(ModelError, match="dinov2"):
        model.check_embedder("dinov2-base-crop-masked")


def test_pickle_files_and_object_arrays_are_refused(synthetic_embeddings, tmp_path):
    X, y = synthetic_embeddings
    tr, _ = split(y, 5)
    model = Classifier.fit(X[tr], y[tr])
    # a pickled model under the expected name is never unpickled
    evil = tmp_path / "evil.json"
    evil.write_bytes(pickle.dumps({"kind": "logreg", "model": model}))
    with pytest.raises(ModelError, match="pickle"):
        Classifier.load(evil)
    # an array file holding a pickled object array is refused even with a valid checksum
    path = model.save(tmp_path / "m.json")
    buf = io.BytesIO()
    np.savez(buf, mean=np.array([object()], dtype=object), scale=model.scale)
    blob = buf.getvalue()
    path.with_suffix(".npz").write_bytes(blob)
    meta = json.loads(path.read_text())
    meta["arrays_sha256"] = hashlib.sha256(blob).hexdigest()
    path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="refused"):
        Classifier.load(path)


def test_tampered_missing_and_bad_files(synthetic_embeddings, tmp_path):
    X, y = synthetic_embeddings
    tr, _ = split(y, 5)
    path = Classifier.fit(X[tr], y[tr]).save(tmp_path / "m.json")
    npz = path.with_suffix(".npz")
    data = bytearray(npz.read_bytes())
    data[-30] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum"):
        Classifier.load(path)
    npz.unlink()
    with pytest.raises(ModelError, match="missing"):
        Classifier.load(path)
    with pytest.raises(ModelError, match="not found"):
        Classifier.load(tmp_path / "nope.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ModelError, match="format"):
        Classifier.load(tmp_path / "other.json")


def test_bad_training_input_is_a_clear_error():
    X = np.random.default_rng(0).normal(size=(6, 4))
    with pytest.raises(ModelError, match="two classes"):
        Classifier.fit(X, ["a"] * 6)
    with pytest.raises(ModelError, match="at least 2"):
        Classifier.fit(X, ["a"] * 5 + ["b"])
    with pytest.raises(ModelError, match="does not match"):
        Classifier.fit(X, ["a", "b"] * 2)
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ModelError, match="NaN"):
        Classifier.fit(bad, ["a", "b"] * 3)
    with pytest.raises(ModelError, match="unknown classifier kind"):
        Classifier.fit(X, ["a", "b"] * 3, "xgboost")


def test_two_classes_work():
    rng = np.random.default_rng(1)
    X = np.vstack([rng.normal(0, 1, (10, 3)), rng.normal(3, 1, (10, 3))])
    y = ["a"] * 10 + ["b"] * 10
    for kind in KINDS:
        model = Classifier.fit(X, y, kind)
        labels, proba = model.predict(np.array([[0, 0, 0], [3, 3, 3]], float))
        assert list(labels) == ["a", "b"], kind
        assert proba.shape == (2, 2)
