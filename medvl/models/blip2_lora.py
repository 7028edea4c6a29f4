"""The old import path of the BLIP-2 recipe (it trained LoRA only then): everything lives in :mod:`medvl.models.blip2`."""
from medvl.models.blip2 import *  # noqa: F401,F403
from medvl.models.blip2 import Blip2LoraRecipe, Blip2Recipe, export_merged, save_tiny_blip2  # noqa: F401
