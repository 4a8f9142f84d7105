"""calibrate(): feature-map statistics per prunable layer, model left exactly as it was."""

from __future__ import annotations

import copy
import io
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icprune import files
from icprune.calibrate import calibrate
from icprune.models import resnet20
from icprune.scoring import score
from icprune.stats.channel_stats import ChannelStats
from icprune.structure.graph import prunable_layers

N = 8  # batch size; inputs are N x 3 x 32 x 32
#: resnet20's 1x1 conv + BatchNorm layers with more outputs than inputs: calibrate derives their
#: Gram matrix at the "bn" read point from their input (icprune.input_gram).
DERIVED = ("layer2.0.downsample.0", "layer3.0.downsample.0")


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = resnet20()
    # Non-trivial BN running statistics and affine parameters, so "bn" differs from "output".
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _batches(count: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(N, 3, 32, 32, generator=gen) for _ in range(count)]


def _side(name: str) -> int:
    """Spatial side of a resnet20 layer's output at 32x32 input."""
    return {"layer2": 16, "layer3": 8}.get(name.split(".")[0], 32)


def _expected_point(name: str, read_at: str) -> tuple[str, str, object]:
    """(hooked module, read point, activation) of a resnet20 layer, derived by hand."""
    if read_at == "output":
        return name, "output", None
    bn = name[:-1] + "1" if name.endswith("downsample.0") else name.replace("conv", "bn")
    if read_at == "activation" and (name == "conv1" or name.endswith(".conv1")):
        return bn, "activation", torch.relu
    return bn, "bn", None


def _manual_stats(model, batches, read_at, **kwargs) -> dict[str, ChannelStats]:
    """Statistics from feature maps captured with our own hooks (model in eval mode)."""
    modules = dict(model.named_modules())
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []

    def make_hook(name, activation):
        def hook(_module, _inputs, output):
            out = output.detach().clone()
            captured[name].append(out if activation is None else activation(out))

        return hook

    for name in names:
        module, _, activation = _expected_point(name, read_at)
        handles.append(modules[module].register_forward_hook(make_hook(name, activation)))
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
        for m, training in flags:
            m.training = training
    stats = {}
    for name in names:
        s = ChannelStats(modules[name].out_channels, name=name, **kwargs)
        for feature in captured[name]:
            s.update(feature)
        stats[name] = s
    return stats


