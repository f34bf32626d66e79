import numpy as np
import pytest
import torch
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score, roc_auc_score

from orchard.config import TrainSpec
from orchard.engine import evaluate, make_task


def _batches(out: torch.Tensor, y: torch.Tensor, size: int = 64):
    return [(out[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


class Identity(torch.nn.Module):
    def forward(self, x):
        return x


def test_binary_metrics_match_scikit_learn_including_roc_auc():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (500,), generator=g)
    logits = (y.float() * 1.2 + torch.randn(500, generator=g)).unsqueeze(1)
    task = make_task({"num_classes": 2, "task": "classification"}, TrainSpec(loss="bce"))
    res = evaluate(Identity(), _batches(logits, y), torch.device("cpu"), task)
    scores = torch.sigmoid(logits.squeeze(1)).numpy()
    assert res.metrics["roc_auc"] == pytest.approx(roc_auc_score(y.numpy(), scores), abs=2e-3)
    assert res.accuracy == pytest.approx(((scores > 0.5) == y.numpy()).mean())
    assert res.confusion.sum() == 500


def test_regression_metrics_match_scikit_learn():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(300, generator=g) * 50 + 150
    pred = (y + torch.randn(300, generator=g) * 20).unsqueeze(1)
    task = make_task({"task": "regression"}, TrainSpec())
    res = evaluate(Identity(), _batches(pred, y), torch.device("cpu"), task)
    p, t = pred.squeeze(1).numpy(), y.numpy()
    assert res.metrics["mae"] == pytest.approx(mean_absolute_error(t, p), rel=1e-5)
    assert res.metrics["rmse"] == pytest.approx(mean_squared_error(t, p) ** 0.5, rel=1e-5)
    assert res.metrics["r2"] == pytest.approx(r2_score(t, p), rel=1e-4)
    assert res.accuracy is None and res.confusion is None


def test_balanced_class_weights_upweight_the_rare_class():
    task = make_task({"num_classes": 3}, TrainSpec(class_weights="balanced"), class_counts=[80, 15, 5])
    w = task.loss_fn.weight
    assert w[2] > w[1] > w[0]
    assert float((w * torch.tensor([80.0, 15, 5])).sum()) == pytest.approx(100.0)


@pytest.mark.parametrize("manifest, loss, match", [
    ({"task": "regression"}, "cross_entropy", "regression"),
    ({"num_classes": 10}, "mse", "classification"),
    ({"num_classes": 10}, "bce", "two classes"),
])
def test_a_loss_that_does_not_fit_the_task_is_refused(manifest, loss, match):
    with pytest.raises(ValueError, match=match):
        make_task(manifest, TrainSpec(loss=loss))


def test_label_smoothing_reaches_the_loss():
    task = make_task({"num_classes": 4}, TrainSpec(label_smoothing=0.1))
    assert task.loss_fn.label_smoothing == pytest.approx(0.1)
    perfect = torch.tensor([[100.0, 0, 0, 0]])
    assert float(task.loss(perfect, torch.tensor([0]))) > 0.05  # smoothing keeps a floor under the loss


def test_roc_auc_of_a_perfect_ranking_is_one():
    from orchard.engine.tasks import roc_auc_from_histograms

    pos = np.zeros(10)
    neg = np.zeros(10)
    pos[8], neg[1] = 5, 5
    assert roc_auc_from_histograms(pos, neg) == 1.0
