"""Build a model from a name: a zoo model (optionally with a checkpoint) or the user's factory.

A *model spec* is either the name of a factory in :mod:`icprune.models` (``"resnet50"``,
``"resnet20"``, ...), or ``"package.module:factory"``, a callable that takes no arguments and
returns an ``nn.Module`` (``package.module`` is imported with the working directory on
``sys.path``, as ``python -m`` does). Zoo models can load a checkpoint with
``torch.load(..., weights_only=True)``: a plain state_dict (torchvision's files), or a dict
holding one under ``"state_dict"`` or ``"model"``; a ``"module."`` prefix (DataParallel) is
stripped, and the number of classes is taken from the checkpoint's classifier.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from icprune import models
from icprune.files import FileReadError, load_torch_file


class ModelLoadError(ValueError):
    """A model spec or checkpoint that cannot be turned into a model (the message says why)."""


@dataclass(frozen=True)
class ZooEntry:
    """A zoo architecture.

    Attributes:
        factory: builds the model; takes ``num_classes``.
        input_shape: ``(C, H, W)`` of the images it was designed for.
        num_classes: default number of output classes.
        classifier: qualified name of its last linear layer (to read the class count from a
            checkpoint).
    """

    factory: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]
    num_classes: int
    classifier: str


_IMAGENET = (3, 224, 224)
_CIFAR = (3, 32, 32)
#: Every zoo architecture by name.
ZOO: dict[str, ZooEntry] = {
    **{
        name: ZooEntry(getattr(models, name), _IMAGENET, 1000, "fc")
        for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
    },
    "vgg16_bn": ZooEntry(models.vgg16_bn, _IMAGENET, 1000, "classifier.6"),
    "mobilenet_v2": ZooEntry(models.mobilenet_v2, _IMAGENET, 1000, "classifier.1"),
    **{
        name: ZooEntry(getattr(models, name), _CIFAR, 10, "fc")
        for name in ("resnet20", "resnet56", "resnet110")
    },
    "cifar_vgg16_bn": ZooEntry(models.cifar_vgg16_bn, _CIFAR, 10, "classifier.6"),
}


def _read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    if os.path.isdir(path):
        raise ModelLoadError(f"--weights: {os.fspath(path)!r} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise ModelLoadError(f"--weights: no such file {os.fspath(path)!r}")
    try:
        data = load_torch_file(path, "checkpoint")
    except FileReadError as exc:
        hint = "; pass a state_dict saved with torch.save(model.state_dict(), path)"
        raise ModelLoadError(f"--weights: {exc}{hint if exc.unsafe else ''}") from None
    except OSError as exc:
        raise ModelLoadError(f"--weights: cannot read {os.fspath(path)!r} ({exc})") from None
    if isinstance(data, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelLoadError(
            f"--weights: {os.fspath(path)!r} holds no state_dict (expected a dict of tensors, or "
            f"one under 'state_dict' or 'model')"
        )
    return {k.removeprefix("module."): v for k, v in data.items()}


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
        if keys
    ]
    if not problems:
        bad = [
            k
            for k, v in state.items()
            if v.layout != torch.strided or (v.is_floating_point() and not v.isfinite().all())
        ]
        if bad:
            problems = [f"sparse or NaN/Inf tensors ({len(bad)}): {', '.join(bad[:3])}"]
    if problems:
        raise ModelLoadError(
            f"--weights do not fit {name}: {'; '.join(problems)}; pass a checkpoint of this "
            f"architecture"
        )
    model.load_state_dict(state, strict=True)


def _describe(exc: BaseException) -> str:
    """``"ZeroDivisionError: division by zero"``; a SyntaxError with its file and line."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({exc.filename}, line {exc.lineno})"
    if isinstance(exc, SystemExit):
        return f"SystemExit (it called sys.exit({exc.code!r}))"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _import_factory(spec: str) -> Callable[[], nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelLoadError(f"model {spec!r}: write a factory as 'package.module:function'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"model {spec!r}: cannot import module {module_name!r} ({exc}); check the name and "
            f"run from the directory that holds it (or put it on PYTHONPATH)"
        ) from exc
    except (Exception, SystemExit) as exc:  # the module's own code failed (SyntaxError too)
        raise ModelLoadError(
            f"model {spec!r}: importing module {module_name!r} raised {_describe(exc)}; fix "
            f"the module"
        ) from exc
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ModelLoadError(f"model {spec!r}: module {module_name!r} has no {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelLoadError(f"model {spec!r}: {attr!r} is not callable")
    return factory


def build_model(
    spec: str, weights: str | os.PathLike | None = None, num_classes: int | None = None
) -> tuple[nn.Module, tuple[int, int, int] | None]:
    """The model a spec names, in eval mode on the CPU.

    Args:
        spec: a zoo name (see :data:`ZOO`) or ``"package.module:factory"``.
        weights: checkpoint for a zoo model (read with ``weights_only=True``); None keeps the
            factory's (seeded by the caller) random initialisation.
        num_classes: output classes of a zoo model; default: the checkpoint's, else the zoo's.

    Returns:
        ``(model, input_shape)``: ``input_shape`` is the zoo's ``(C, H, W)``, None for factories.

    Raises:
        ModelLoadError: unknown name, unimportable or failing factory, a factory that does not
            return an ``nn.Module``, ``weights``/``num_classes`` with a factory, an unreadable
            checkpoint or one that does not fit the architecture.
    """
    if ":" in spec:
        if weights is not None or num_classes is not None:
            raise ModelLoadError(
                f"model {spec!r}: --weights and --num-classes apply to zoo models only; load "
                f"the weights inside your factory"
            )
        factory = _import_factory(spec)
        try:
            model = factory()
        except (Exception, SystemExit) as exc:
            raise ModelLoadError(f"model {spec!r}: the factory raised {_describe(exc)}") from exc
        if not isinstance(model, nn.Module):
            raise ModelLoadError(
                f"model {spec!r}: the factory returned {type(model).__name__}, not an nn.Module"
            )
        return model.eval(), None
    entry = ZOO.get(spec)
    if entry is None:
        raise ModelLoadError(
            f"unknown model {spec!r}: use a zoo name ({', '.join(ZOO)}) or "
            f"'package.module:factory' for your own model"
        )
    state = _read_checkpoint(weights) if weights is not None else None
    classifier = f"{entry.classifier}.weight"
    if num_classes is None:
        held = state.get(classifier) if state is not None else None
        num_classes = held.shape[0] if held is not None else entry.num_classes
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ModelLoadError(f"--num-classes must be a positive int, got {num_classes!r}")
    model = entry.factory(num_classes=num_classes)
    if state is not None:
        _load_state(model, state, spec)
    return model.eval(), entry.input_shape