def _assert_same_stats(a: ChannelStats, b: ChannelStats, exact_gram: bool = False) -> None:
    assert a.count == b.count
    assert a.nonfinite == b.nonfinite
    assert a.counts.shape == b.counts.shape
    assert torch.equal(a.counts, b.counts)
    assert torch.equal(a.minimum, b.minimum)
    assert torch.equal(a.maximum, b.maximum)
    assert torch.equal(a.bin_exponent, b.bin_exponent)
    assert torch.equal(a.bin_offset, b.bin_offset)
    if exact_gram:
        assert torch.equal(a.gram, b.gram)
        assert torch.equal(a.sums, b.sums)
    elif a.name in DERIVED and a.read_at == "bn":  # from the conv's input: float32 rounding
        torch.testing.assert_close(a.gram, b.gram, rtol=0, atol=1e-6 * float(b.gram.abs().max()))
        torch.testing.assert_close(a.sums, b.sums, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(a.gram, b.gram, rtol=1e-12, atol=0)
        torch.testing.assert_close(a.sums, b.sums, rtol=1e-12, atol=1e-12)


def _no_hooks(model: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 for m in model.modules())


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _model()


@pytest.fixture(scope="module")
def data() -> list[torch.Tensor]:
    return _batches(2)


# ------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("read_at", ["output", "bn", "activation"])
def test_stats_match_manual_capture(model, data, read_at):
    stats = calibrate(model, data, read_at=read_at, progress=False)
    layers = prunable_layers(model)
    assert list(stats) == list(layers)
    assert "fc" not in stats and len(stats) == 21
    expected = _manual_stats(model, data, read_at)
    for name, s in stats.items():
        assert isinstance(s, ChannelStats)
        assert s.name == name
        assert s.num_channels == layers[name].out_channels
        assert s.read_at == _expected_point(name, read_at)[1]
        assert s.count == len(data) * N * _side(name) ** 2
        _assert_same_stats(s, expected[name])


def test_read_points_really_differ(model, data):
    """Guards the test above: output, bn and activation give different statistics."""
    out = calibrate(model, data, read_at="output", layers=["conv1"], progress=False)["conv1"]
    bn = calibrate(model, data, read_at="bn", layers=["conv1"], progress=False)["conv1"]
    act = calibrate(model, data, read_at="activation", layers=["conv1"], progress=False)["conv1"]
    assert not torch.allclose(out.sums, bn.sums)
    assert not torch.allclose(bn.sums, act.sums)
    assert float(act.minimum.min()) == 0.0 and float(bn.minimum.min()) < 0.0


def test_tuples_and_tensors_give_identical_stats(model, data):
    plain = calibrate(model, data, progress=False)
    pairs = calibrate(model, [(x, torch.zeros(N, dtype=torch.long)) for x in data], progress=False)
    lists = calibrate(model, [[x, torch.zeros(N)] for x in data], progress=False)
    for name in plain:
        _assert_same_stats(plain[name], pairs[name], exact_gram=True)
        _assert_same_stats(plain[name], lists[name], exact_gram=True)


def test_list_and_generator_give_identical_stats(model, data):
    from_list = calibrate(model, data, progress=False)
    from_gen = calibrate(model, (x for x in data), progress=False)
    assert list(from_list) == list(from_gen)
    for name in from_list:
        _assert_same_stats(from_list[name], from_gen[name], exact_gram=True)


def test_max_batches_uses_exactly_that_many(model):
    data = _batches(4)
    pulled = []

    def gen():
        for x in data:
            pulled.append(x)
            yield x

    stats = calibrate(model, gen(), max_batches=2, progress=False)
    assert len(pulled) == 2  # the third batch is never drawn
    for name, s in stats.items():
        assert s.count == 2 * N * _side(name) ** 2
    two = calibrate(model, data[:2], progress=False)
    from_list = calibrate(model, data, max_batches=2, progress=False)
    for name in stats:
        _assert_same_stats(stats[name], two[name], exact_gram=True)
        _assert_same_stats(from_list[name], two[name], exact_gram=True)
    # more than available: everything
    all_four = calibrate(model, data, max_batches=10, progress=False)
    assert all_four["conv1"].count == 4 * N * 32 * 32


@pytest.mark.parametrize("bad", [0, -1, "a", 1.5, True])
def test_max_batches_invalid(model, data, bad):
    with pytest.raises(ValueError, match="max_batches"):
        calibrate(model, data, max_batches=bad, progress=False)
    assert _no_hooks(model)


def test_determinism(data):
    first = calibrate(_model(), data, read_at="activation", progress=False)
    second = calibrate(_model(), data, read_at="activation", progress=False)
    for name in first:
        assert torch.equal(first[name].counts, second[name].counts)
        assert torch.equal(first[name].gram, second[name].gram)
        assert torch.equal(first[name].sums, second[name].sums)


def test_layers_subset(model, data):
    stats = calibrate(
        model, data, layers=["layer3.2.conv2", "conv1", "layer2.0.downsample.0"], progress=False
    )
    assert list(stats) == ["conv1", "layer2.0.downsample.0", "layer3.2.conv2"]
    assert stats["layer3.2.conv2"].num_channels == 64
    assert stats["layer3.2.conv2"].count == 2 * N * 8 * 8
    full = calibrate(model, data, progress=False)
    for name in stats:
        _assert_same_stats(stats[name], full[name], exact_gram=True)


def test_options_passed_through(model, data):
    stats = calibrate(model, data, range_mode="channel", bins=16, progress=False)
    for s in stats.values():
        assert s.bins == 16
        assert s.range_mode == "channel"
        assert s.counts.shape == (s.num_channels, 16)
        assert int(s.counts.sum()) == s.count * s.num_channels
        assert s.nan_policy == "raise"
    expected = _manual_stats(model, data, "bn", bins=16, range_mode="channel")
    for name in stats:
        _assert_same_stats(stats[name], expected[name])


def test_untraceable_model_explicit_layers_output_read(data):
    """layers=[...] with read_at='output' needs no trace."""

    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.conv(x)
            if y.sum() > 0:
                y = F.relu(y)
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    net = Untraceable()
    with pytest.raises(ValueError, match=r"torch\.fx"):
        calibrate(net, data, progress=False)
    stats = calibrate(net, data, layers=["conv"], read_at="output", progress=False)
    assert list(stats) == ["conv"] and stats["conv"].count == 2 * N * 32 * 32
    with torch.no_grad():
        manual = ChannelStats(4, name="conv")
        for x in data:
            manual.update(net.conv(x))
    _assert_same_stats(stats["conv"], manual, exact_gram=True)


# --------------------------------------------------------------------- model left unchanged


def _mixed_mode_model() -> nn.Module:
    model = _model().train()
    model.layer1.eval()  # eval subtree inside a training model
    model.layer2[1].bn1.eval()
    model.layer3[0].train()
    return model


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _assert_unchanged(model: nn.Module, state: dict, flags: dict[str, bool]) -> None:
    after = model.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), key
    assert _flags(model) == flags
    assert _no_hooks(model)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert torch.is_grad_enabled()


