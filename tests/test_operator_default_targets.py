"""Platform default targets (chart `defaultTargets`, env ENGINEBUILD_DEFAULT_TARGETS)."""

from __future__ import annotations

import json

import pytest

from enginebuild_operator.config import ConfigError, load_config
from enginebuild_operator.validation import validate

TARGETS = [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}, {"name": "l4", "gpuProduct": "NVIDIA-L4"}]
SPEC = {"model": {"architecture": "ViT-L-14"}, "output": {"uri": "s3://engines/clip"}}


def test_empty_targets_get_the_defaults_and_own_targets_win() -> None:
    config = load_config({"ENGINEBUILD_DEFAULT_TARGETS": json.dumps(TARGETS)})
    assert [t.name for t in validate(dict(SPEC), "eb", config).targets] == ["h100", "l4"]
    assert [t.name for t in validate({**SPEC, "targets": []}, "eb", config).targets] == ["h100", "l4"]
    own = validate({**SPEC, "targets": [{"name": "a100", "gpuProduct": "NVIDIA-A100"}]}, "eb", config)
    assert [t.name for t in own.targets] == ["a100"]
    assert validate(dict(SPEC), "eb", load_config({})).targets == []


@pytest.mark.parametrize(
    ("raw", "hint"),
    [
        ("not json", "is not JSON"),
        ('{"name": "h100"}', "must be a JSON list"),
        ('[{"name": "h100"}]', "ENGINEBUILD_DEFAULT_TARGETS[0].gpuProduct"),
        ('[{"name": "Bad_Name", "gpuProduct": "x"}]', "ENGINEBUILD_DEFAULT_TARGETS[0].name"),
    ],
)
def test_bad_default_targets_name_the_variable(raw: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"ENGINEBUILD_DEFAULT_TARGETS": raw})
    assert hint in str(info.value)
