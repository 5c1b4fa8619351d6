"""Engine building on a GPU: trtexec builds and times FP16/FP8 engines (trtexec.py) and the PyTorch
FP16 eager baseline (pytorch_baseline.py). Run as stages by stages/engine.py and stages/baseline.py."""
