"""Adapters, one file per method; YAML picks one with ``class_path: mmprompt.adapters.<Name>``."""

from .base import Adapter, BuildContext
from .bias import BiasTuning
from .cocoop import CoCoOp
from .coop import CoOp
from .coupled_bias import CoupledBiasTuning
from .ivlp import IVLP
from .lora import LoRA
from .maple import MaPLe
from .text_deep import TextDeep
from .vpt import VPTDeep
from .zero_shot import ZeroShot

__all__ = [
    "Adapter", "BuildContext", "BiasTuning", "CoCoOp", "CoOp", "CoupledBiasTuning", "IVLP", "LoRA", "MaPLe",
    "TextDeep", "VPTDeep", "ZeroShot",
]
