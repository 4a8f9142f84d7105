"""icprune's PrunedWindowAttention computes what torchvision's Swin attention computes."""

import pytest
import torch

from icprune.attention import PrunedWindowAttention

swin = pytest.importorskip(
    "torchvision.models.swin_transformer", reason="needs torchvision (.venv-tv)"
)


@pytest.mark.parametrize("version", ["ShiftedWindowAttention", "ShiftedWindowAttentionV2"])
@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("side", [(14, 14), (10, 12), (7, 7), (5, 9)])
def test_all_heads_kept_is_bit_identical_to_torchvision(version, shift, side):
    torch.manual_seed(0)
    original = getattr(swin, version)(24, [7, 7], [shift, shift], 4).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.normal_()
    pruned = PrunedWindowAttention.keeping(original, torch.arange(4)).eval()
    assert list(pruned.state_dict()) == list(original.state_dict())
    x = torch.randn(2, *side, 24)
    with torch.no_grad():
        assert torch.equal(pruned(x), original(x))
    fresh = PrunedWindowAttention(24, [7, 7], [shift, shift], 4, 6, cosine=version.endswith("V2"))
    for name, buffer in original.named_buffers():  # the constructor's tables are Swin's
        assert torch.equal(dict(fresh.named_buffers())[name], buffer)
