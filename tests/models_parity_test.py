"""Parameter counts against open_clip's own ViT-B-16 (parity group)."""

import pytest

from configs import vitb16_roi
from conftest import require_peer
from region_medclip.models import summary


@pytest.mark.parity
def test_vitb16_counts_equal_open_clip_exactly():
    open_clip = require_peer("open_clip")
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    visual = sum(p.numel() for p in model.visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    text = total - visual - model.logit_scale.numel()
    table = summary.param_table(vitb16_roi.get_config())
    assert table["image"] == visual
    assert table["text"] == text
    # Ours adds the region tower's LayerNorm (its projection is shared with W_i) and the
    # sigmoid bias; the CLIP part is the same model.
    assert table["total"] - table["region"] - 1 == total
