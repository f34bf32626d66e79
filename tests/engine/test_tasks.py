import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score, roc_auc_score

from orchard.config import TrainSpec
from orchard.engine import evaluate, make_task
from orchard.engine.tasks import roc_auc
from tests.net import free_port


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
    assert res.metrics["roc_auc"] == pytest.approx(roc_auc_score(y.numpy(), scores), abs=1e-12)
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


def test_roc_auc_of_a_perfect_ranking_is_one_and_of_all_ties_is_one_half():
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert roc_auc(np.full(6, 0.5), np.array([0, 1, 0, 1, 1, 0])) == 0.5
    assert np.isnan(roc_auc(np.array([0.1, 0.9]), np.array([1, 1])))  # one class: undefined


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_is_exact_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 2000)
    # One decimal: hundreds of rows share each score, and scores 1e-9 apart must not share a bin.
    scores = np.round(rng.normal(y * 0.7, 1.0), 1) + rng.choice([0.0, 1e-9], 2000)
    assert roc_auc(scores, y) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def _weighted_problem(n=1000, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.multinomial(torch.tensor([0.7, 0.2, 0.07, 0.03]), n, replacement=True, generator=g)
    torch.manual_seed(seed)
    return torch.nn.Linear(6, k), x, y


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_class_weighted_eval_loss_is_the_weighted_mean_over_the_split_at_any_batch_size(smoothing):
    model, x, y = _weighted_problem()
    spec = TrainSpec(class_weights="balanced", label_smoothing=smoothing)
    task = make_task({"num_classes": 4}, spec, class_counts=torch.bincount(y, minlength=4).tolist())
    w = task.loss_fn.weight
    with torch.no_grad():
        one_shot = float(F.cross_entropy(model(x), y, weight=w, label_smoothing=smoothing))
    losses = [evaluate(model, _batches(x, y, size), torch.device("cpu"), task).loss for size in (7, 64, 1000)]
    for loss in losses:
        assert loss == pytest.approx(one_shot, rel=1e-6)
    # The old per-batch mean, averaged by rows, is off by far more than that at batch size 7.
    with torch.no_grad():
        per_batch = sum(float(task.loss(model(a), b)) * len(b) for a, b in _batches(x, y, 7)) / len(y)
    assert abs(per_batch - one_shot) > 1e-3 * one_shot


def test_bce_with_pos_weight_eval_loss_does_not_depend_on_batch_size():
    g = torch.Generator().manual_seed(3)
    y = (torch.rand(500, generator=g) < 0.2).long()
    logits = (y.float() + torch.randn(500, generator=g)).unsqueeze(1)
    task = make_task({"num_classes": 2}, TrainSpec(loss="bce", class_weights=[1.0, 4.0]))
    one_shot = float(task.loss(logits, y))
    for size in (7, 64, 1000):
        assert evaluate(Identity(), _batches(logits, y, size), torch.device("cpu"), task).loss == pytest.approx(
            one_shot, rel=1e-6)


@pytest.mark.parametrize("loss", ["bce", "cross_entropy"])
def test_binary_roc_auc_is_exact_at_any_batch_size(loss):
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 2, (1000,), generator=g)
    z = torch.round((y.float() * 0.8 + torch.randn(1000, generator=g)) * 4) / 4  # quarter steps: many ties
    out = z.unsqueeze(1) if loss == "bce" else torch.stack([-z / 2, z / 2], 1)
    task = make_task({"num_classes": 2}, TrainSpec(loss=loss))
    expected = roc_auc_score(y.numpy(), task.positive_score(out).numpy())
    for size in (7, 64, 1000):
        res = evaluate(Identity(), _batches(out, y, size), torch.device("cpu"), task)
        assert res.metrics["roc_auc"] == pytest.approx(expected, abs=1e-12)


def _rank_evaluate(rank: int, world: int, port: int, out: torch.Tensor, y: torch.Tensor, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        task = make_task({"num_classes": 2}, TrainSpec(loss="cross_entropy", class_weights=[1.0, 3.0]))
        # Uneven shards, batches of 7 kept round-robin, as a rank slice of the val split does.
        mine = [b for i, b in enumerate(_batches(out, y, 7)) if i % world == rank]
        res = evaluate(Identity(), mine, torch.device("cpu"), task)
        results[rank] = (res.loss, res.metrics["roc_auc"], res.samples)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # three spawned processes: ~10 s on an idle 2-core machine, over a minute on a busy one
def test_ranks_reduce_to_the_single_process_loss_and_roc_auc():
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 2, (403,), generator=g)
    z = torch.round((y.float() + torch.randn(403, generator=g)) * 4) / 4
    out = torch.stack([-z, z], 1)
    task = make_task({"num_classes": 2}, TrainSpec(loss="cross_entropy", class_weights=[1.0, 3.0]))
    single = evaluate(Identity(), _batches(out, y, 1000), torch.device("cpu"), task)
    world = 3
    # The Manager's server process is started, not forked: a pytest worker that has run Ray/Spark tests has
    # many threads, and a fork copies whatever locks they held (a CI run hung here for 15 min).
    with mp.get_context("spawn").Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_evaluate, args=(world, free_port(), out, y, results), nprocs=world, join=True)
        results = dict(results)
    for rank in range(world):
        loss_r, auc_r, n_r = results[rank]
        assert n_r == 403
        assert loss_r == pytest.approx(single.loss, rel=1e-12)
        assert auc_r == pytest.approx(single.metrics["roc_auc"], abs=1e-12)
