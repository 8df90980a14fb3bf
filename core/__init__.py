"""Unleashing Mask (UM) and UMAP for out-of-distribution detection, as a plain PyTorch library."""
