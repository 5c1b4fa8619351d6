"""Static checks of the Dockerfile (no Docker engine runs here): what it copies exists and is not
excluded by .dockerignore, every base image is pinned, the two targets exist and run as non-root,
and every package version it pins agrees with requirements.lock (or pyproject's build requirements).
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and stages; line continuations joined, heredoc bodies kept out."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        start = i
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            nxt = lines[i].strip()
            i += 1
            if nxt.startswith("#"):  # comments inside a continuation are dropped by Docker too
                continue
            line = line[:-1].rstrip() + " " + nxt
        heredoc = re.search(r"<<-?['\"]?(\w+)['\"]?", line)
        if heredoc:
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
            i += 1
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        inst = Instruction(keyword, rest.strip(), start + 1)
        if keyword == "ARG" and not stages:
            name, _, default = inst.args.partition("=")
            args[name] = default
        elif keyword == "FROM":
            parts = inst.args.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, base))
        elif stages:
            stages[-1].instructions.append(inst)
    return args, stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    _, parsed = parse(DOCKERFILE.read_text())
    return {s.name: s for s in parsed}


def test_targets_exist(stages: dict[str, Stage]) -> None:
    assert {"operator", "builder"} <= set(stages)


def test_every_base_image_is_pinned(stages: dict[str, Stage]) -> None:
    for stage in stages.values():
        if stage.base in stages:  # FROM an earlier stage
            continue
        assert "$" not in stage.base, f"{stage.name}: unresolved ARG in FROM {stage.base}"
        image = stage.base
        if "@sha256:" in image:
            continue
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{stage.name}: FROM {image} has no tag"
        assert tag != "latest", f"{stage.name}: FROM {image} uses latest"
        assert re.search(r"\d", tag), f"{stage.name}: tag {tag} is not a version"


def test_builder_is_on_nvidia_tensorrt_10_or_later_container(stages: dict[str, Stage]) -> None:
    image = stages["builder"].base
    assert image.startswith("nvcr.io/nvidia/tensorrt:")
    year, month = (int(x) for x in re.match(r".*:(\d\d)\.(\d\d)-py3$", image).groups())  # type: ignore[union-attr]
    assert (year, month) >= (25, 8), "needs an NGC release with CUDA 13 (torch 2.14 wheels) and TensorRT 10"


def _dockerignore() -> list[str]:
    path = REPO / ".dockerignore"
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    rel = rel.rstrip("/")
    for pat in patterns:
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat.removeprefix("**/")) or rel.startswith(pat + "/"):
            return True
    return False


def test_every_copied_path_exists_in_the_build_context(stages: dict[str, Stage]) -> None:
    patterns = _dockerignore()
    copied = []
    for stage in stages.values():
        for inst in stage.instructions:
            if inst.keyword not in ("COPY", "ADD"):
                continue
            words = shlex.split(inst.args)
            if any(w.startswith("--from=") for w in words):
                assert words[-2].startswith("/") or words[-2] in stages, inst
                continue
            sources = [w for w in words[:-1] if not w.startswith("--")]
            for src in sources:
                assert (REPO / src).exists(), f"line {inst.line}: COPY {src} does not exist"
                assert not _ignored(src, patterns), f"line {inst.line}: {src} is excluded by .dockerignore"
                copied.append(src.rstrip("/"))
    assert {"pyproject.toml", "requirements.lock", "builder", "operator"} <= set(copied)
    # What pyproject needs to build the package is all copied (package-dir folders and the readme).
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = set(project["tool"]["setuptools"]["package-dir"].values()) | {project["project"]["readme"]}
    assert needed <= set(copied)


def _final_user(stage: Stage, stages: dict[str, Stage]) -> str | None:
    users = [i.args for i in stage.instructions if i.keyword == "USER"]
    if users:
        return users[-1]
    return _final_user(stages[stage.base], stages) if stage.base in stages else None


@pytest.mark.parametrize("target", ["operator", "builder"])
def test_final_stages_run_as_non_root(stages: dict[str, Stage], target: str) -> None:
    user = _final_user(stages[target], stages)
    assert user is not None, f"{target}: no USER (would run as root)"
    name = user.split(":")[0]
    assert name not in ("root", "0"), f"{target}: USER {user}"


def test_operator_user_matches_chart_and_builder_user_matches_jobs(stages: dict[str, Stage]) -> None:
    import yaml

    values = yaml.safe_load((REPO / "charts" / "enginebuild" / "values.yaml").read_text())
    assert _final_user(stages["operator"], stages) == f"{values['podSecurityContext']['runAsUser']}:" \
        f"{values['podSecurityContext']['runAsGroup']}"
    jobs = (REPO / "operator" / "jobs.py").read_text()
    uid = re.search(r'"runAsUser":\s*(\d+)', jobs)
    assert uid, "operator/jobs.py no longer sets runAsUser"
    assert _final_user(stages["builder"], stages) == f"{uid.group(1)}:{uid.group(1)}"


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def _pip_installs(stages: dict[str, Stage]) -> list[tuple[int, list[str]]]:
    found = []
    for stage in stages.values():
        for inst in stage.instructions:
            if inst.keyword != "RUN":
                continue
            commands: list[list[str]] = [[]]
            for word in shlex.split(inst.args):
                if word in ("&&", ";", "||"):
                    commands.append([])
                else:
                    commands[-1].append(word)
            for words in commands:
                if "pip" in words and "install" in words[words.index("pip"):] or "pip" in words and "wheel" in words:
                    found.append((inst.line, words))
    return found


def test_pinned_packages_agree_with_the_lock_file(stages: dict[str, Stage]) -> None:
    lock = _lock()
    build_requires = [Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]]
    installs = _pip_installs(stages)
    assert installs
    checked = 0
    for line, words in installs:
        for word in words:
            if "==" not in word or word.startswith("-"):
                continue
            req = Requirement(word)
            key = re.sub(r"[-_.]+", "-", req.name).lower()
            (spec,) = req.specifier
            if key in lock:
                assert spec.version == lock[key], f"line {line}: {word} but requirements.lock has {lock[key]}"
            else:
                match = [b for b in build_requires if re.sub(r"[-_.]+", "-", b.name).lower() == key]
                assert match, f"line {line}: {word} is neither in requirements.lock nor a build requirement"
                assert match[0].specifier.contains(spec.version), f"line {line}: {word} violates {match[0]}"
            checked += 1
    assert checked >= 2


def test_project_installs_are_constrained_by_the_lock(stages: dict[str, Stage]) -> None:
    """Installing `.` or `.[builder]` from PyPI must use requirements.lock, or versions float."""
    for line, words in _pip_installs(stages):
        targets = [w for w in words if w == "." or w.startswith(".[")]
        if targets:
            assert "-c" in words and words[words.index("-c") + 1] == "requirements.lock", f"line {line}"
        if "--no-index" in words:
            continue
        args = words[words.index("pip") + 2:]
        for i, w in enumerate(args):
            if w.startswith("-") or w in (".",) or w.startswith(".[") or w == "requirements.lock" or "==" in w:
                continue
            if i and args[i - 1] == "-r":  # a requirements file of the repo: every line in it pinned
                pins = [s for s in (x.split("#", 1)[0].strip() for x in (REPO / w).read_text().splitlines()) if s]
                assert pins and all("==" in s for s in pins), f"line {line}: {w} has unpinned requirements: {pins}"
                continue
            if w in ("/wheels",):
                continue
            # Unpinned extras only allowed together with the lock as constraints (e.g. ninja).
            assert "-c" in words, f"line {line}: {w} unpinned without constraints"


def test_operator_image_has_no_torch(stages: dict[str, Stage]) -> None:
    runs = " ".join(i.args for i in stages["operator"].instructions if i.keyword == "RUN")
    assert "[builder]" not in runs and "torch" in runs  # installs no extra, and asserts torch is absent
    wheels = " ".join(i.args for i in stages["operator-wheels"].instructions if i.keyword == "RUN")
    assert "[builder]" not in wheels


def test_images_install_the_product_only(stages: dict[str, Stage]) -> None:
    """No image gets the dev extra or the dev stack: the operator image installs the wheel of `.`,
    the builder image `.[builder]`; devstack/ is not even in the build context."""
    for stage in stages.values():
        for inst in stage.instructions:
            if inst.keyword in ("RUN", "COPY", "ADD"):
                assert "devstack" not in inst.args, f"line {inst.line}: {inst.args}"
    targets = sorted(w for _, words in _pip_installs(stages) for w in words if w == "." or w.startswith(".["))
    assert targets == [".", ".[builder]"]
    assert _ignored("devstack", _dockerignore())
    wheel = [words for line, words in _pip_installs(stages) if "wheel" in words and "." in words]
    assert len(wheel) == 1 and "--no-deps" not in wheel[0]  # the operator's wheels: `.` and its core deps
    operator = [words for _, words in _pip_installs({"operator": stages["operator"]})]
    assert any(words[-1] == "enginebuild" and "--no-index" in words for words in operator), operator


def test_builder_precompiles_modelopt_cuda_extensions() -> None:
    """The image build compiles the same extensions (names, sources, flags) ModelOpt loads at run time."""
    import importlib.util

    # Located, not imported (importing ModelOpt imports torch: slow): the source of truth for names and sources.
    spec = importlib.util.find_spec("modelopt")
    assert spec is not None and spec.submodule_search_locations
    text = DOCKERFILE.read_text()
    source = (Path(spec.submodule_search_locations[0]) / "torch" / "quantization" / "extensions.py").read_text()
    for name in re.findall(r'name="(modelopt_cuda_ext\w*)"', source):
        assert f'"{name}"' in text, f"{name} is not precompiled"
    for src in re.findall(r'kernels_gemm / "([\w.]+)"', source):
        assert f'gemm / "{src}"' in text, f"source {src} missing from the precompile step"
    assert "--use_fast_math" in text  # the mx extension's flags, or torch would rebuild it at run time
    assert "TORCH_CUDA_ARCH_LIST=" in text and "TORCH_EXTENSIONS_DIR=" in text


def test_parser_handles_continuations_and_heredocs() -> None:
    args, parsed = parse(
        "ARG BASE=python:3.11.11-slim\nFROM ${BASE} AS a\nRUN echo 1 \\\n  # comment\n  && echo 2\n"
        "RUN python <<'PY'\nFROM evil:latest\nPY\nFROM a AS b\nUSER 1000\n"
    )
    assert args == {"BASE": "python:3.11.11-slim"}
    assert [(s.name, s.base) for s in parsed] == [("a", "python:3.11.11-slim"), ("b", "a")]
    assert parsed[0].instructions[0].args == "echo 1 && echo 2"


# --- the documented build commands produce the chart's default images ------------------------------


def _documented_image_commands() -> tuple[dict[str, str], list[str]]:
    """The shell variables and commands of the first ```sh block under docs/deploy.md's `## Images`."""
    text = (REPO / "docs" / "deploy.md").read_text()
    section = text.split("\n## Images\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() if not line.lstrip().startswith("echo") else line.strip()
             for line in block.splitlines()]
    lines = [line for line in lines if line]
    variables = dict(re.fullmatch(r"(\w+)=(\S+)", line).groups() for line in lines  # type: ignore[union-attr]
                     if re.fullmatch(r"\w+=\S+", line))
    return variables, [line for line in lines if not re.fullmatch(r"\w+=\S+", line)]


