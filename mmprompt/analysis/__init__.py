"""Why prompts work: the prompt decomposition, attention statistics, overlays, route interventions
and prompt analysis (docs/analysis.md §1-4). The callbacks run inside ``mmprompt test``.

They read a trained model through the seam (attention sites, injections) and the masks of the data.
May import: `model`, `data`, `results`, `tables`.
Never imports: `run`, `tools`.
"""

from .decomposition import Decomposition, decompose, decompose_scores
from .interventions import (
    MODES, InterventionProbe, InterventionTable, MeanBiasCollector, RouteIntervention, estimate_mean_bias,
    evaluate_interventions,
)
from .overlays import attention_maps, attention_rollout, compare_attention_overlays
from .prompts import PromptAnalysis, nearest_words, vision_prompt_similarity, write_prompt_analysis
from .statistics import AttentionAccumulator, AttentionStatistics, StatisticsProbe, foreground_statistics

__all__ = [
    "MODES",
    "AttentionAccumulator",
    "AttentionStatistics",
    "Decomposition",
    "InterventionProbe",
    "InterventionTable",
    "MeanBiasCollector",
    "PromptAnalysis",
    "RouteIntervention",
    "StatisticsProbe",
    "attention_maps",
    "attention_rollout",
    "compare_attention_overlays",
    "decompose",
    "decompose_scores",
    "estimate_mean_bias",
    "evaluate_interventions",
    "foreground_statistics",
    "nearest_words",
    "vision_prompt_similarity",
    "write_prompt_analysis",
]
