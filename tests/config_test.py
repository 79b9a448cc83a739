"""Configs: arg parsing, validation errors naming the key, and the parameter table."""

import subprocess
import sys

import pytest

from configs import tiny_roi, vitb16_roi, vitb16_sigmoid
from region_medclip import config as config_lib
from region_medclip.models import clip, summary


@pytest.mark.parametrize(
    "module,arg",
    [
        (tiny_roi, None),
        (tiny_roi, "res=64,steps=10"),
        (tiny_roi, "text=clip"),
        (vitb16_roi, None),
        (vitb16_roi, "runlocal,res=128"),
        (vitb16_roi, "text=bert,variant=S/16"),
        (vitb16_sigmoid, "runlocal"),
    ],
)
def test_configs_validate(module, arg):
    config = module.get_config(arg)
    config_lib.validate(config)


def test_parse_arg_types_and_errors():
    args = config_lib.parse_arg(
        "runlocal,res=128,variant=S/16", runlocal=False, res=224, variant="B/16"
    )
    assert args.runlocal is True and args.res == 128 and args.variant == "S/16"
    assert config_lib.parse_arg(None, res=224).res == 224
    with pytest.raises(config_lib.ConfigError, match="'rse'"):
        config_lib.parse_arg("rse=3", res=224)
    with pytest.raises(config_lib.ConfigError, match="'res'.*int"):
        config_lib.parse_arg("res=big", res=224)
    with pytest.raises(config_lib.ConfigError, match="'res' needs a value"):
        config_lib.parse_arg("res", res=224)


def test_arg_values_reach_the_config():
    config = vitb16_roi.get_config("runlocal,res=96,text=bert")
    assert config.data.image_size == 96 and config.data.batch_size == 8
    assert config.model.text.kind == "bert"
    assert vitb16_sigmoid.get_config().loss.global_kind == "sigmoid"


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda c: setattr(c, "sede", 1), r"config\.sede: unknown key"),
        (lambda c: setattr(c.optim, "lrr", 1.0), r"config\.optim\.lrr: unknown key"),
        (lambda c: c.model.image.update(depht=3), r"config\.model\.image\.depht: unknown key"),
        (lambda c: c.model.text.update(poool="cls"), r"config\.model\.text\.poool"),
        (
            lambda c: setattr(c.model, "image", dict(variant="Ti/16", depth="4")),
            r"config\.model\.image\.depth: expected int",
        ),
        (lambda c: setattr(c.loss, "global_kind", "hinge"), r"config\.loss\.global_kind"),
        (lambda c: c.model.text.update(kind="gpt"), r"config\.model\.text\.kind"),
        (lambda c: setattr(c.evals, "zs", {"every": 3}), r"config\.evals\.zs"),
        (lambda c: setattr(c.loss, "local_weight", -1.0), r"config\.loss\.local_weight=-1"),
        (lambda c: c.loss.gloria.update(temperature2=0.0), r"config\.loss\.gloria\.temperature2"),
        (lambda c: c.loss.gloria.update(grid=-2), r"config\.loss\.gloria\.grid=-2"),
        (lambda c: c.loss.gloria.update(temp1=4.0), r"config\.loss\.gloria\.temp1: unknown key"),
    ],
)
def test_validation_names_the_key(mutate, message):
    config = tiny_roi.get_config()
    config.unlock()
    mutate(config)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config)
        clip.check_towers(config.model)


def test_wrong_type_against_schema():
    schema = config_lib.base_config()
    config = config_lib.base_config()
    config.unlock()
    del config.train["total_steps"]
    config.train.total_steps = "many"
    with pytest.raises(config_lib.ConfigError, match=r"config\.train\.total_steps: expected int"):
        config_lib.validate(config, schema)


def test_vitb16_parameter_counts_match_open_clip():
    # open_clip ViT-B-16: 149.62 M total, 86.19 M image tower, 63.43 M text tower
    # (the parity test checks the exact numbers against an open_clip model).
    table = summary.param_table(vitb16_roi.get_config())
    assert abs(table["image"] / 1e6 - 86.19) <= 0.01
    assert abs(table["text"] / 1e6 - 63.43) <= 0.01
    assert abs(table["total"] / 1e6 - 149.62) <= 0.01


@pytest.mark.slow
def test_summary_cli_prints_the_table():
    result = subprocess.run(
        [sys.executable, "-m", "region_medclip.summary", "--config=configs/vitb16_roi.py"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "86.19M" in result.stdout and "63.43M" in result.stdout
    assert "149.62M" in result.stdout


@pytest.mark.slow
def test_summary_cli_rejects_unknown_override():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "region_medclip.summary",
            "--config=configs/tiny_roi.py",
            "--config.optim.lrr=3",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "lrr" in result.stderr
