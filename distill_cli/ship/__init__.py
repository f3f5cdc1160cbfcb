"""The ship layer: what happens to a trained network after training. `distill eval` (quality, cost, speed),
`distill export` (ONNX / torch.export, checked against PyTorch), `distill quantize` (int8 for the CPU).

May import: `core`, `data`, `models`, `training`, and other `ship` modules.
"""
