"""Every failure the builder can end with, as one class each with its own exit code.

The operator maps exit codes to Kubernetes conditions and to the Job's podFailurePolicy: a permanent
error (bad spec, bad checkpoint, failed accuracy gate) must fail the Job at once instead of burning
retries on a GPU node; a retriable one (S3 down, a flaky benchmark) is left to `backoffLimit`.
The table below is the single source for that mapping; docs/errors.md is generated from it by a test.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorKind:
    exit_code: int
    reason: str  # CamelCase, used verbatim as the condition reason
    retriable: bool
    summary: str


# Exit codes are a public interface (podFailurePolicy rules are rendered from them): never renumber.
KINDS: dict[str, ErrorKind] = {
    "internal": ErrorKind(1, "InternalError", True, "unexpected failure in the builder"),
    "spec": ErrorKind(2, "InvalidSpec", False, "the spec does not validate"),
    "checkpoint_missing": ErrorKind(10, "CheckpointNotFound", False, "checkpoint path/URI does not exist"),
    "checkpoint_corrupt": ErrorKind(11, "CheckpointUnreadable", False,
                                    "checkpoint cannot be read as a state dict of dense, finite tensors"),
    "architecture": ErrorKind(12, "UnknownArchitecture", False, "architecture/config not known to open_clip"),
    "checkpoint_mismatch": ErrorKind(13, "CheckpointMismatch", False, "checkpoint does not fit the architecture"),
    "calibration": ErrorKind(14, "CalibrationUnreadable", False, "calibration set missing or unreadable"),
    "model_config": ErrorKind(16, "ModelConfigInvalid", False,
                              "the model config builds a model that cannot run its own inputs"),
    "quantization": ErrorKind(15, "QuantizationFailed", False, "ModelOpt quantization or ONNX export failed"),
    "accuracy": ErrorKind(20, "AccuracyGateFailed", False, "FP8 ONNX below spec.accuracy.minCosine"),
    "trtexec_missing": ErrorKind(30, "TrtexecNotFound", False, "trtexec not found in the builder image"),
    "engine_build": ErrorKind(31, "EngineBuildFailed", False, "trtexec could not build the engine"),
    "benchmark": ErrorKind(32, "BenchmarkFailed", True, "trtexec built the engine but the benchmark failed"),
    "out_of_memory": ErrorKind(33, "OutOfMemory", True, "GPU or host memory exhausted"),
    "storage": ErrorKind(40, "StorageUnavailable", True, "S3 unreachable or refused the request"),
    "storage_denied": ErrorKind(41, "StorageAccessDenied", False, "S3 credentials wrong or bucket missing"),
}

PERMANENT_EXIT_CODES: tuple[int, ...] = tuple(sorted(k.exit_code for k in KINDS.values() if not k.retriable))


class BuildError(Exception):
    """Base of all builder failures; `kind` selects exit code, reason and retriability."""

    kind_name: str = "internal"

    def __init__(self, message: str, *, field: str | None = None, log_tail: str | None = None) -> None:
        self.field = field
        self.log_tail = log_tail
        full = f"{field}: {message}" if field else message
        super().__init__(full)

    @property
    def kind(self) -> ErrorKind:
        return KINDS[self.kind_name]

    @property
    def exit_code(self) -> int:
        return self.kind.exit_code

    @property
    def reason(self) -> str:
        return self.kind.reason

    @property
    def retriable(self) -> bool:
        return self.kind.retriable


class SpecError(BuildError):
    """The spec is invalid; the message names the field and says how to fix it."""

    kind_name = "spec"


class CheckpointNotFound(BuildError):
    kind_name = "checkpoint_missing"


class CheckpointUnreadable(BuildError):
    kind_name = "checkpoint_corrupt"


class UnknownArchitecture(BuildError):
    kind_name = "architecture"


class CheckpointMismatch(BuildError):
    kind_name = "checkpoint_mismatch"


class CalibrationError(BuildError):
    kind_name = "calibration"


class ModelConfigInvalid(BuildError):
    """open_clip builds the model from spec.model.config, but it fails on inputs of its own shape
    (image smaller than a patch, a vocabulary smaller than the tokenizer's, a timm tower of another
    size): a config mistake, not a quantization or export failure."""

    kind_name = "model_config"


class QuantizationError(BuildError):
    kind_name = "quantization"


class AccuracyGateFailed(BuildError):
    kind_name = "accuracy"


class TrtexecNotFound(BuildError):
    kind_name = "trtexec_missing"


class EngineBuildFailed(BuildError):
    kind_name = "engine_build"


class BenchmarkFailed(BuildError):
    kind_name = "benchmark"


class OutOfMemory(BuildError):
    kind_name = "out_of_memory"


class StorageError(BuildError):
    kind_name = "storage"


class StorageAccessDenied(BuildError):
    kind_name = "storage_denied"


def render_error_table() -> str:
    """docs/errors.md, generated so the documented exit codes can never drift from the code."""
    lines = [
        "# Builder exit codes and condition reasons",
        "",
        "Generated from `contract/errors.py` (`python -m enginebuild_contract.errors > docs/errors.md`; a test",
        "compares). Permanent errors fail the Job at once through its podFailurePolicy; retriable ones are",
        "retried up to `spec.backoffLimit`. Exit codes never change meaning; new ones are only added.",
        "",
        "An error caused by the spec or its inputs starts with the field or option at fault and says what",
        "to do, e.g. `model.checkpoint: ckpt.safetensors holds NaN or infinite values in 2 tensor(s): ...`",
        "or `model.config: text_cfg.vocab_size is 1000 in tiny.json, smaller than its tokenizer's 49408",
        "tokens: ... Set text_cfg.vocab_size to 49408`. The builder prints it as one log line (no",
        "traceback) and puts it in the termination message and `report.json` (`error`), so the operator",
        "shows it in the `Ready` condition. Only exit 1 (`InternalError`) means a bug in the builder.",
        "",
        "| field / option | what is checked | reason |",
        "|---|---|---|",
        "| `--spec` | a readable UTF-8 YAML file (or `env:NAME`), valid against the schema | `InvalidSpec` |",
        "| `--workdir`, `--stages`, `--target`, `--device` | a writable folder; known stages and targets; a visible GPU for `cuda` | `InvalidSpec` |",
        "| `model.checkpoint` | exists (local or S3); a state dict of dense, finite tensors, no code-carrying pickle | `CheckpointNotFound`, `CheckpointUnreadable` |",
        "| `model.checkpoint` vs the architecture | every key present, none extra, every shape equal | `CheckpointMismatch` |",
        "| `model.architecture`, `model.config` | a known open_clip name, or a readable open_clip config open_clip can build | `UnknownArchitecture` |",
        "| `model.config` | each tower runs one input of its own shape; the text vocabulary covers the tokenizer's | `ModelConfigInvalid` |",
        "| `calibration.source` | exists; images readable and under Pillow's pixel limit; `captions.txt` UTF-8 | `CalibrationUnreadable` |",
        "",
        "| exit code | reason | retried | meaning |",
        "|---|---|---|---|",
    ]
    for kind in sorted(KINDS.values(), key=lambda k: k.exit_code):
        lines.append(f"| {kind.exit_code} | `{kind.reason}` | {'yes' if kind.retriable else 'no'} | {kind.summary} |")
    return "\n".join(lines) + "\n"


def kind_for_exit_code(code: int) -> ErrorKind | None:
    """Reverse lookup used by the operator when it only sees a container's exit code."""
    for kind in KINDS.values():
        if kind.exit_code == code:
            return kind
    return None


if __name__ == "__main__":
    import sys

    sys.stdout.write(render_error_table())