def _snapshot(model: nn.Module) -> tuple[dict, dict[str, bool]]:
    return copy.deepcopy(model.state_dict()), _flags(model)


@pytest.mark.parametrize("read_at", ["output", "bn", "activation"])
def test_model_unchanged_bit_for_bit(data, read_at):
    model = _mixed_mode_model()
    state, flags = _snapshot(model)
    assert any(flags.values()) and not all(flags.values())  # really mixed
    stats = calibrate(model, data, read_at=read_at, progress=False)
    _assert_unchanged(model, state, flags)
    # calibration ran in eval mode: same statistics as a model in eval mode
    expected = _manual_stats(model, data, read_at)
    for name in stats:
        _assert_same_stats(stats[name], expected[name])
    _assert_unchanged(model, state, flags)


def test_exception_from_data_restores_model(data):
    model = _mixed_mode_model()
    state, flags = _snapshot(model)

    def gen():
        yield data[0]
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        calibrate(model, gen(), progress=False)
    _assert_unchanged(model, state, flags)


@pytest.mark.parametrize("read_at", ["output", "bn", "activation"])
def test_nan_raise_names_layer_and_restores_model(data, read_at):
    model = _mixed_mode_model()
    state, flags = _snapshot(model)
    bad = data[1].clone()
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="layer 'conv1'") as info:
        calibrate(model, [data[0], bad], read_at=read_at, progress=False)
    assert "non-finite" in str(info.value)
    _assert_unchanged(model, state, flags)


def test_nan_zero_completes_and_counts(model, data):
    bad = data[1].clone()
    bad[0, 0, 3, 3] = float("nan")
    stats = calibrate(model, [data[0], bad], nan_policy="zero", progress=False)
    for name, s in stats.items():
        assert s.nan_policy == "zero"
        assert s.nonfinite > 0, name
        assert s.count == 2 * N * _side(name) ** 2
        assert torch.isfinite(s.gram).all() and torch.isfinite(s.sums).all()
    assert _no_hooks(model)


# ------------------------------------------------------------------------------ bad inputs


