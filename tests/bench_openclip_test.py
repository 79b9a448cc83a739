"""`bench openclip`: open_clip trained here for a wall-clock budget, imported into our towers and
scored by our evaluators (parity group: needs torch and open_clip)."""

import json

import numpy as np
import pytest

from conftest import require_peer
from region_medclip.bench import __main__ as bench
from region_medclip.bench import compare, openclip

TINY_MICRO = """import micro_config


def get_config(arg=None):
    c = micro_config.get_config("data_dir={data_dir},evals")
    c.data.batch_size = 8
    return c
"""


def _args(tmp_path, data_dir, *flags):
    configs_dir = tmp_path / "configs"
    configs_dir.mkdir(exist_ok=True)
    (configs_dir / "tiny_roi.py").write_text(TINY_MICRO.format(data_dir=data_dir))
    return ["openclip", f"--configs_dir={configs_dir}", *flags]


@pytest.mark.slow
@pytest.mark.parity
def test_open_clip_trained_here_is_our_towers_after_import(tmp_path, synth_data_dir):
    torch = require_peer("torch")
    require_peer("open_clip")
    config = openclip.case_config(bench.parser().parse_args(_args(tmp_path, synth_data_dir)))
    assert (
        config.data.tokenizer == "clip_bpe" and config.loss.beta == config.data.num_negatives == 0
    )
    state, stats = openclip.train(config, seconds=2.0)
    assert stats["steps"] >= 1 and np.isfinite(stats["final_loss"])
    model, params = openclip.imported(config, state)
    theirs = compare.open_clip_model(config).eval()
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    size = config.data.image_size
    images = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    from region_medclip.data import tokenizers

    tokens, _ = tokenizers.from_config(config.data).encode(
        ["No acute findings.", "A small nodule in the right upper zone."], config.data.text_len
    )
    with torch.no_grad():
        zimg = theirs.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)), normalize=True)
        ztxt = theirs.encode_text(torch.from_numpy(np.asarray(tokens, np.int64)), normalize=True)
    ours_img = model.apply({"params": params}, images, method=type(model).encode_image)[0]
    ours_txt = model.apply({"params": params}, np.asarray(tokens), method=type(model).encode_text)
    np.testing.assert_allclose(np.asarray(ours_img), zimg.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours_txt), ztxt.numpy(), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parity
def test_openclip_command_reports_our_evaluators(tmp_path, synth_data_dir):
    require_peer("open_clip")
    out = tmp_path / "openclip.json"
    bench.main(_args(tmp_path, synth_data_dir, "--openclip_seconds=2", f"--out={out}"))
    results = json.loads(out.read_text())
    row = results["row"]
    assert row["steps"] >= 1 and 0 <= row["zero_shot_macro_auroc"] <= 1
    assert set(results["evaluation"]) == {"zero_shot", "retrieval"}
    assert results["evaluation"]["retrieval"]["examples"] == 9  # the 32 px test split
