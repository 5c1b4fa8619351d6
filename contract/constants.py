"""Constants shared by builder and operator: names, labels, limits. One place, no magic literals."""

from __future__ import annotations

GROUP = "enginebuild.io"
VERSION = "v1alpha1"
KIND = "EngineBuild"
PLURAL = "enginebuilds"
SHORT_NAME = "eb"

MIN_ONNX_OPSET = 20
MAX_BATCH_SIZE = 4096

REPORT_FILE = "report.json"
MANIFEST_FILE = "manifest.json"
# "major.minor" of report.json and the termination-message summary (docs/report.md): a reader accepts
# every minor of the major it knows (new minors only add optional fields) and refuses another major.
REPORT_SCHEMA_VERSION = "1.1"
# Kubernetes truncates termination messages at 4096 bytes; the summary must fit.
TERMINATION_MESSAGE_MAX_BYTES = 4096
TERMINATION_MESSAGE_PATH = "/dev/termination-log"

# trtexec flags a spec may add. Everything that changes what is built or where files go is ours.
TRTEXEC_ALLOWED_EXTRA_FLAGS: frozenset[str] = frozenset(
    {
        "--builderOptimizationLevel",
        "--maxAuxStreams",
        "--memPoolSize",
        "--avgRuns",
        "--streams",
        "--useSpinWait",
        "--threads",
        "--tilingOptimizationLevel",
        "--sparsity",
        "--hardwareCompatibilityLevel",
        "--profilingVerbosity",
        "--avgTiming",
        "--infStreams",
        "--persistentCacheRatio",
    }
)
TRTEXEC_FORBIDDEN_CHARS = frozenset(";|&$`<>\\\n\r'\"() *?{}[]!#~")

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
APP_NAME = "enginebuild"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"
