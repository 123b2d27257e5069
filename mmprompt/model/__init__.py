"""The model side: the frozen CLIP seam, the backbone and the LightningModules."""
