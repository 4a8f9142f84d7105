import numpy as np
import pytest
import torch

from icprune.cli.data_specs import (
    DataLoadError,
    _pil_transform,
    image_folder,
    image_transform,
    load_data_spec,
    synthetic,
    tensor_file,
)


def test_image_folder_with_class_subfolders_is_labelled_and_normalised(photo_folder):
    data = image_folder(photo_folder, (3, 32, 32), batch_size=5)
    assert data.labelled and data.num_samples == 12 and len(data.batches) == 3
    assert "12 images in 2 classes" in data.description
    batches = list(data.batches)
    assert [len(x) for x, _ in batches] == [5, 5, 2]
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    assert inputs.shape == (12, 3, 32, 32) and inputs.dtype == torch.float32
    assert targets.tolist() == [0] * 6 + [1] * 6
    assert -2.2 < inputs.min() < inputs.max() < 2.7 and inputs.std() > 0.2  # ImageNet-normalised
    again = torch.cat([x for x, _ in data.batches])
    assert torch.equal(inputs, again)  # re-iterable, deterministic


def test_image_folder_without_subfolders_is_unlabelled_and_greyscale_works(photo_folder):
    data = image_folder(photo_folder / "a", (1, 24, 24), batch_size=4)
    assert not data.labelled and data.num_samples == 6
    assert data.batches[0].shape == (4, 1, 24, 24)


def test_image_folder_subset_is_seeded(photo_folder):
    first = image_folder(photo_folder, (3, 16, 16), max_samples=4, seed=1)
    second = image_folder(photo_folder, (3, 16, 16), max_samples=4, seed=1)
    assert first.num_samples == 4
    assert torch.equal(first.batches[0][0], second.batches[0][0])


def test_pil_transform_resizes_the_shorter_side_then_crops_the_centre():
    from PIL import Image

    array = np.zeros((40, 80, 3), dtype=np.uint8)
    array[:, 40:] = 255  # right half white
    out = _pil_transform(20, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(Image.fromarray(array))
    assert out.shape == (3, 20, 20)
    # Shorter side 40 -> round(20 / 0.875) = 23, width 46; the centre crop straddles the edge.
    assert out[:, :, 0].max() == 0 and out[:, :, -1].min() == 1


def test_image_transform_uses_averaged_statistics_for_greyscale():
    from PIL import Image

    grey = Image.fromarray(np.full((30, 30), 128, dtype=np.uint8))
    out = image_transform(16, 1)(grey)
    assert out.shape == (1, 16, 16)
    expected = (128 / 255 - (0.485 + 0.456 + 0.406) / 3) / ((0.229 + 0.224 + 0.225) / 3)
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-5)


def test_image_folder_errors_name_the_problem(tmp_path, photo_folder):
    with pytest.raises(DataLoadError, match="is not a directory"):
        image_folder(tmp_path / "missing", (3, 32, 32))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataLoadError, match="no images in .*empty.*looked for .jpg"):
        image_folder(tmp_path / "empty", (3, 32, 32))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a JPEG")
    with pytest.raises(DataLoadError, match=r"cannot read image .*broken\.jpg"):
        image_folder(bad, (3, 32, 32))
    with pytest.raises(DataLoadError, match="1- or 3-channel square inputs"):
        image_folder(photo_folder, (4, 32, 32))
    with pytest.raises(DataLoadError, match="1- or 3-channel square inputs"):
        image_folder(photo_folder, (3, 32, 48))