def _expand(word: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables[m.group(1)], word)


def test_chart_default_images_are_what_the_documented_commands_build(stages: dict[str, Stage]) -> None:
    import yaml

    from enginebuild_operator.config import DEFAULT_BUILDER_IMAGE

    variables, commands = _documented_image_commands()
    built: dict[str, str] = {}
    pushed: set[str] = set()
    for command in commands:
        words = shlex.split(command)
        if words[:2] not in (["docker", "build"], ["docker", "push"]):
            continue
        words = [_expand(w, variables) for w in words]
        if words[:2] == ["docker", "build"]:
            target, tag = words[words.index("--target") + 1], words[words.index("-t") + 1]
            assert target in stages and words[-1] == ".", command
            built[target] = tag
        elif words[:2] == ["docker", "push"]:
            pushed.add(words[2])
    assert set(built) == {"operator", "builder"} and pushed == set(built.values())

    chart = REPO / "charts" / "enginebuild"
    values = yaml.safe_load((chart / "values.yaml").read_text())
    app_version = yaml.safe_load((chart / "Chart.yaml").read_text())["appVersion"]
    assert variables["VERSION"] == app_version
    assert built["operator"] == f"{values['image']['repository']}:{values['image']['tag'] or app_version}"
    assert built["builder"] == f"{values['builder']['image']['repository']}:{values['builder']['image']['tag'] or app_version}"
    assert built["builder"] == DEFAULT_BUILDER_IMAGE  # the operator's fallback when the chart sets none


