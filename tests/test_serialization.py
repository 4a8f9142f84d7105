"""serialization: save/load round trip is bit-identical; pruned zoo models export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import icprune
from icprune.models import mobilenet_v2, resnet20, resnet56
from tests.structure.nets import ConvNeXtNet, ResNeXtNet, SENet


def _pruned(factory, size: int, **target) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(2, 3, size, size)
    scores = {
        n: m.weight.detach().flatten(1).abs().sum(1)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    chosen = icprune.plan(model, scores, example_inputs=x[:1], **target)
    return icprune.apply(model, chosen), x


def _assert_same_model(pruned, loaded, x):
    """Same state_dict keys, dtypes and values, same output on x, same MACs and parameters."""
    for (k, a), (k2, b) in zip(
        pruned.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(pruned(x), loaded(x))
    assert icprune.count(loaded, x) == icprune.count(pruned, x)


@pytest.mark.parametrize(
    ("factory", "size", "target"),
    [
        (resnet56, 32, {"flops_reduction": 0.5, "round_to": 4}),
        (mobilenet_v2, 32, {"flops_reduction": 0.5, "round_to": 4}),
        (SENet, 8, {"ratio": 0.4}),
        (ConvNeXtNet, 16, {"ratio": 0.4}),
        (ResNeXtNet, 8, {"ratio": 0.4}),
    ],
    ids=["resnet56", "mobilenet_v2", "squeeze-excitation", "convnext-layernorms", "grouped"],
)
def test_round_trip_is_bit_identical(tmp_path, factory, size, target):
    pruned, x = _pruned(factory, size, **target)
    path = tmp_path / "pruned.pt"
    icprune.save(pruned, path)
    loaded = icprune.load(path, factory).eval()
    _assert_same_model(pruned, loaded, x)


def test_load_refuses_other_files_and_architectures(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a model saved by icprune.save"):
        icprune.load(path, resnet20)
    pruned, _ = _pruned(resnet20, 32, ratio=0.3)
    icprune.save(pruned, path)
    with pytest.raises(ValueError, match="model_fn"):
        icprune.load(path, mobilenet_v2)


@pytest.mark.parametrize(
    ("factory", "size"), [(resnet20, 32), (mobilenet_v2, 32)], ids=["resnet20", "mobilenet_v2"]
)
def test_torch_export_of_pruned_models(factory, size):
    pruned, x = _pruned(factory, size, flops_reduction=0.4, round_to=8)
    exported = torch.export.export(pruned.eval(), (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), pruned(x))


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def _saved(tmp_path) -> tuple[dict, object]:
    pruned, _ = _pruned(resnet20, 32, ratio=0.3)
    path = tmp_path / "model.pt"
    icprune.save(pruned, path)
    return torch.load(path, weights_only=True), path


def test_load_refuses_pickled_objects_without_inviting_weights_only_false(tmp_path, capsys):
    data, path = _saved(tmp_path)
    torch.save({**data, "extra": _Payload()}, path)
    with pytest.raises(ValueError, match="holds Python objects icprune does not load") as info:
        icprune.load(path, resnet20)
    assert "weights_only" not in str(info.value)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("state_dict"), r"lacks the key\(s\) \['state_dict'\]"),
        (lambda d: d.pop("channels"), r"lacks the key\(s\) \['channels'\]"),
        (lambda d: d["channels"].update(conv1=[-1, 3, 1]), r"'channels' must map module names"),
        (
            lambda d: d["channels"].update(conv1=[10, 3, 1]),
            r"'conv1.weight' has shape \(\d+, 3, "
            r"3, 3\), but the stored channels of 'conv1' \(out=10, in=3, groups=1\) make it "
            r"\(10, 3, 3, 3\)",
        ),
        (lambda d: d["channels"].update(fc=[10, 7, 1]), r"'fc.weight' has shape"),
        (lambda d: d["channels"].update(conv1=[16, 3, 2]), "groups must divide both"),
        (lambda d: d["state_dict"].update({"conv1.weight": [1.0]}), "must map names to tensors"),
        (lambda d: d.update(version=9), "format version 9, this icprune reads 1"),
    ],
)
def test_load_validates_the_file_before_building_the_model(tmp_path, edit, message):
    data, path = _saved(tmp_path)
    edit(data)
    torch.save(data, path)
    with pytest.raises(ValueError, match=message):
        icprune.load(path, resnet20)


@pytest.mark.parametrize("size", [0, 100], ids=["empty", "truncated"])
def test_load_names_empty_and_truncated_files(tmp_path, size):
    _, path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:size])
    with pytest.raises(ValueError, match=r"pruned model file '.*model.pt' cannot be read"):
        icprune.load(path, resnet20)


def test_an_interrupted_save_keeps_the_earlier_file(tmp_path, monkeypatch):
    _, path = _saved(tmp_path)
    before = path.read_bytes()

    def dying(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying)
    with pytest.raises(KeyboardInterrupt):
        icprune.save(resnet20(), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.pt"
    ]


def test_save_names_a_missing_folder_or_a_folder_path(tmp_path):
    model = resnet20()
    with pytest.raises(FileNotFoundError, match=r"the folder '.*missing' does not exist"):
        icprune.save(model, tmp_path / "missing" / "model.pt")
    with pytest.raises(IsADirectoryError, match="is a folder; pass a file path"):
        icprune.save(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_load_checks_model_fn(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(TypeError, match="model_fn must build the unpruned model"):
        icprune.load(path, resnet20())  # the model, not its factory
    with pytest.raises(TypeError, match=r"model_fn\(\) returned a NoneType"):
        icprune.load(path, lambda: None)


@pytest.mark.parametrize("name", ["ViTNet", "SwinNet"])
def test_round_trip_of_pruned_attention_heads(tmp_path, name):
    from icprune.attention import PrunedMultiheadAttention, PrunedWindowAttention
    from tests.structure import nets

    torch.manual_seed(0)
    factory = getattr(nets, name)
    model = factory().eval()
    x = torch.randn(2, 3, 16, 16) if name == "ViTNet" else torch.randn(2, 3, 24, 24)
    pruned = icprune.prune(model, example_inputs=x[:1], ratio=0.4).model
    kind = PrunedMultiheadAttention if name == "ViTNet" else PrunedWindowAttention
    heads = [m.num_heads for m in pruned.modules() if isinstance(m, kind)]
    assert min(heads) < 4
    path = tmp_path / "vit.pt"
    icprune.save(pruned, path)
    loaded = icprune.load(path, factory).eval()
    for qualified, module in pruned.named_modules():
        assert type(loaded.get_submodule(qualified)) is type(module)
    _assert_same_model(pruned, loaded, x)
    if name == "SwinNet":
        return
    # the heads table is validated, and must fit the architecture
    data = torch.load(path, weights_only=True)
    count, dim = data["heads"]["block1.self_attention"]
    assert dim == 6 and count < 4
    for heads, message in (
        ({"block1.self_attention": [2, 0]}, "'heads' must map attention modules"),
        ({"block1.fc1": [2, 6]}, "model_fn\\(\\)'s model has Linear"),
        ({"block1.self_attention": [2, 4]}, "with head_dim 6"),
        ({"block1.self_attention": [count + 1, 6]}, "in_proj_weight' is stored as"),
    ):
        edited = dict(data, heads=dict(data["heads"], **heads))
        torch.save(edited, tmp_path / "edited.pt")
        with pytest.raises(ValueError, match=message):
            icprune.load(tmp_path / "edited.pt", factory)


def test_files_from_before_heads_were_pruned_still_load(tmp_path):
    # they had no "heads" table and listed in_proj_bias as a per-channel parameter
    from tests.structure.nets import ViTNet

    torch.manual_seed(0)
    model = ViTNet().eval()
    icprune.save(model, tmp_path / "new.pt")
    data = torch.load(tmp_path / "new.pt", weights_only=True)
    del data["heads"]
    data["channels"]["block1.self_attention.in_proj_bias"] = [72, 72, 1]
    torch.save(data, tmp_path / "old.pt")
    loaded = icprune.load(tmp_path / "old.pt", ViTNet).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
