"""Data plane of enginebuild: turns a CLIP checkpoint into FP16/FP8 ONNX files and TensorRT engines.

Modules here must not import torch at import time: the operator image imports the contract modules
(spec, report, errors, constants, storage) without the ML stack.
"""