def test_documented_ngc_login_for_the_builder_base_image(stages: dict[str, Stage]) -> None:
    """The builder stage starts from nvcr.io, which needs `docker login nvcr.io` as user $oauthtoken."""
    args, _ = parse(DOCKERFILE.read_text())
    assert args["TENSORRT_IMAGE"].startswith("nvcr.io/")
    _, commands = _documented_image_commands()
    (login,) = [shlex.split(c) for c in commands if "nvcr.io" in c]
    assert login[login.index("docker"):login.index("docker") + 3] == ["docker", "login", "nvcr.io"]
    assert login[login.index("--username") + 1] == "$oauthtoken" and "--password-stdin" in login


def test_builder_replaces_the_cpu_onnxruntime_by_the_cuda_build(stages: dict[str, Stage]) -> None:
    """The gate runs on the Job's GPU only if the builder image has ONNX Runtime's CUDA build, and the
    two builds share one module name: the CPU one must go before the CUDA one is installed."""
    installs = [" ".join(words) for _, words in _pip_installs({"builder": stages["builder"]})]
    run = " ".join(i.args for i in stages["builder"].instructions if i.keyword == "RUN")
    assert "pip uninstall -y onnxruntime" in run
    assert run.index("pip uninstall -y onnxruntime") < run.index("-r builder-gpu.lock")
    assert any("-r builder-gpu.lock" in i for i in installs)
    pins = [s for s in (x.split("#", 1)[0].strip() for x in (REPO / "builder-gpu.lock").read_text().splitlines()) if s]
    assert [p.split("==")[0] for p in pins] == ["onnxruntime-gpu"]
    assert "CUDAExecutionProvider" in run  # the image build fails if the CUDA provider is missing