def test_tensor_files_in_every_format(tmp_path):
    x = torch.randn(10, 3, 8, 8)
    y = torch.arange(10) % 3
    files = {
        "plain.pt": x,
        "pair.pt": (x, y),
        "named.pt": {"inputs": x, "targets": y},
        "plain.npy": x.numpy(),
    }
    for name, value in files.items():
        if name.endswith(".npy"):
            np.save(tmp_path / name, value)
        else:
            torch.save(value, tmp_path / name)
    np.savez(tmp_path / "named.npz", inputs=x.double().numpy(), targets=y.numpy())
    np.savez(tmp_path / "single.npz", x.numpy())
    for name in [*files, "named.npz", "single.npz"]:
        data = tensor_file(tmp_path / name, (3, 8, 8), batch_size=4)
        labelled = name.startswith(("pair", "named"))
        assert data.labelled == labelled and data.num_samples == 10
        assert data.input_shape == (3, 8, 8) and len(data.batches) == 3
        first = data.batches[0]
        inputs = first[0] if labelled else first
        assert inputs.dtype == torch.float32 and torch.equal(inputs, x[:4])
        if labelled:
            assert first[1].dtype == torch.int64 and torch.equal(first[1], y[:4])
    capped = tensor_file(tmp_path / "pair.pt", batch_size=4, max_samples=6)
    assert capped.num_samples == 6 and [len(b[1]) for b in capped.batches] == [4, 2]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.randn(3, 8, 8), r"non-empty float tensor \[N, C, H, W\]"),
        (torch.zeros(0, 3, 8, 8), "non-empty float tensor"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "got torch.uint8"),
        (torch.full((2, 3, 8, 8), float("nan")), "NaN or Inf"),
        (torch.zeros(2, 1, 8, 8), "have 1 channels, the model takes 3"),
        (
            (torch.zeros(2, 3, 8, 8), torch.zeros(3, dtype=torch.long)),
            r"integer labels of shape \[2\]",
        ),
        ((torch.zeros(2, 3, 8, 8), torch.zeros(2)), "integer labels"),
        ({"images": torch.zeros(2, 3, 8, 8), "y": torch.zeros(2)}, "name the inputs 'inputs'"),
        ("a string", "the inputs in .* is str"),
    ],
)
def test_bad_tensor_files_say_what_is_wrong(tmp_path, value, message):
    path = tmp_path / "data.pt"
    torch.save(value, path)
    with pytest.raises(DataLoadError, match=message):
        tensor_file(path, (3, 8, 8))


def test_unreadable_tensor_files(tmp_path):
    with pytest.raises(DataLoadError, match="no such file"):
        tensor_file(tmp_path / "missing.pt")
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(DataLoadError, match="cannot read"):
        tensor_file(tmp_path / "junk.npy")
    torch.save({"inputs": torch.nn.Conv2d(1, 1, 1)}, tmp_path / "module.pt")  # needs unpickling
    with pytest.raises(DataLoadError, match="cannot be read: it holds Python objects"):
        tensor_file(tmp_path / "module.pt")


def test_synthetic_data_warns_and_repeats():
    with pytest.warns(UserWarning, match="prefer data-free scoring"):
        first = synthetic((3, 8, 8), num_samples=5, batch_size=2, seed=3)
    with pytest.warns(UserWarning):
        second = synthetic((3, 8, 8), num_samples=5, batch_size=2, seed=3)
    assert not first.labelled and [len(b) for b in first.batches] == [2, 2, 1]
    assert all(torch.equal(a, b) for a, b in zip(first.batches, second.batches, strict=True))


def test_load_data_spec_dispatches_and_validates(tmp_path, photo_folder):
    assert load_data_spec(photo_folder, (3, 16, 16)).labelled
    torch.save(torch.zeros(2, 3, 4, 4), tmp_path / "x.pt")
    assert load_data_spec(tmp_path / "x.pt", None).input_shape == (3, 4, 4)
    with pytest.warns(UserWarning):
        assert load_data_spec("synthetic", (3, 4, 4), max_samples=3).num_samples == 3
    with pytest.raises(DataLoadError, match="input shape is unknown; pass input_shape"):
        load_data_spec("synthetic", None)
    with pytest.raises(DataLoadError, match="no such file or folder"):
        load_data_spec(tmp_path / "nothing", (3, 4, 4))
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(DataLoadError, match="neither a folder of images nor a tensor file"):
        load_data_spec(tmp_path / "table.csv", (3, 4, 4))
    with pytest.raises(DataLoadError, match="batch_size must be a positive int"):
        load_data_spec(tmp_path / "x.pt", None, batch_size=0)
    with pytest.raises(DataLoadError, match="max_samples must be a positive int"):
        load_data_spec(tmp_path / "x.pt", None, max_samples=0)


def test_image_transform_prefers_torchvision_when_importable(monkeypatch):
    import sys
    import types

    calls = []
    fake = types.ModuleType("torchvision.transforms")
    for name in ("Resize", "CenterCrop", "ToTensor", "Normalize"):
        setattr(fake, name, lambda *a, _n=name: calls.append((_n, a)) or _n)
    fake.Compose = lambda steps: ("composed", steps)
    package = types.ModuleType("torchvision")
    package.transforms = fake
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.transforms", fake)
    assert image_transform(224, 3) == (
        "composed",
        ["Resize", "CenterCrop", "ToTensor", "Normalize"],
    )
    assert calls[0] == ("Resize", (256,)) and calls[1] == ("CenterCrop", (224,))
    assert calls[3] == ("Normalize", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))


