import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import icprune
from icprune.evaluation import accuracy
from icprune.recovery.finetune import cosine_factor, distillation_loss, finetune


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits (8x8, real images): shuffled training batches of 64 from the
    first 1200 images, test batches of the other 597."""
    sklearn = pytest.importorskip("sklearn.datasets")
    d = sklearn.load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0
    y = torch.from_numpy(d.target).long()
    order = torch.randperm(1200, generator=torch.Generator().manual_seed(0))
    train = list(zip(x[order].split(64), y[order].split(64), strict=True))
    test = list(zip(x[1200:].split(300), y[1200:].split(300), strict=True))
    return train, test


@pytest.fixture(scope="module")
def trained(digits):
    """A small CNN fine-tuned from its random initialisation (accuracy before, model)."""
    train, test = digits
    torch.manual_seed(0)
    model = small_cnn()
    before = accuracy(model, test)
    return before, finetune(model, train, 4, lr=0.05, progress=False)


def test_finetune_trains_a_small_cnn_on_real_digits(digits, trained):
    before, model = trained
    assert before < 0.3  # chance is 0.1
    assert accuracy(model, digits[1]) > 0.9
    assert not any(m.training for m in model.modules())  # returned in eval mode


def test_distillation_recovers_a_pruned_model_and_leaves_the_teacher_alone(digits, trained):
    train, test = digits
    teacher = trained[1]
    teacher.train()
    teacher[4].eval()  # the teacher's mixed flags must survive
    flags = [m.training for m in teacher.modules()]
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    example = train[0][0][:1]
    pruned = icprune.prune(teacher, example_inputs=example, flops_reduction=0.8).model
    icprune.recalibrate_bn(pruned, train, progress=False)
    base = accuracy(pruned, test)
    torch.manual_seed(0)
    tuned = finetune(pruned, train, 2, teacher=teacher, distill_weight=0.7, progress=False)
    assert accuracy(tuned, test) > max(base + 0.1, 0.8)
    assert [m.training for m in teacher.modules()] == flags
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, state[k]), k
    teacher.eval()


def test_inplace_false_leaves_the_model_bit_identical(digits):
    torch.manual_seed(1)
    model = small_cnn().train()
    state = copy.deepcopy(model.state_dict())
    out = finetune(model, digits[0][:3], 1, progress=False)
    assert out is not model
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, state[k]) for k, v in out.state_dict().items())


def test_inplace_true_trains_the_model_itself(digits):
    torch.manual_seed(1)
    model = small_cnn()
    weight = model[0].weight.detach().clone()
    assert finetune(model, digits[0][:3], 1, progress=False, inplace=True) is model
    assert not model.training and not torch.equal(model[0].weight, weight)


def test_zero_epochs_returns_an_unchanged_copy_in_eval_mode(digits):
    model = small_cnn().train()
    out = finetune(model, digits[0], 0, progress=False)
    assert out is not model and not out.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in out.state_dict().items())


def test_finetune_is_deterministic_given_the_seed(digits):
    x = torch.cat([b[0] for b in digits[0][:4]])
    y = torch.cat([b[1] for b in digits[0][:4]])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True
    )
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = small_cnn()
        teacher = small_cnn().eval()
        runs.append(finetune(model, loader, 2, teacher=teacher, progress=True).state_dict())
    for k, v in runs[0].items():
        assert torch.equal(v, runs[1][k]), k


def test_a_one_shot_iterator_is_allowed_for_one_epoch(digits):
    torch.manual_seed(0)
    model = small_cnn()
    out = finetune(model, iter(digits[0][:2]), 1, progress=False)
    assert not torch.equal(out[0].weight, model[0].weight)


def test_an_unsized_iterable_is_counted(digits):
    class Batches:
        def __iter__(self):
            return iter(digits[0][:2])

    torch.manual_seed(0)
    model = small_cnn()
    torch.manual_seed(0)
    sized = finetune(model, digits[0][:2], 2, progress=False)
    unsized = finetune(model, Batches(), 2, progress=False)
    assert torch.equal(sized[0].weight, unsized[0].weight)


def test_distillation_loss_matches_its_definition():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    ce = F.cross_entropy(s, y)
    assert torch.equal(distillation_loss(s, y), ce)
    assert torch.equal(distillation_loss(s, y, t, distill_weight=0.0), ce)
    p_t, p_s = F.softmax(t / 2, 1), F.softmax(s / 2, 1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    expected = 0.25 * ce + 0.75 * 4 * kl
    got = distillation_loss(s, y, t, temperature=2.0, distill_weight=0.75)
    assert torch.allclose(got, expected, rtol=1e-5)
    # A student equal to its teacher pays no distillation cost.
    assert distillation_loss(s, y, s, distill_weight=1.0).abs() < 1e-6


@given(st.integers(1, 10_000), st.integers(0, 10_000))
def test_cosine_factor_decays_from_one_to_zero(total, step):
    assert cosine_factor(0, total) == 1.0
    assert cosine_factor(total, total) == pytest.approx(0.0, abs=1e-15)
    f = cosine_factor(step, total)
    assert 0.0 <= f <= 1.0
    assert cosine_factor(step + 1, total) <= f
    assert f == pytest.approx(0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


def test_a_diverging_run_names_the_step_and_suggests_a_lower_lr(digits):
    torch.manual_seed(0)
    model = small_cnn()
    with pytest.raises(
        ValueError,
        match=r"loss is (nan|inf) at train_data batch \d+ of epoch 1.*"
        r"lower lr",
    ):
        finetune(model, digits[0], 1, lr=1e12, progress=False)
    bad = [(torch.full((4, 1, 8, 8), math.nan), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match="batch 1 of epoch 1"):
        finetune(model, bad, 1, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": -1}, "epochs"),
        ({"epochs": 1.5}, "epochs"),
        ({"epochs": True}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"temperature": 0}, "temperature"),
        ({"distill_weight": 1.5}, "distill_weight"),
        ({"distill_weight": "0.5"}, "distill_weight"),
    ],
)
def test_bad_numbers_are_rejected(digits, kwargs, match):
    kwargs = {"epochs": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        finetune(small_cnn(), digits[0][:1], kwargs.pop("epochs"), progress=False, **kwargs)


@pytest.mark.parametrize(
    ("data", "epochs", "error", "match"),
    [
        (torch.randn(8, 1, 8, 8), 1, TypeError, "is a Tensor"),
        (iter([]), 2, TypeError, "one-shot iterator"),
        ((b for b in []), 3, TypeError, "epochs=3"),
        (5, 1, TypeError, "iterable"),
        ([torch.randn(8, 1, 8, 8)], 1, TypeError, "bare Tensor"),
        ([(torch.randn(8, 1, 8, 8), torch.rand(8))], 1, TypeError, "integer class indices"),
        ([], 1, ValueError, "no batches"),
    ],
)
def test_bad_training_data_is_rejected(data, epochs, error, match):
    with pytest.raises(error, match=match):
        finetune(small_cnn(), data, epochs, progress=False)


def test_bad_models_and_teachers_are_rejected(digits):
    model, data = small_cnn(), digits[0][:1]
    with pytest.raises(ValueError, match="teacher is the model being trained in place"):
        finetune(model, data, 1, teacher=model, inplace=True)
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        finetune(model, data, 1, teacher="resnet18")
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match=r"teacher returned \(64, 3\) but the model \(64, 10\)"):
        finetune(model, data, 1, teacher=wrong, progress=False)
    with pytest.raises(ValueError, match=r"must return logits Tensor\[N, K\]"):
        finetune(nn.Sequential(nn.Conv2d(1, 2, 3)), data, 1, progress=False)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        finetune(model.state_dict(), data, 1)
    with pytest.raises(ValueError, match="move the model first"):
        finetune(model, data, 1, device="meta")
    with pytest.raises(ValueError, match="move the model first"):
        finetune(model, data, 1, teacher=small_cnn().to("meta"))
    frozen = small_cnn().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        finetune(frozen, data, 1, progress=False)


def test_targets_outside_the_classes_are_refused_before_any_training(digits):
    train, _ = digits
    torch.manual_seed(0)
    model = small_cnn()
    state = copy.deepcopy(model.state_dict())
    x, y = train[0]
    bad = [(x, y + 1), *train[1:]]  # 1-based labels: the 9s become 10 for 10 classes
    with pytest.raises(
        ValueError,
        match=r"finetune: train_data batch 1 of epoch 1: target 10 \(sample \d+\) is not a class "
        r"index of the model, whose output has 10 classes",
    ):
        finetune(model, bad, 1, progress=False, inplace=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # no step taken
