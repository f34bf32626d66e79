import math

import pytest
import torch

from orchard.config import EarlyStoppingSpec, ModelSpec, TrainSpec
from orchard.engine import LoopOptions, build_optimizer, build_scheduler, evaluate, train_epoch
from orchard.engine.early_stopping import EarlyStopper
from orchard.models import build_from_dims


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return x, y


def _model(seed=0):
    torch.manual_seed(seed)
    return build_from_dims(ModelSpec(family="mlp", hidden=[32], dropout=0.0), 16, 3, None)


def test_a_few_epochs_learn_a_simple_rule():
    x, y = _data()
    model = _model()
    opt = build_optimizer(model, TrainSpec(lr=0.01))
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    first = train_epoch(model, batches, opt, torch.device("cpu"))
    for _ in range(15):
        last = train_epoch(model, batches, opt, torch.device("cpu"))
    assert last.loss < first.loss / 2
    assert evaluate(model, batches, torch.device("cpu"), 3).accuracy > 0.9


def test_gradient_accumulation_equals_one_big_batch():
    x, y = _data(64)
    a, b = _model(), _model()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    train_epoch(a, [(x, y)], opt_a, torch.device("cpu"))
    quarters = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    train_epoch(b, quarters, opt_b, torch.device("cpu"), options=LoopOptions(grad_accum=4))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_gradient_clipping_bounds_the_step():
    x, y = _data(64)
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_epoch(model, [(x * 1000, y)], opt, torch.device("cpu"), options=LoopOptions(grad_clip=0.01))
    moved = math.sqrt(sum(float((p - q).pow(2).sum()) for p, q in zip(model.parameters(), before, strict=True)))
    assert moved <= 0.01 + 1e-5


@pytest.mark.parametrize("schedule", ["cosine", "step", "onecycle"])
def test_schedules_change_the_learning_rate(schedule):
    model = _model()
    spec = TrainSpec(epochs=4, lr=0.1, schedule=schedule, step_size=1, gamma=0.5, warmup_epochs=0)
    opt = build_optimizer(model, spec)
    sched = build_scheduler(opt, spec, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[-1] < 0.05
    if schedule == "step":
        assert lrs[9] == pytest.approx(0.05) and lrs[19] == pytest.approx(0.025)


def test_warmup_starts_small_and_reaches_the_peak():
    model = _model()
    spec = TrainSpec(epochs=3, lr=0.1, schedule="constant", warmup_epochs=1)
    opt = build_optimizer(model, spec)
    sched = build_scheduler(opt, spec, steps_per_epoch=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    for _ in range(12):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_bf16_autocast_trains_on_cpu():
    x, y = _data(64)
    model = _model()
    opt = build_optimizer(model, TrainSpec(lr=0.01))
    res = train_epoch(model, [(x, y)], opt, torch.device("cpu"), options=LoopOptions(autocast_dtype=torch.bfloat16))
    assert math.isfinite(res.loss)


@pytest.mark.parametrize("metric, values, stop_at, best", [
    ("val/loss", [1.0, 0.8, 0.81, 0.79, 0.85, 0.9], 6, 4),
    ("val/accuracy", [0.5, 0.7, 0.69, 0.7, 0.6, 0.65], 4, 2),
])
def test_early_stopping_waits_patience_epochs_and_keeps_the_best(metric, values, stop_at, best):
    stopper = EarlyStopper(EarlyStoppingSpec(metric=metric, patience=2, min_delta=0.005))
    stopped = None
    for epoch, v in enumerate(values, 1):
        stopper.update({metric: v}, epoch)
        if stopper.should_stop:
            stopped = epoch
            break
    assert stopped == stop_at and stopper.best_epoch == best


def test_early_stopping_on_an_unreported_metric_names_it():
    stopper = EarlyStopper(EarlyStoppingSpec(metric="val/auc"))
    with pytest.raises(KeyError, match="val/auc"):
        stopper.update({"val/loss": 1.0}, 1)


def test_fedprox_term_adds_mu_times_the_distance_to_the_global_weights_to_the_gradient():
    # One plain SGD step (lr=1) from the same weights, with and without the proximal term: the two
    # results differ by exactly lr * grad(mu/2 * ||w - w0||^2) = mu * (w - w0).
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    start = torch.nn.Linear(4, 3)
    anchor = [p.detach() + torch.randn_like(p) for p in start.parameters()]  # w0 != w
    mu = 0.5
    stepped = []
    for m in (0.0, mu):
        model = torch.nn.Linear(4, 3)
        model.load_state_dict(start.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        train_epoch(model, [(x, y)], opt, torch.device("cpu"), proximal_mu=m, global_params=anchor)
        stepped.append([p.detach().clone() for p in model.parameters()])
    for plain, prox, w, w0 in zip(*stepped, start.parameters(), anchor, strict=True):
        assert torch.allclose(plain - prox, mu * (w.detach() - w0), atol=1e-5)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_optimizers_use_the_fused_kernel_and_match_the_reference_step(kind):
    """The fused kernel (CPU and CUDA) takes the same steps as torch's default per-tensor loop."""
    x, y = _data()
    spec = TrainSpec(optimizer=kind, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3)
    ours, ref = _model(), _model()
    opt = build_optimizer(ours, spec)
    assert opt.defaults["fused"] is True
    ref_cls = type(opt)
    kwargs = {k: v for k, v in opt.defaults.items() if k not in ("fused", "foreach", "differentiable", "decoupled_weight_decay")}
    ref_opt = ref_cls(ref.parameters(), **kwargs)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    for _ in range(3):
        train_epoch(ours, batches, opt, torch.device("cpu"))
        train_epoch(ref, batches, ref_opt, torch.device("cpu"))
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), (p - q).abs().max()
