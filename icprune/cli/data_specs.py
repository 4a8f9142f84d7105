"""Calibration data from a path: an image folder, a tensor file, or synthetic noise.

A *data spec* is one of:

- a directory of images (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.gif``, ``.ppm``,
  ``.tif``, ``.tiff``, ``.webp``, searched recursively). Images directly in the folder are
  unlabelled; if every image lies in a subfolder, the first-level subfolder names (sorted) are
  the class labels 0, 1, ... (torchvision's ``ImageFolder`` convention). Every image is
  decoded completely when the spec is read (so a truncated or corrupt file is found before
  any work, named); images are converted to the model's RGB or greyscale (16-bit greyscale
  scaled to 8 bits; 32-bit integer and float images, whose range is unknown, are refused).
  Each image is resized
  (shorter side to ``size / 0.875``, bilinear, antialiased), centre-cropped to ``size``, scaled
  to [0, 1] and normalised with the ImageNet mean and standard deviation (their averages for
  one-channel models) - with torchvision's transforms when torchvision is importable, else the
  same steps in PIL;
- a tensor file: ``.pt`` (read with ``torch.load(..., weights_only=True)``) holding a Tensor
  ``[N, C, H, W]``, an ``(inputs, targets)`` pair or a dict with ``"inputs"`` (and optionally
  ``"targets"``); ``.npy`` holding the inputs array; ``.npz`` holding ``inputs`` (and
  optionally ``targets``) or a single array. Inputs must be dense floating tensors (any
  float dtype; integer and bool images must be normalised first) and are used as they are
  (already normalised), converted to float32, which they must fit finitely; targets must be
  dense integer labels;
- ``synthetic``: standard-normal noise of the model's input shape, with a warning: noise says
  little about which channels matter, and data-free scoring (``source="weights"``) is the
  better choice without data.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from icprune.data import IMAGENET_MEAN, IMAGENET_STD
from icprune.files import FileReadError, load_torch_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")
TENSOR_EXTENSIONS = (".pt", ".npy", ".npz")
SYNTHETIC = "synthetic"
#: Side of the crop is ``size``; the shorter side is first resized to ``size / CROP_FRACTION``.
CROP_FRACTION = 0.875


class DataLoadError(ValueError):
    """A data spec that cannot be read as calibration data (the message names the file)."""


@dataclass(frozen=True)
class DataSpec:
    """A data spec (``--data``, ``--val-data``) read: its samples, batched.

    Attributes:
        batches: re-iterable of batches: Tensor ``[B, C, H, W]`` float32, or
            ``(inputs, targets)`` with targets Tensor ``[B]`` int64 when ``labelled``.
        labelled: whether batches carry class targets.
        num_samples: N, the number of samples over all batches.
        input_shape: ``(C, H, W)`` of one sample.
        description: what the data is, for reports (e.g. ``"128 images in 2 classes from x/"``).
        targets: every sample's label, Tensor ``[N]`` int64 (None when not ``labelled``), to
            check labels against the model before any work.
    """

    batches: Sequence
    labelled: bool
    num_samples: int
    input_shape: tuple[int, int, int]
    description: str
    targets: torch.Tensor | None = None

    def shard(self, rank: int, world_size: int, *, batch_size: int | None = None) -> DataSpec:
        """Every ``world_size``-th batch from batch ``rank`` on (read lazily), e.g. one process's
        share of the calibration data; ``num_samples`` stays that of the whole data.

        With ``batch_size`` (the size of every batch but a shorter last one) only complete
        rounds of ``world_size`` full batches are shared out, ``(num_samples // batch_size) //
        world_size`` per process, and the rest is left out: every process then has as many
        batches of the same size, and round k is the global batch that distributed fine-tuning
        takes its k-th step on."""
        batches = self.batches
        count = len(range(rank, len(batches), world_size))
        if batch_size is not None:
            count = (self.num_samples // batch_size) // world_size
        shard = _Batches(count, lambda i: batches[rank + i * world_size])
        return replace(self, batches=shard, description=f"{self.description}, shard {rank}")


class _Batches(Sequence):
    """A sequence of batches built on demand: batch ``i`` is ``make(i)``."""

    def __init__(self, count: int, make: Callable[[int], object]) -> None:
        self._count = count
        self._make = make

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> object:
        if not 0 <= i < self._count:
            raise IndexError(i)
        return self._make(i)

    def __iter__(self) -> Iterator:
        return (self._make(i) for i in range(self._count))


def _pil_transform(size: int, channels: int, mean, std) -> Callable:
    from PIL import Image

    mean_t = torch.tensor(mean).view(-1, 1, 1)
    std_t = torch.tensor(std).view(-1, 1, 1)
    resize_to = round(size / CROP_FRACTION)

    def transform(image: Image.Image) -> torch.Tensor:
        width, height = image.size
        scale = resize_to / min(width, height)
        new = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new, Image.Resampling.BILINEAR)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.float32).reshape(size, size, channels) / 255.0
        return (torch.from_numpy(array.copy()).permute(2, 0, 1) - mean_t) / std_t

    return transform


def image_transform(size: int, channels: int) -> Callable:
    """PIL image (already in mode ``"RGB"`` or ``"L"``) -> Tensor[channels, size, size] float32,
    resized, centre-cropped and normalised as described in the module docstring (torchvision's
    transforms when importable)."""
    mean = IMAGENET_MEAN if channels == 3 else (sum(IMAGENET_MEAN) / 3,) * channels
    std = IMAGENET_STD if channels == 3 else (sum(IMAGENET_STD) / 3,) * channels
    try:
        from torchvision import transforms
    except ImportError:
        return _pil_transform(size, channels, mean, std)
    return transforms.Compose(
        [
            transforms.Resize(round(size / CROP_FRACTION)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def _image_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


#: Image modes whose value range is unknown (32-bit integer and float): refused.
_UNSCALED_MODES = ("I", "F")


def _check_image(path: Path) -> None:
    """Decode ``path`` completely (``Image.verify`` misses a truncated JPEG), with PIL's
    tolerance of truncated files off.

    Raises:
        DataLoadError: PIL cannot read or fully decode it, or its mode has no fixed range.
    """
    from PIL import Image, ImageFile

    tolerant = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as image:
            if image.mode in _UNSCALED_MODES:
                raise DataLoadError(
                    f"image {os.fspath(path)!r} has mode {image.mode!r} (32-bit integer or "
                    f"float pixels of unknown range); save it as 8- or 16-bit RGB or greyscale"
                )
            image.load()
    except DataLoadError:
        raise
    except Exception as exc:  # PIL raises several types for corrupt or foreign files
        text = str(exc).strip() or type(exc).__name__
        raise DataLoadError(f"cannot read image {os.fspath(path)!r} ({text})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = tolerant


def _to_8_bit(image):
    """A 16-bit greyscale PIL image scaled to 8 bits (PIL's own conversion clips at 255)."""
    if not image.mode.startswith("I;16"):
        return image
    from PIL import Image

    pixels = np.asarray(image, dtype=np.float64) / 257.0
    return Image.fromarray(np.rint(pixels).astype(np.uint8), mode="L")


def image_folder(
    root: str | os.PathLike,
    input_shape: tuple[int, int, int],
    *,
    batch_size: int = 32,
    max_samples: int | None = None,
    seed: int = 0,
) -> DataSpec:
    """Images of a folder as calibration batches, decoded lazily batch by batch.

    Args:
        root: the folder (see the module docstring for layout, labels and preprocessing).
        input_shape: ``(C, H, W)`` the model takes; C must be 1 (greyscale) or 3 (RGB) and
            H == W (the crop side in pixels).
        batch_size: images per batch.
        max_samples: use at most this many images, a seeded random subset (None: all).
        seed: seed of that subset.

    Returns:
        :class:`DataSpec`; every file is checked to be a readable image up front.

    Raises:
        DataLoadError: no such folder, no images in it, a file PIL cannot read (named), or an
            input shape images cannot take.
    """
    root = Path(root)
    channels, height, width = input_shape
    if channels not in (1, 3) or height != width:
        raise DataLoadError(
            f"an image folder feeds 1- or 3-channel square inputs; the model takes {input_shape}: "
            f"pass a tensor file instead"
        )
    if not root.is_dir():
        raise DataLoadError(f"{os.fspath(root)!r} is not a directory")
    files = _image_files(root)
    if not files:
        raise DataLoadError(
            f"no images in {os.fspath(root)!r} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
            f"recursively)"
        )
    if max_samples is not None and len(files) > max_samples:
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))
        files = [files[i] for i in sorted(order[:max_samples].tolist())]
    from PIL import Image

    for path in files:
        _check_image(path)
    labelled = all(path.parent != root for path in files)
    folders = [path.relative_to(root).parts[0] for path in files]  # a file's class subfolder
    classes = sorted(set(folders)) if labelled else []
    targets = torch.tensor([classes.index(f) for f in folders]) if labelled else None
    transform = image_transform(height, channels)
    mode = "RGB" if channels == 3 else "L"

    def decode(path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as image:
                return transform(_to_8_bit(image).convert(mode))
        except OSError as exc:
            raise DataLoadError(f"cannot decode image {os.fspath(path)!r} ({exc})") from exc

    def make(i: int) -> object:
        span = slice(i * batch_size, (i + 1) * batch_size)
        inputs = torch.stack([decode(path) for path in files[span]])
        return (inputs, targets[span]) if targets is not None else inputs

    what = f"in {len(classes)} classes " if labelled else ""
    return DataSpec(
        _Batches(math.ceil(len(files) / batch_size), make),
        labelled,
        len(files),
        input_shape,
        f"{len(files)} images {what}from {os.fspath(root)}",
        targets,
    )


def _read_tensors(path: Path) -> tuple[object, object]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".pt":
            data = load_torch_file(path, "data file")
        elif suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as archive:
                data = {key: archive[key] for key in archive.files}
    except FileReadError as exc:
        hint = "; save tensors only, e.g. torch.save({'inputs': x, 'targets': y}, path)"
        raise DataLoadError(f"{exc}{hint if exc.unsafe else ''}") from None
    except Exception as exc:  # zip and format errors all mean "unreadable"
        text = str(exc).strip() or ("the file is empty" if path.stat().st_size == 0 else "")
        raise DataLoadError(
            f"cannot read {os.fspath(path)!r} ({type(exc).__name__}: {text})"
        ) from None
    if isinstance(data, dict):
        if "inputs" in data:
            return data["inputs"], data.get("targets")
        if len(data) == 1:
            return next(iter(data.values())), None
        raise DataLoadError(
            f"{os.fspath(path)!r} holds {sorted(data)}; name the inputs 'inputs' (and "
            f"the labels 'targets')"
        )
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    return data, None


def _as_tensor(value: object, what: str, path: Path) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise DataLoadError(f"{what} in {os.fspath(path)!r} is {type(value).__name__}")
    if value.layout != torch.strided:
        raise DataLoadError(
            f"{what} in {os.fspath(path)!r} are a {value.layout} tensor; save a dense one "
            f"(tensor.to_dense())"
        )
    if value.is_quantized or value.is_meta:
        raise DataLoadError(
            f"{what} in {os.fspath(path)!r} are a quantized or meta tensor; save plain values"
        )
    return value


def tensor_file(
    path: str | os.PathLike,
    input_shape: tuple[int, int, int] | None = None,
    *,
    batch_size: int = 32,
    max_samples: int | None = None,
) -> DataSpec:
    """Inputs (and optional targets) stored in a ``.pt``, ``.npy`` or ``.npz`` file.

    Args:
        path: the file (formats in the module docstring).
        input_shape: ``(C, H, W)`` the model takes, to check the channel count (None: unchecked).
        batch_size: samples per batch.
        max_samples: use only the first this many samples (None: all).

    Returns:
        :class:`DataSpec` with float32 inputs ``[B, C, H, W]`` (targets int64 ``[B]``).

    Raises:
        DataLoadError: missing or unreadable file, inputs that are not a non-empty 4-D floating
            tensor with finite values, targets that are not integer labels of the same length,
            a channel count the model does not take.
    """
    path = Path(path)
    if not path.is_file():
        raise DataLoadError(f"no such file {os.fspath(path)!r}")
    raw_inputs, raw_targets = _read_tensors(path)
    inputs = _as_tensor(raw_inputs, "the inputs", path)
    if inputs.ndim != 4 or inputs.numel() == 0 or not inputs.is_floating_point():
        hint = "" if inputs.is_floating_point() else " (convert and normalise them first)"
        raise DataLoadError(
            f"inputs in {os.fspath(path)!r} must be a non-empty float tensor [N, C, H, W]"
            f" of normalised images; got {inputs.dtype} of shape {tuple(inputs.shape)}{hint}"
        )
    if input_shape is not None and inputs.shape[1] != input_shape[0]:
        raise DataLoadError(
            f"inputs in {os.fspath(path)!r} have {inputs.shape[1]} channels, the model "
            f"takes {input_shape[0]}"
        )
    converted = inputs.float()
    if not torch.isfinite(converted).all():
        if not torch.isfinite(inputs).all():
            raise DataLoadError(f"inputs in {os.fspath(path)!r} hold NaN or Inf values")
        raise DataLoadError(
            f"inputs in {os.fspath(path)!r} exceed the float32 range (they become Inf); pass "
            f"normalised inputs"
        )
    inputs = converted
    targets = None
    if raw_targets is not None:
        targets = _as_tensor(raw_targets, "the targets", path)
        integer = not (targets.is_floating_point() or targets.is_complex())
        if targets.shape != (len(inputs),) or not integer or targets.dtype == torch.bool:
            raise DataLoadError(
                f"targets in {os.fspath(path)!r} must be integer labels of shape "
                f"[{len(inputs)}], got {targets.dtype} of shape {tuple(targets.shape)}"
            )
        targets = targets.long()[:max_samples]
    inputs = inputs[:max_samples]
    x_batches = inputs.split(batch_size)
    batches = (
        list(x_batches)
        if targets is None
        else list(zip(x_batches, targets.split(batch_size), strict=True))
    )
    shape = tuple(inputs.shape[1:])
    return DataSpec(
        batches,
        targets is not None,
        len(inputs),
        shape,
        f"{len(inputs)} samples of shape {shape} from {os.fspath(path)}",
        targets,
    )


def synthetic(
    input_shape: tuple[int, int, int], *, num_samples: int = 64, batch_size: int = 32, seed: int = 0
) -> DataSpec:
    """Standard-normal noise shaped like the model's input, with a ``UserWarning`` that
    data-free scoring is the better choice without data.

    Args:
        input_shape: ``(C, H, W)``.
        num_samples: N.
        batch_size: samples per batch.
        seed: seed of the noise.

    Returns:
        unlabelled :class:`DataSpec` of float32 batches ``[B, C, H, W]``.
    """
    warnings.warn(
        "synthetic data: channels are scored on random noise, which says little about which "
        "channels matter; without real data prefer data-free scoring (--source weights / "
        "source='weights')",
        UserWarning,
        stacklevel=2,
    )
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, *input_shape, generator=gen)
    return DataSpec(
        list(inputs.split(batch_size)),
        False,
        num_samples,
        tuple(input_shape),
        f"{num_samples} synthetic N(0, 1) samples of shape {tuple(input_shape)}",
    )


