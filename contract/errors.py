"""Every failure the builder can end with, as one class each with its own exit code.

The operator maps exit codes to Kubernetes conditions and to the Job's podFailurePolicy: a permanent
error (bad spec, bad checkpoint, failed accuracy gate) must fail the Job at once instead of burning
retries on a GPU node; a retriable one (S3 down, a flaky benchmark) is left to `backoffLimit`.
The table below is the single source for that mapping; docs/errors.md is generated from it
(devstack/generate/errors_table.py; a test compares).
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


def kind_for_exit_code(code: int) -> ErrorKind | None:
    """Reverse lookup used by the operator when it only sees a container's exit code."""
    for kind in KINDS.values():
        if kind.exit_code == code:
            return kind
    return None

