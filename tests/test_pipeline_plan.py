"""Stage planning of `enginebuild build`: which stages, which targets, who writes the manifest."""

from __future__ import annotations

import pytest

from enginebuild_contract.errors import SpecError
from enginebuild_builder.pipeline import plan_build
from enginebuild_contract.spec import parse_spec

BASE = {"model": {"architecture": "ViT-L-14"}}
TARGETS = [{"name": "h100", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}, {"name": "l40s", "gpuProduct": "NVIDIA-L40S"}]
OUT = {"uri": "s3://bucket/engines"}


def test_auto_export_only_without_targets_or_output() -> None:
    plan = plan_build(parse_spec(BASE), "auto", None)
    assert plan.stages == ("export",) and not plan.finalize


def test_auto_everything_finalizes() -> None:
    plan = plan_build(parse_spec({**BASE, "targets": TARGETS, "output": OUT}), "auto", None)
    assert plan.stages == ("export", "engine", "upload")
    assert [t.name for t in plan.targets] == ["h100", "l40s"] and plan.finalize


def test_engine_job_for_one_target_never_finalizes() -> None:
    plan = plan_build(parse_spec({**BASE, "targets": TARGETS, "output": OUT}), "engine,upload", "l40s")
    assert plan.stages == ("engine", "upload") and [t.name for t in plan.targets] == ["l40s"]
    assert not plan.finalize


def test_export_job_with_targets_does_not_finalize() -> None:
    plan = plan_build(parse_spec({**BASE, "targets": TARGETS, "output": OUT}), "upload,export", None)
    assert plan.stages == ("export", "upload") and not plan.finalize


@pytest.mark.parametrize(
    ("doc", "stages", "target", "field"),
    [
        (BASE, "export,bogus", None, "--stages"),
        (BASE, "export,upload", None, "spec.output"),
        ({**BASE, "targets": TARGETS}, "engine", "a100", "--target"),
        (BASE, "engine", None, "spec.targets"),
    ],
)
def test_bad_plans_name_the_field(doc: dict, stages: str, target: str | None, field: str) -> None:
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        plan_build(parse_spec(doc), stages, target)
