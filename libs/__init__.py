"""U-ViT library: networks, data, training and evaluation engines shared by the entry scripts."""
