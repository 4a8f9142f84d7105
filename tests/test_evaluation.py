import pytest
import torch
from torch import nn

import icprune
from icprune.evaluation import accuracy, labelled_batch, latency


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3))


def test_accuracy_counts_top1_hits_over_all_batches():
    # The model returns its input: the logits are the data, so the hits are known.
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 3.0], [5.0, 4.0, 0.0]])
    targets = torch.tensor([0, 2, 2, 1])
    data = [(logits[:3], targets[:3]), (logits[3:], targets[3:])]
    assert accuracy(nn.Identity(), data) == pytest.approx(2 / 4)
    assert icprune.accuracy(nn.Identity(), [(logits, targets.int())]) == pytest.approx(0.5)


def test_accuracy_runs_in_eval_mode_and_restores_the_model():
    model = bn_net().train()
    model[3].eval()  # a mixed tree survives
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    # In eval mode the result does not depend on how the data is split into batches.
    one = accuracy(model, [(x, y)])
    assert accuracy(model, list(zip(x.split(1), y.split(1), strict=True))) == one
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ([torch.randn(2, 1, 8, 8)], TypeError, "bare Tensor"),
        ([(torch.randn(2, 1, 8, 8), torch.rand(2))], TypeError, "integer class indices"),
        ([(torch.randn(2, 1, 8, 8), torch.tensor(1))], TypeError, "DataLoader"),
        ([(torch.randn(2, 1, 8, 8), torch.zeros(3, dtype=torch.long))], ValueError, "3 targets"),
        ([(torch.randn(2, 1, 8, 8), [0, 1])], TypeError, "must be Tensors"),
        ([], ValueError, "no samples"),
        (5, TypeError, "iterable"),
    ],
)
def test_accuracy_rejects_bad_data(data, error, match):
    with pytest.raises(error, match=match):
        accuracy(bn_net(), data)


def test_accuracy_rejects_a_model_that_does_not_return_logits():
    with pytest.raises(ValueError, match=r"logits Tensor\[N, K\]"):
        accuracy(nn.Flatten(0), [(torch.randn(2, 3), torch.tensor([0, 1]))])


def test_labelled_passes_extra_elements_and_names_the_batch():
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    assert labelled_batch((x, y, "index"), "here") == (x, y)
    with pytest.raises(TypeError, match="^batch 7 is a bare Tensor"):
        labelled_batch(x, "batch 7")


def test_latency_times_every_model_and_restores_modes():
    a, b = bn_net().train(), bn_net().eval()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    result = latency({"a": a, "b": b}, torch.randn(4, 1, 8, 8), rounds=3, warmup=1)
    assert list(result) == ["a", "b"]
    assert all(isinstance(v, float) and v > 0 for v in result.values())
    assert a.training and all(m.training for m in a.modules())
    assert not any(m.training for m in b.modules())
    for k, v in a.state_dict().items():  # no BN statistics updated
        assert torch.equal(v, state[k]), k


def test_latency_counts_forwards_round_robin():
    calls = []

    class Probe(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x, y):
            assert not self.training and torch.is_inference_mode_enabled()
            calls.append(self.name)
            return x + y

    models = {name: Probe(name) for name in "abc"}
    latency(models, (torch.zeros(1), torch.ones(1)), rounds=4, warmup=2)
    warm, timed = calls[:6], calls[6:]
    assert warm == ["a", "a", "b", "b", "c", "c"]
    assert timed == list("abc" + "bca" + "cab" + "abc")  # order rotates every round


@pytest.mark.parametrize(
    ("models", "kwargs", "error", "match"),
    [
        ({}, {}, ValueError, "non-empty"),
        ({"a": "resnet"}, {}, TypeError, "not a Module"),
        ({"a": nn.Identity()}, {"rounds": 0}, ValueError, "rounds"),
        ({"a": nn.Identity()}, {"warmup": -1}, ValueError, "warmup"),
        ({"a": nn.Identity()}, {"rounds": 2.5}, ValueError, "rounds"),
    ],
)
def test_latency_rejects_bad_arguments(models, kwargs, error, match):
    with pytest.raises(error, match=match):
        latency(models, torch.zeros(1), **kwargs)


def test_latency_rejects_inputs_that_are_not_tensors():
    with pytest.raises(TypeError, match="example_inputs"):
        latency({"a": nn.Identity()}, [[1.0]])


@pytest.mark.parametrize("bad", [3, -1, 10])
def test_accuracy_refuses_targets_outside_the_models_classes(bad):
    logits = torch.eye(3)
    good = (logits, torch.tensor([0, 1, 2]))
    wrong = (logits, torch.tensor([0, bad, 2]))
    with pytest.raises(
        ValueError,
        match=rf"accuracy: data batch 1: target {bad} \(sample 1\) is not a class index of the "
        r"model, whose output has 3 classes: targets must lie in \[0, 3\)",
    ):
        accuracy(nn.Identity(), [good, wrong])  # every batch is checked, not only the first


def test_accuracy_refuses_logits_that_are_not_n_by_k():
    with pytest.raises(ValueError, match=r"returned \(3, 2, 2\) for 3 samples in data batch 0"):
        accuracy(nn.Identity(), [(torch.ones(3, 2, 2), torch.tensor([0, 1, 0]))])
