import pytest
import torch
from torch import nn

from icprune.cli.zoo import ZOO, ModelLoadError, build_model
from icprune.models import resnet20


def test_every_zoo_entry_builds_in_eval_mode_with_its_classifier():
    for name, entry in ZOO.items():
        if name in ("resnet50", "resnet101", "resnet152", "vgg16_bn"):
            continue  # large; same factories and classifier names as their smaller siblings
        model, shape = build_model(name, num_classes=3)
        assert not model.training and shape == entry.input_shape
        classifier = dict(model.named_modules())[entry.classifier]
        assert isinstance(classifier, nn.Linear) and classifier.out_features == 3


def test_unknown_name_lists_the_zoo():
    with pytest.raises(ModelLoadError, match="unknown model 'resnet51'.*resnet50.*factory"):
        build_model("resnet51")


def _write_module(tmp_path, monkeypatch, source):
    (tmp_path / "user_models.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "user_models", raising=False)


def test_factory_spec_imports_from_the_working_directory(tmp_path, monkeypatch):
    _write_module(
        tmp_path,
        monkeypatch,
        "from torch import nn\n\ndef tiny():\n    return nn.Sequential(nn.Conv2d(3, 4, 3))\n",
    )
    model, shape = build_model("user_models:tiny")
    assert isinstance(model, nn.Sequential) and not model.training and shape is None


@pytest.mark.parametrize(
    ("source", "spec", "message"),
    [
        ("", "no_such_module:make", "cannot import module 'no_such_module'"),
        ("x = 1\n", "user_models:make", "has no 'make'"),
        ("make = 3\n", "user_models:make", "'make' is not callable"),
        ("def make():\n    raise OSError('disk')\n", "user_models:make", "raised OSError: disk"),
        ("def make():\n    return 'model'\n", "user_models:make", "returned str, not an nn.Module"),
        ("", "user_models:", "'package.module:function'"),
        ("1 / 0\n", "user_models:make", "importing module 'user_models' raised ZeroDivisionError"),
        ("def make(:\n", "user_models:make", r"raised SyntaxError: .*user_models\.py, line 1"),
        ("import sys\nsys.exit(3)\n", "user_models:make", r"it called sys\.exit\(3\)"),
        ("def make():\n    raise SystemExit\n", "user_models:make", "factory raised SystemExit"),
    ],
)
def test_bad_factory_specs_say_what_is_wrong(tmp_path, monkeypatch, source, spec, message):
    _write_module(tmp_path, monkeypatch, source)
    with pytest.raises(ModelLoadError, match=message):
        build_model(spec)


def test_weights_load_bit_identical_with_wrappers_prefixes_and_class_count(tmp_path):
    torch.manual_seed(1)
    trained = resnet20(num_classes=7)
    state = trained.state_dict()
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pth"
    torch.save(state, plain)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    for path in (plain, wrapped):
        model, _ = build_model("resnet20", path)
        assert model.fc.out_features == 7  # from the checkpoint's classifier
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_bad_weights_say_what_is_wrong(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        build_model("resnet20", tmp_path / "missing.pt")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ModelLoadError, match="it is not a complete torch.save file"):
        build_model("resnet20", text)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": resnet20()}, pickled)  # a whole pickled module is refused
    with pytest.raises(ModelLoadError, match="holds Python objects icprune does not load"):
        build_model("resnet20", pickled)
    other = tmp_path / "resnet56.pt"
    torch.save(__import__("icprune").models.resnet56().state_dict(), other)
    with pytest.raises(
        ModelLoadError, match=r"do not fit resnet20: unexpected \(216\): layer1.3.conv1.weight"
    ):
        build_model("resnet20", other)
    with pytest.raises(ModelLoadError, match="--num-classes must be a positive int"):
        build_model("resnet20", num_classes=0)
    with pytest.raises(ModelLoadError, match="zoo models only"):
        build_model("user_models:make", other)


def test_empty_folder_object_and_nan_weights_say_what_is_wrong(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="the file is empty"):
        build_model("resnet20", empty)
    with pytest.raises(ModelLoadError, match="is a folder, not a checkpoint file"):
        build_model("resnet20", tmp_path)
    pickled = tmp_path / "model.pt"
    torch.save(resnet20(), pickled)  # a whole pickled model, not a state_dict
    with pytest.raises(ModelLoadError, match="object of class .*CifarResNet.*state_dict") as bad:
        build_model("resnet20", pickled)
    assert "weights_only=False" not in str(bad.value)
    state = resnet20().state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ModelLoadError, match=r"NaN/Inf tensors \(1\): conv1\.weight"):
        build_model("resnet20", tmp_path / "nan.pt")
