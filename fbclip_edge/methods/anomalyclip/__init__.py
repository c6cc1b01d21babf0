"""AnomalyCLIP (ICLR 2024): frozen CLIP with a V-V side stream, learned object-agnostic
text prompts. Pure torch."""

from fbclip_edge.methods.anomalyclip.config import AnomalyCLIPConfig
from fbclip_edge.methods.anomalyclip.losses import LossTerms
from fbclip_edge.methods.anomalyclip.model import AnomalyCLIP, AnomalyCLIPIntermediates

__all__ = ["AnomalyCLIP", "AnomalyCLIPConfig", "AnomalyCLIPIntermediates", "LossTerms"]
