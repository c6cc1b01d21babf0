"""FiLo (ACM MM 2024): CLIP with image-conditioned fine-grained prompts, an adapter, linear and
multi-shape convolution heads, and Grounding DINO boxes (their host side). Pure torch.

FiLo does not fit `AnomalyModel` (its text features depend on the image, the category and the
position word), so it is not in the method registry; `METHOD_INFO` carries what a registry
entry would need.
"""

from dataclasses import dataclass

from fbclip_edge.methods.base import TrainRecipe
from fbclip_edge.methods.filo.boxes import BertVocab, BoxResult, grounding_caption, locate
from fbclip_edge.methods.filo.config import FiLoConfig
from fbclip_edge.methods.filo.descriptions import CategoryData, load_descriptions
from fbclip_edge.methods.filo.folder import FiLoFolder, is_filo_folder, load_filo, save_filo
from fbclip_edge.methods.filo.importer import export_official, import_official, looks_like
from fbclip_edge.methods.filo.model import FiLo, FiLoOutput, FiLoText, FiLoVision


@dataclass(frozen=True)
class FiLoMethodInfo:
    """Registry-style metadata: name, importer, and the two-stage training recipe (spec 9)."""

    name: str
    title: str
    stage1: TrainRecipe  # heads (lr) and prompt learners (prompt_lr), AdamW
    stage1_prompt_lr: float
    stage2: TrainRecipe  # adapter only, AdamW
    import_hint: str


METHOD_INFO = FiLoMethodInfo(
    name="filo",
    title="FiLo (ACM MM 2024)",
    stage1=TrainRecipe(lr=1e-4, betas=(0.5, 0.999), batch_size=1, epochs=15, seed=0),
    stage1_prompt_lr=1e-3,
    stage2=TrainRecipe(lr=1e-5, betas=(0.5, 0.999), batch_size=1, epochs=5, seed=0),
    import_hint="import_official('filo_checkpoint.pth', backbone='ViT-L-14-336')",
)

__all__ = [
    "METHOD_INFO",
    "BertVocab",
    "BoxResult",
    "CategoryData",
    "FiLo",
    "FiLoConfig",
    "FiLoFolder",
    "FiLoMethodInfo",
    "FiLoOutput",
    "FiLoText",
    "FiLoVision",
    "export_official",
    "grounding_caption",
    "import_official",
    "is_filo_folder",
    "load_descriptions",
    "load_filo",
    "locate",
    "looks_like",
    "save_filo",
]
