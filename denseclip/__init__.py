"""DenseCLIP in plain PyTorch."""
