# syntax=docker/dockerfile:1.7
# Two images from one file (docs/deploy.md has the login, build and push commands; the chart's
# default image names are what they produce):
#   docker build --target operator -t ghcr.io/enginebuild/operator:0.1.0 .
#   docker build --target builder  -t ghcr.io/enginebuild/builder:0.1.0 .
# `operator` is the control plane: Python slim, no torch. `builder` runs the build Jobs: NVIDIA's
# TensorRT container (it ships trtexec; TensorRT is not installable from PyPI), the `builder` extra,
# and ModelOpt's CUDA extensions compiled here, so no GPU Job spends a minute JIT-compiling them.
# Versions are pinned: base images by tag, Python packages by requirements.lock (used as constraints).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# TensorRT 10.x with CUDA 13 (torch 2.14 wheels are CUDA 13 builds; nvcc must match torch's CUDA major
# for the extension build). Pick the NGC release whose TensorRT you deploy against: engines only run
# on the TensorRT version that built them, and the report records trtexec's version.
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:25.10-py3

# ---------------------------------------------------------------------------------------------------
# Source tree shared by both images: only what `pip install .` needs.
FROM ${PYTHON_IMAGE} AS source
WORKDIR /src
COPY pyproject.toml requirements.lock builder-gpu.lock README.md ./
COPY contract/ contract/
COPY builder/ builder/
COPY operator/ operator/
COPY cli/ cli/

# ---------------------------------------------------------------------------------------------------
# Wheels for the operator image, built apart so the final image has no build tooling.
FROM ${PYTHON_IMAGE} AS operator-wheels
COPY --from=source /src /src
WORKDIR /src
# /src/operator/ would shadow the stdlib `operator` module for `python -m ...` run from /src.
ENV PYTHONSAFEPATH=1
RUN python -m pip install --no-cache-dir setuptools==84.2.1 wheel==0.48.0 \
 && python -m pip wheel --no-cache-dir --no-build-isolation -c requirements.lock --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS operator
LABEL org.opencontainers.image.title="enginebuild operator" \
      org.opencontainers.image.description="Kubernetes operator for EngineBuild (CLIP to FP8 TensorRT engines)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=operator-wheels /wheels /wheels
# No extras: pydantic, kopf, kubernetes, boto3, prometheus-client. torch stays out of this image.
RUN python -m pip install --no-cache-dir --no-index --find-links /wheels enginebuild \
 && rm -rf /wheels \
 && groupadd --system --gid 10001 enginebuild \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin enginebuild \
 && python -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch leaked into the operator image'"
# Matches the chart's podSecurityContext (runAsUser 10001); the root filesystem can be read-only.
USER 10001:10001
EXPOSE 9090 8080
ENTRYPOINT ["enginebuild"]
CMD ["operator", "--all-namespaces"]

# ---------------------------------------------------------------------------------------------------
FROM ${TENSORRT_IMAGE} AS builder
LABEL org.opencontainers.image.title="enginebuild builder" \
      org.opencontainers.image.description="ONNX export, FP8 quantization (ModelOpt) and trtexec engine builds" \
      org.opencontainers.image.licenses="Apache-2.0"
# Compute capabilities the extensions are compiled for: Ampere (8.0, 8.6), Ada (8.9, L40S), Hopper (9.0),
# Blackwell (10.0, 12.0). Kept in the environment so ModelOpt's runtime load sees the same build flags
# and finds the compiled extension up to date instead of rebuilding it.
ENV TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0;12.0" \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/src/tensorrt/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONSAFEPATH=1
COPY --from=source /src /src
WORKDIR /src
# A venv: the container's system Python is externally managed (PEP 668). ninja builds the extensions.
# ONNX Runtime's CUDA build (builder-gpu.lock) replaces the CPU one, so the accuracy gate runs on the GPU
# (ViT-L-14 on an H200: 3.7 s instead of 40 s of CPU time); without a GPU it falls back to the CPU.
RUN python3 -m venv /opt/venv \
 && python -m pip install --no-cache-dir setuptools==84.2.1 wheel==0.48.0 \
 && python -m pip install --no-cache-dir --no-build-isolation -c requirements.lock ".[builder]" ninja \
 && python -m pip uninstall -y onnxruntime \
 && python -m pip install --no-cache-dir --no-deps -r builder-gpu.lock \
 && python -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers(), o.get_available_providers()" \
 && command -v trtexec \
 && rm -rf /src
WORKDIR /
# Compile ModelOpt's CUDA extensions now, with the same names, sources and flags as
# modelopt.torch.quantization.extensions, so torch's JIT loader finds them built. No GPU is needed to
# compile (TORCH_CUDA_ARCH_LIST is set); importing may need the driver, which only exists at run time.
RUN python <<'PY'
import glob
import os

import torch.utils.cpp_extension as cpp
from modelopt.torch.quantization import extensions

gemm = extensions.kernels_gemm
specs = [
    ("modelopt_cuda_ext", [gemm / "tensor_quant.cpp", gemm / "tensor_quant_gpu.cu"], {}),
    ("modelopt_cuda_ext_fp8", [gemm / "tensor_quant_gpu_fp8.cu"], {}),
    ("modelopt_cuda_ext_mx", [gemm / "tensor_quant_mx.cu"], {"extra_cuda_cflags": ["--use_fast_math"]}),
]
for name, sources, kwargs in specs:
    try:
        cpp.load(name, sources, **kwargs)
    except ImportError as exc:  # built; loading needs libcuda from the NVIDIA runtime
        print(f"{name}: built, import deferred to run time ({exc})")
    built = glob.glob(os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "*", name, name + ".so"))
    assert built, f"{name} was not compiled"
    print(f"{name}: {built[0]}")
PY
# uid 1000 is what the operator's Jobs run as (runAsUser 1000); the extension folder stays writable
# for torch's build lock. Ubuntu-based NGC images may already have a uid-1000 user.
RUN (getent passwd 1000 >/dev/null || useradd --uid 1000 --user-group --create-home --shell /bin/bash builder) \
 && chown -R 1000:1000 /opt/torch_extensions \
 && mkdir -p /work && chown 1000:1000 /work
USER 1000:1000
WORKDIR /work
ENTRYPOINT ["enginebuild"]
CMD ["build", "--help"]
