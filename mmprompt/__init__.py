"""mmprompt: prompt and bias adapters for a frozen CLIP, and the analysis of how they work."""

__version__ = "0.1.0"