def test_empty_data(model):
    with pytest.raises(ValueError, match="no batches"):
        calibrate(model, [], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        calibrate(model, iter(()), progress=False)
    assert _no_hooks(model)


@pytest.mark.parametrize("bad", [3, None, 2.5])
def test_data_not_iterable(model, bad):
    with pytest.raises(TypeError):
        calibrate(model, bad, progress=False)
    assert _no_hooks(model)


@pytest.mark.parametrize(
    "batch",
    [
        {"image": torch.zeros(N, 3, 32, 32)},
        "images",
        (),
        ("not a tensor", torch.zeros(N)),
        [[torch.zeros(N, 3, 32, 32)]],
        3,
    ],
    ids=["dict", "str", "empty_tuple", "tuple_str", "nested_list", "int"],
)
def test_batch_of_wrong_type(model, batch):
    flags = _flags(model)
    with pytest.raises(TypeError):
        calibrate(model, [batch], progress=False)
    assert _no_hooks(model)
    assert _flags(model) == flags


def test_data_is_a_string(model):
    with pytest.raises(TypeError):
        calibrate(model, "abc", progress=False)


# --------------------------------------------------------------------------------- devices


def test_device_cpu(model, data):
    on_cpu = calibrate(model, data, device="cpu", progress=False)
    default = calibrate(model, data, progress=False)
    for name in default:
        assert on_cpu[name].device == torch.device("cpu")
        _assert_same_stats(on_cpu[name], default[name], exact_gram=True)
    cpu_dev = calibrate(model, data, device=torch.device("cpu"), progress=False)
    assert cpu_dev["conv1"].count == default["conv1"].count


@pytest.mark.parametrize("device", ["meta", torch.device("meta"), "cuda"])
def test_device_type_mismatch_tells_to_move_model(model, data, device):
    with pytest.raises(ValueError, match="move the model") as info:
        calibrate(model, data, device=device, progress=False)
    assert "cpu" in str(info.value)
    assert _no_hooks(model)
    assert next(model.parameters()).device.type == "cpu"


# -------------------------------------------------------------------------------- progress


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_false_prints_nothing(model, data, capsys):
    calibrate(model, data, progress=False)
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out == ""


def test_progress_false_silent_even_on_a_terminal(model, data, monkeypatch):
    terminal = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    calibrate(model, data, progress=False)
    assert terminal.getvalue() == ""
    calibrate(model, data, progress=True)  # the fake terminal does show a bar
    assert "calibrate" in terminal.getvalue()


# ---------------------------------------------------------------------- resumable calibration


def _assert_identical_stats(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        for key, value in sa.items():
            same = (
                torch.equal(value, sb[key]) if isinstance(value, torch.Tensor) else value == sb[key]
            )
            assert same, (name, key)


def _interrupted(data, after: int):
    """Yields the first ``after`` batches of ``data``, then fails like a dying data loader."""
    yield from data[:after]
    raise RuntimeError("loader died")


def test_interrupted_run_resumes_to_identical_stats_and_scores(model, tmp_path):
    data = _batches(5)
    path = tmp_path / "calib.pt"
    whole = calibrate(model, data, progress=False)
    with pytest.raises(RuntimeError, match="loader died"):
        calibrate(model, _interrupted(data, 3), checkpoint=path, checkpoint_every=2, progress=False)
    state = torch.load(path, weights_only=True)
    assert state["batches"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.pt"]  # no temporary, no lock
    forwards = []
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        resumed = calibrate(model, data, checkpoint=path, checkpoint_every=2, progress=False)
        assert len(forwards) == 3  # batches 3, 4, 5 only
        _assert_identical_stats(resumed, whole)
        scores = [score(model, stats=s) for s in (resumed, whole)]
        for name in scores[0]:
            assert torch.equal(scores[0][name].score, scores[1][name].score)
        assert torch.load(path, weights_only=True)["batches"] == 5  # kept, final statistics
        again = calibrate(model, data, checkpoint=path, progress=False)
        assert len(forwards) == 3  # a rerun after success runs no batch
        _assert_identical_stats(again, whole)
    finally:
        handle.remove()


def test_checkpoint_refuses_other_settings_model_and_data(model, tmp_path):
    data = _batches(3)
    path = tmp_path / "calib.pt"
    calibrate(model, data, checkpoint=path, checkpoint_every=1, progress=False)
    with pytest.raises(ValueError, match=r"bins differ.*delete the file"):
        calibrate(model, data, checkpoint=path, bins=32, progress=False)
    with pytest.raises(ValueError, match="read_at differ"):
        calibrate(model, data, checkpoint=path, read_at="output", progress=False)
    with pytest.raises(ValueError, match=r"layers \(first: .layer1.0.conv1.\) differ"):
        calibrate(model, data, checkpoint=path, layers=["conv1"], progress=False)
    other = _model()
    with torch.no_grad():
        other.conv1.weight.mul_(2)
    with pytest.raises(ValueError, match="model's parameters or buffers differ"):
        calibrate(other, data, checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="same batches in the same order"):
        calibrate(model, data[::-1], checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="yielded only 2"):
        calibrate(model, data[:2], checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="more than max_batches=2"):
        calibrate(model, data, checkpoint=path, max_batches=2, progress=False)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        calibrate(model, data, checkpoint=tmp_path / "junk.pt", progress=False)
    assert _no_hooks(model)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_checkpoint_every_must_be_a_positive_int(model, data, bad, tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 1"):
        calibrate(model, data, checkpoint=tmp_path / "c.pt", checkpoint_every=bad, progress=False)
    assert not (tmp_path / "c.pt").exists()


def test_progress_bar_counts_resumed_batches(model, tmp_path, monkeypatch):
    data = _batches(4)
    path = tmp_path / "calib.pt"
    with pytest.raises(RuntimeError):
        calibrate(model, _interrupted(data, 2), checkpoint=path, checkpoint_every=1, progress=False)
    terminal = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    calibrate(model, data, checkpoint=path, progress=True)
    frames = terminal.getvalue().split("\r")
    first = next(f for f in frames if "calibrate" in f)
    assert "2/4" in first and "4/4" in frames[-1]


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def _tamper_checkpoint(path, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def _negative_counts(state):
    counts = state["stats"]["conv1"]["counts"]
    counts[0, counts[0].argmax()] *= -1


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update(extra=_Payload()), "holds Python objects icprune does not load"),
        (_negative_counts, r"calib.pt': layer 'conv1': saved statistics: 'counts' holds negative"),
        (
            lambda s: s["stats"].pop("layer2.0.conv1"),
            "holds no statistics for layer 'layer2.0.conv1'",
        ),
        (lambda s: s["stats"]["conv1"].update(nan_policy="explode"), "nan_policy 'explode'"),
        (lambda s: s.pop("batches"), r"lacks the key\(s\) \['batches'\]"),
        (lambda s: s.update(batches=-1), "bad 'batches', 'settings' or 'data'"),
        (lambda s: s.update(stats=[]), "'stats' must be a dict"),
    ],
)
def test_tampered_checkpoints_are_refused_clearly(model, tmp_path, capsys, edit, message):
    data = _batches(2)
    path = tmp_path / "calib.pt"
    calibrate(model, data, checkpoint=path, progress=False)
    _tamper_checkpoint(path, edit)
    with pytest.raises(ValueError, match=message) as info:
        calibrate(model, data, checkpoint=path, progress=False)
    assert "weights_only" not in str(info.value) and "delete it" in str(info.value)
    assert "must never run" not in capsys.readouterr().out
    assert _no_hooks(model)


def test_an_interrupted_checkpoint_write_keeps_the_previous_checkpoint(
    model, tmp_path, monkeypatch
):
    data = _batches(3)
    path = tmp_path / "calib.pt"
    calibrate(model, data[:1], checkpoint=path, progress=False)
    save = torch.save

    def dying(obj, handle):
        save(obj, handle)
        raise KeyboardInterrupt  # e.g. Ctrl-C just before the rename

    monkeypatch.setattr(torch, "save", dying)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, data, checkpoint=path, checkpoint_every=1, progress=False)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["batches"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.pt"]  # no temporary, no lock


@pytest.mark.skipif(files.fcntl is None, reason="no advisory locks on this platform")
def test_a_second_calibration_into_the_same_checkpoint_is_refused(model, tmp_path):
    path = tmp_path / "calib.pt"
    with (  # another process calibrating into it holds the lock
        files.exclusive(path, "calibration checkpoint"),
        pytest.raises(RuntimeError, match="another process is writing calibration checkpoint"),
    ):
        calibrate(model, _batches(1), checkpoint=path, progress=False)
    assert not path.exists() and _no_hooks(model)


def test_a_single_tensor_is_not_taken_for_a_list_of_batches(model):
    x = torch.randn(N, 3, 32, 32)
    with pytest.raises(
        TypeError,
        match=r"data is one Tensor of shape \(8, 3, 32, 32\); pass an "
        r"iterable of batches, e.g. \[x\]",
    ):
        calibrate(model, x, progress=False)


def test_only_empty_batches_are_refused(model):
    with pytest.raises(ValueError, match="data yielded only empty batches"):
        calibrate(model, [torch.randn(0, 3, 32, 32)] * 2, progress=False)
    assert _no_hooks(model)


def test_a_checkpoint_in_a_missing_folder_is_refused_before_any_work(model, tmp_path):
    forwards = []
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        with pytest.raises(
            FileNotFoundError,
            match=r"checkpoint '.*c.pt': the folder .* does "
            r"not exist",
        ):
            calibrate(model, _batches(1), checkpoint=tmp_path / "no" / "c.pt", progress=False)
    finally:
        handle.remove()
    assert forwards == []


# ------------------------------------------------------------- linear layers over tokens


#: The activation right after each linear layer of TokenMLP and ConvNeXtNet (others: none).
ACTIVATIONS = {"fc1": F.gelu, "fc3": torch.relu} | {f"block{i}.fc1": F.gelu for i in (1, 2, 3)}


@pytest.mark.parametrize("read_at", ["output", "activation"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_linear_over_tokens_and_channels_last_maps_counts_every_position(read_at, backend):
    from tests.structure.nets import ConvNeXtNet, TokenMLP

    if backend == "cpp" and not __import__("icprune").build_info()["extension"]:
        pytest.skip("needs the compiled extension")
    torch.manual_seed(0)
    for model, shape in ((TokenMLP().eval(), (2, 5, 6)), (ConvNeXtNet().eval(), (2, 3, 16, 16))):
        batches = [torch.randn(shape) for _ in range(2)]
        stats = calibrate(model, batches, read_at=read_at, progress=False, backend=backend)
        modules = dict(model.named_modules())
        captured = {name: [] for name, m in modules.items() if isinstance(m, nn.Linear)}
        hooks = []
        for name in captured:

            def hook(_m, _a, out, seen=captured[name], name=name):
                seen.append(ACTIVATIONS.get(name, torch.clone)(out) if read_at != "output" else out)

            hooks.append(modules[name].register_forward_hook(hook))
        with torch.no_grad():
            for x in batches:
                model(x)
        for h in hooks:
            h.remove()
        for name, outs in captured.items():
            if name not in stats:
                continue  # the classifier
            want = ChannelStats(modules[name].out_features, name=name, backend=backend)
            for out in outs:  # every leading position is a sample: [M, C] rows
                want.update(out.reshape(-1, out.shape[-1]))
            assert stats[name].count == sum(o.numel() // o.shape[-1] for o in outs)
            _assert_same_stats(stats[name], want, exact_gram=backend == "torch")
