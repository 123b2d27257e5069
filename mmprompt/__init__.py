"""mmprompt: prompt and bias adapters for a frozen CLIP, and the analysis of how they work."""

__version__ = "0.1.0"


def load(checkpoint, classes=None, device="cpu"):
    """A trained checkpoint as a `mmprompt.run.inference.Classifier` (``classify``, ``encode_images``,
    ``encode_text``); ``classes`` (names or a text file) replaces its own. Imported on first call, so
    ``import mmprompt`` stays free of torch."""
    from .run.inference import load as load_classifier

    return load_classifier(checkpoint, classes=classes, device=device)
