"""ONNX helpers shared by export and engine building: graph checks and FP8 folding (onnx_checks),
freeing a static batch axis (batch_axis), external-data I/O (onnx_io), ONNX Runtime sessions
(ort_runner). `import onnx` inside this package is still the onnx distribution (absolute imports)."""