def load_data_spec(
    spec: str | os.PathLike,
    input_shape: tuple[int, int, int] | None,
    *,
    batch_size: int = 32,
    max_samples: int | None = None,
    seed: int = 0,
) -> DataSpec:
    """Read a data spec (see the module docstring) into batches.

    Args:
        spec: an image folder, a ``.pt``/``.npy``/``.npz`` file, or ``"synthetic"``.
        input_shape: ``(C, H, W)`` the model takes; required for image folders and
            ``synthetic`` (None for a tensor file: taken from the file).
        batch_size: samples per batch (>= 1).
        max_samples: cap on the number of samples (None: all; ``synthetic``: 64).
        seed: seed of image subsets and of synthetic noise.

    Returns:
        :class:`DataSpec`.

    Raises:
        DataLoadError: anything that keeps the spec from being read (the message names it).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataLoadError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise DataLoadError(f"max_samples must be a positive int, got {max_samples!r}")
    text = os.fspath(spec)
    if not text.strip():
        raise DataLoadError("the data spec is empty: name a folder, a tensor file or 'synthetic'")
    needs_shape = text == SYNTHETIC or Path(text).is_dir()
    if needs_shape and input_shape is None:
        raise DataLoadError(
            f"{text!r}: the model's input shape is unknown; pass input_shape (on the command "
            f"line: --input-shape C,H,W)"
        )
    if text == SYNTHETIC:
        return synthetic(
            input_shape, num_samples=max_samples or 64, batch_size=batch_size, seed=seed
        )
    path = Path(text)
    if path.is_dir():
        return image_folder(
            path, input_shape, batch_size=batch_size, max_samples=max_samples, seed=seed
        )
    if path.suffix.lower() in TENSOR_EXTENSIONS:
        return tensor_file(path, input_shape, batch_size=batch_size, max_samples=max_samples)
    if not path.exists():
        raise DataLoadError(f"no such file or folder {text!r}")
    raise DataLoadError(
        f"{text!r} is neither a folder of images nor a tensor file "
        f"({', '.join(TENSOR_EXTENSIONS)}), nor 'synthetic'"
    )
