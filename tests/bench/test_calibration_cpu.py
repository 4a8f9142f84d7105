"""bench/calibration_cpu.py: its 'input' read point reads each distinct consumer input once and
keeps sums + Gram only (the timings themselves are bench output, not tests)."""

import torch
from torch import nn

from bench.calibration_cpu import calibrate_inputs, consumer_inputs
from icprune.models import resnet20


def test_consumer_inputs_owns_each_distinct_input_tensor_once():
    torch.manual_seed(0)
    model = resnet20().eval()
    owners = consumer_inputs(model, torch.randn(1, 3, 32, 32))
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    # Not owned: the stem (it reads the model input) and, in each of the two downsampling
    # blocks, one of the two convs reading the block's input (the other, run first, owns it).
    unowned = [n for n in convs if n not in owners]
    assert unowned[0] == "conv1" and len(unowned) == 3
    assert [n.split(".")[0] for n in unowned[1:]] == ["layer2", "layer3"]
    x = torch.randn(2, 3, 32, 32)
    stats = calibrate_inputs(model, [x], owners)
    for name, s in stats.items():
        assert s.parts == ("gram",) and s.read_at == "input" and s.num_channels == owners[name]
    seen = {}
    mods = dict(model.named_modules())
    hooks = [
        mods[n].register_forward_pre_hook(lambda _m, i, n=n: seen.setdefault(n, i[0].clone()))
        for n in owners
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for name, s in stats.items():
        a = seen[name].transpose(0, 1).reshape(s.num_channels, -1).double()
        torch.testing.assert_close(s.gram, a @ a.T, rtol=1e-5, atol=1e-5 * float(s.gram.max()))
