"""WAPS-Quant post-training quantization (PyTorch only; knows nothing of TVM).

Data flow: capture (torch.export → Graph) → fold_bn → fuse → blocks → calibrate
(quantizers, rounding, product_groups, reconstruct, cwac) → artifact (.waps).
"""
