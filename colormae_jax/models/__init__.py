"""The networks: the MAE ViT, classification heads, UperNet, position tables."""
