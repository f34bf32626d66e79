import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from orchard.engine.metrics import classification_metrics, confusion_matrix


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, 300)
    p = np.where(rng.random(300) < 0.7, y, rng.integers(0, 5, 300))
    m = classification_metrics(confusion_matrix(y, p, 5))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    for avg in ("macro", "weighted"):
        suffix = "" if avg == "macro" else "_weighted"
        assert m["precision" + suffix] == pytest.approx(precision_score(y, p, average=avg, zero_division=0))
        assert m["recall" + suffix] == pytest.approx(recall_score(y, p, average=avg, zero_division=0))
        assert m["f1" + suffix] == pytest.approx(f1_score(y, p, average=avg, zero_division=0))


def test_confusion_rows_are_true_classes():
    cm = confusion_matrix(np.array([0, 0, 1]), np.array([1, 0, 1]), 2)
    assert cm.tolist() == [[1, 1], [0, 1]]
