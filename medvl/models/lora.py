"""peft LoRA helpers shared by the BLIP-2 and soft-prompt recipes.

A LoRA "model folder" in medvl is a plain peft adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``): it names its base model in ``base_model_name_or_path`` and loads with
``PeftModel.from_pretrained(base, folder)``. Checkpoints therefore hold megabytes of adapter, not a copy of
the multi-GB base; the price is that the base must still be reachable (hub id or folder) where it is loaded.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from medvl.spec import ModelSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

#: Attention projections adapted when ``model.lora_target_modules`` is empty, by ``config.model_type``.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "opt": ["q_proj", "k_proj"],
    "gpt2": ["c_attn"],  # GPT-2 fuses q, k, v into one Conv1D
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
}


def is_adapter_folder(source: str | Path) -> bool:
    return (Path(source) / ADAPTER_CONFIG).is_file()


def adapter_base(folder: str | Path) -> str:
    """The base model (hub id or folder) an adapter folder was trained on."""
    return json.loads((Path(folder) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def base_model_source(source: str) -> str:
    """``source`` itself, or the base of the adapter folder it names."""
    return adapter_base(source) if is_adapter_folder(source) else source


def target_modules(spec: ModelSpec, model_type: str) -> list[str]:
    if spec.lora_target_modules:
        return list(spec.lora_target_modules)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"model.lora_target_modules: no default for language model type {model_type!r}; "
            "name its attention projections, e.g. [q_proj, v_proj]"
        )
    return DEFAULT_TARGETS[model_type]


def lora_config(spec: ModelSpec, targets: list[str] | str, fan_in_fan_out: bool = False) -> LoraConfig:
    """``targets``: module-name suffixes, or one regex that must match the whole module name."""
    return LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,  # GPT-2's Conv1D stores weights transposed
        bias="none",
    )


def scoped_targets(prefix: str, names: list[str]) -> str:
    """A peft regex that adapts ``names`` only under the submodule ``prefix`` (e.g. the language model)."""
    alternatives = "|".join(re.escape(name) for name in names)
    return rf"(.*\.)?{re.escape(prefix)}\..*\.({alternatives})"


def with_adapter(base: torch.nn.Module, source: str, config: LoraConfig, trainable: bool) -> PeftModel:
    """``base`` with the adapter saved in ``source`` when it is an adapter folder, else a fresh one."""
    if is_adapter_folder(source):
        return PeftModel.from_pretrained(base, source, is_trainable=trainable)
    return get_peft_model(base, config)


def load_adapter_weights(model: PeftModel, folder: str | Path) -> None:
    """Copy a saved adapter's weights into ``model`` (which already carries an adapter of the same shape)."""
    result = set_peft_model_state_dict(model, load_file(Path(folder) / ADAPTER_WEIGHTS))
    if result.unexpected_keys:
        raise RuntimeError(f"adapter {folder} does not match the model: {result.unexpected_keys[:5]}")


def widen_frozen_head(language_model: torch.nn.Module, std: float = 0.3) -> None:
    """Redraw a random-init LM's output head with std 0.3 instead of 0.02 (untie it from the input embeddings first).

    LoRA leaves the output head frozen. With the usual 0.02 init, logits of a normalised hidden state span
    about ±0.2, every next-token distribution stays near uniform and the loss cannot fall far below
    ln(vocab) whatever the adapters learn. A wider head tied to the input embeddings does not help either: the
    residual stream is then mostly the current token's embedding and the LM predicts that token again with a
    large logit. A pretrained LM has neither problem.
    """
    head = language_model.get_output_embeddings().weight
    if head is language_model.get_input_embeddings().weight:
        raise ValueError(
            "widen_frozen_head: the output head is tied to the input embeddings (set tie_word_embeddings=False)"
        )
    with torch.no_grad():
        head.normal_(0.0, std)


def require_quantisation_support(quantisation: str = "8bit") -> None:
    """8- and 4-bit loading need bitsandbytes kernels, which run on CUDA only: fail with what to do instead."""
    import importlib.util

    field = f"model.load_in_{quantisation}"
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(
            f"{field} needs a CUDA GPU and the bitsandbytes package: set {field}: false, or run on a GPU worker "
            "(train.use_gpu: true) with bitsandbytes installed (pip install 'medvl[quantisation]')"
        )


def quantisation_config(quantisation: str, compute_dtype: torch.dtype):
    """bitsandbytes' settings: 8-bit (LLM.int8), or 4-bit NF4 with double quantisation as QLoRA trains."""
    from transformers import BitsAndBytesConfig

    if quantisation == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantisation == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    raise ValueError(f"quantisation: expected 8bit or 4bit, got {quantisation!r}")


require_8bit_support = require_quantisation_support  # the name before 4-bit joined
