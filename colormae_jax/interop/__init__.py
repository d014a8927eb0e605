"""Pre-trained weights in: our checkpoints, PyTorch (official MAE, timm, mmpretrain) and Hugging Face."""