def _photo(size=48):
    from sklearn.datasets import load_sample_images

    return np.ascontiguousarray(load_sample_images().images[0][:size, :size])


def test_a_truncated_jpeg_that_verify_passes_is_found_up_front(tmp_path):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(_photo(96)).save(buffer, "JPEG", quality=90)
    cut = buffer.getvalue()[: int(len(buffer.getvalue()) * 0.9)]
    with Image.open(io.BytesIO(cut)) as image:
        image.verify()  # PIL's quick check does not notice
    (tmp_path / "a").mkdir()
    Image.fromarray(_photo()).save(tmp_path / "a" / "good.jpg")
    (tmp_path / "a" / "cut.jpg").write_bytes(cut)
    with pytest.raises(DataLoadError, match=r"cannot read image .*cut\.jpg.*truncated"):
        image_folder(tmp_path, (3, 32, 32))


def test_odd_image_modes_are_converted_or_refused(tmp_path):
    from PIL import Image

    photo = Image.fromarray(_photo())
    ramp = np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)
    images = {
        "cmyk.jpg": photo.convert("CMYK"),
        "grey.png": photo.convert("L"),
        "rgba.png": photo.convert("RGBA"),
        "palette.png": photo.convert("P"),
        "deep.png": Image.fromarray(ramp),  # 16-bit greyscale
    }
    for name, image in images.items():
        image.save(tmp_path / name)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    data = image_folder(tmp_path, (3, 32, 32), batch_size=8)
    batch = data.batches[0]
    assert batch.shape == (5, 3, 32, 32) and torch.isfinite(batch).all()
    deep = sorted(images).index("deep.png")
    grey = image_folder(tmp_path, (1, 32, 32), batch_size=8).batches[0][deep]
    # scaled from 16 to 8 bits, not clipped at 255 (which would make the ramp almost white)
    assert grey.max() - grey.min() > 3.0 and grey.median() < grey.max() - 1.0
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tiff")  # mode "F"
    with pytest.raises(DataLoadError, match=r"float\.tiff.*mode 'F'.*unknown range"):
        image_folder(tmp_path, (3, 32, 32))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.randn(2, 3, 8, 8).to_sparse(), "sparse_coo tensor; save a dense one"),
        (torch.full((2, 3, 8, 8), 1e300, dtype=torch.float64), "exceed the float32 range"),
        (torch.zeros(2, 3, 0, 8), r"non-empty float tensor"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "convert and normalise them first"),
        ((torch.zeros(2, 3, 8, 8), torch.tensor([True, False])), "integer labels"),
        (
            (torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]).to_sparse()),
            "the targets in .*sparse_coo",
        ),
    ],
)
def test_sparse_empty_and_out_of_range_tensors_are_refused(tmp_path, value, message):
    path = tmp_path / "data.pt"
    torch.save(value, path)
    with pytest.raises(DataLoadError, match=message):
        tensor_file(path, (3, 8, 8))


def test_pickled_objects_are_refused_without_inviting_an_unsafe_load(tmp_path):
    torch.save({"inputs": torch.nn.Conv2d(1, 1, 1)}, tmp_path / "module.pt")
    with pytest.raises(DataLoadError, match="object of class torch.nn.modules.conv.Conv2d") as bad:
        tensor_file(tmp_path / "module.pt")
    assert "weights_only=False" not in str(bad.value) and "save tensors only" in str(bad.value)


def test_sources_carry_every_label_and_an_empty_spec_is_refused(tmp_path, photo_folder):
    folder = image_folder(photo_folder, (3, 32, 32))
    assert folder.targets.tolist() == [0] * 6 + [1] * 6
    assert folder.shard(1, 2).targets.tolist() == folder.targets.tolist()
    torch.save((torch.zeros(3, 3, 8, 8), torch.tensor([2, 0, 1])), tmp_path / "d.pt")
    assert tensor_file(tmp_path / "d.pt", max_samples=2).targets.tolist() == [2, 0]
    assert tensor_file(tmp_path / "d.pt").targets.dtype == torch.int64
    assert image_folder(photo_folder / "a", (3, 32, 32)).targets is None
    for spec in ("", "  "):
        with pytest.raises(DataLoadError, match="the data spec is empty"):
            load_data_spec(spec, (3, 32, 32))
