"""The export half's machinery: load the checkpoint, calibrate, quantize to FP8, export FP16 and FP8
ONNX, and the accuracy gate (accuracy_gate.py). Run as a stage by stages/export.py."""
