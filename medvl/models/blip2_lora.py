"""The old import path of the BLIP-2 recipe (it trained LoRA only then): everything lives in :mod:`medvl.models.blip2`."""
from medvl.models.blip2 import (
    Blip2LoraRecipe,
    Blip2Preprocessor,
    Blip2Recipe,
    blip2_labels,
    export_merged,
    load_blip2,
    save_tiny_blip2,
    tiny_blip2_config,
)

__all__ = ["Blip2LoraRecipe", "Blip2Preprocessor", "Blip2Recipe", "blip2_labels", "export_merged", "load_blip2",
           "save_tiny_blip2", "tiny_blip2_config"]
