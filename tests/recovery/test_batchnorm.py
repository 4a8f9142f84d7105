import copy

import pytest
import torch
from torch import nn

import icprune
from icprune import recalibrate_bn


def digits():
    """scikit-learn's digits as Tensor[N, 1, 8, 8] in [0, 1] and labels, split 1200 / rest."""
    sklearn = pytest.importorskip("sklearn.datasets")
    d = sklearn.load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0
    y = torch.from_numpy(d.target).long()
    return x[:1200], y[:1200], x[1200:], y[1200:]


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def accuracy(model, x, y):
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    train_x, train_y, test_x, test_y = digits()
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        for idx in torch.randperm(len(train_x)).split(100):
            loss = nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), train_x, test_x, test_y


def test_recalibration_restores_the_accuracy_of_a_model_with_corrupted_statistics(trained):
    model, train_x, test_x, test_y = trained
    before = accuracy(model, test_x, test_y)
    assert before > 0.7
    broken = copy.deepcopy(model)
    for m in broken.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean += 3.0
            m.running_var *= 50.0
    assert accuracy(broken, test_x, test_y) < before - 0.3
    assert recalibrate_bn(broken, list(train_x.split(128)), progress=False) is broken
    assert accuracy(broken, test_x, test_y) >= before - 0.02


def test_recalibration_changes_only_running_statistics(trained):
    model = copy.deepcopy(trained[0])
    model.train()
    model[4].eval()  # a mixed train/eval tree must survive
    model[1].momentum = 0.3
    flags = [m.training for m in model.modules()]
    params = {k: v.clone() for k, v in model.named_parameters()}
    icprune.recalibrate_bn(model, [trained[1][:64]], progress=False)
    assert [m.training for m in model.modules()] == flags
    assert model[1].momentum == 0.3 and model[4].momentum == 0.1
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k
    assert int(model[1].num_batches_tracked) == 1


def test_statistics_are_the_cumulative_average_over_batches_with_dropout_off():
    torch.manual_seed(1)
    linear = nn.Linear(4, 3)
    model = nn.Sequential(linear, nn.Dropout(0.5), nn.BatchNorm1d(3)).train()
    batches = [torch.randn(8, 4), torch.randn(16, 4)]
    recalibrate_bn(model, batches, progress=False)
    with torch.no_grad():
        outs = [linear(b) for b in batches]
    expected_mean = torch.stack([o.mean(0) for o in outs]).mean(0)
    expected_var = torch.stack([o.var(0, unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(model[2].running_mean, expected_mean)
    torch.testing.assert_close(model[2].running_var, expected_var)
    assert model.training


def test_max_batches_and_tuple_batches():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    batches = [(torch.randn(4, 2), torch.zeros(4)) for _ in range(5)]
    recalibrate_bn(model, batches, max_batches=2, progress=False)
    assert int(model[1].num_batches_tracked) == 2


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_bn(nn.Sequential(nn.Linear(2, 2)), [torch.randn(4, 2)])
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(model, [], progress=False)
    with pytest.raises(TypeError, match="iterable"):
        recalibrate_bn(model, 3, progress=False)
    with pytest.raises(ValueError, match="statistics of '1' are not finite"):
        recalibrate_bn(model, [torch.full((4, 2), float("nan"))], progress=False)
    with pytest.raises(ValueError, match="max_batches"):
        recalibrate_bn(model, [torch.randn(4, 2)], max_batches=0, progress=False)
    assert model[1].momentum == 0.1


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        ([torch.randn(4, 2), torch.randn(1, 2)], ValueError, "more than 1 value per channel"),
        ([torch.randn(4, 2), torch.full((4, 2), float("nan"))], ValueError, "not finite.*restored"),
        ([], ValueError, "no batches.*restored"),
        ([torch.randn(4, 2), "not a batch"], TypeError, "data must yield Tensors"),
    ],
    ids=["batch-of-one", "nan", "empty", "bad-batch"],
)
def test_a_failed_recalibration_restores_the_running_statistics(data, error, message):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(2.0)
        model[1].num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        recalibrate_bn(model, data, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_tensor_is_not_taken_for_a_list_of_batches():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.raises(TypeError, match=r"data is one Tensor of shape \(8, 2\); pass an iterable"):
        recalibrate_bn(model, torch.randn(8, 2), progress=False)


def test_little_data_warns_and_enough_does_not():
    from icprune.recovery.batchnorm import MIN_SAMPLES, LittleDataWarning

    model = small_cnn()
    with pytest.warns(LittleDataWarning, match="fewer than 512"):
        recalibrate_bn(model, [torch.randn(8, 1, 8, 8)], progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", LittleDataWarning)
        recalibrate_bn(model, [torch.randn(MIN_SAMPLES, 1, 8, 8)], progress=False)
