"""``medvl plan``: parameters and per-GPU memory of a job spec's training, before any GPU is rented.

The model is the recipe's real architecture (:mod:`medvl.models.architectures`) built on the meta device
(shapes, no storage: nothing is allocated, whatever the size) with the spec's finetune policy applied by the
recipe's own functions (peft LoRA with the recipe's scoped targets, the BLIP freezing policies, …), so
``params_trainable`` is what the training run would hand its optimizer. Ray is never imported.

Model states per GPU, N GPUs, Ψ parameters of which T train, L = the largest module's own parameters
(DeepSpeed's ``largest_layer_params``), mixed 16-bit precision (``train.precision`` auto/bf16/fp16; ``auto``
is planned as bf16, the GPU case):

================  ============================  ======================  ==========================
strategy          weights                       gradients               optimizer (AdamW)
================  ============================  ======================  ==========================
DDP               w·(Ψ − T) + 4·T               4·T (+ 4·T of DDP       8·T (fp32 m, v)
                                                buckets on N > 1)
ZeRO-2            2·Ψ (16-bit copy)             6·T/N (16-bit + fp32)   12·T/N (fp32 master, m, v)
ZeRO-3            2·Ψ/N + 2·L                   4·T/N + 2·L             12·T/N
ZeRO-3 + offload  2·L                           2·L                     0 (CPU: 1.5 × (2·Ψ + 16·T))
================  ============================  ======================  ==========================

These are DeepSpeed's own estimators (``estimate_zero2/3_model_states_mem_needs``: 2Ψ + 18Ψ/N; 4L + 18Ψ/N;
4L with params and optimizer offloaded; CPU 18Ψ × 1.5) split into parts and generalised to frozen
parameters: a frozen parameter costs its 16-bit copy only. With every parameter trainable they reduce to
DeepSpeed's figures exactly; tests/test_plan.py checks that. Under DDP the frozen weights stay in
``model.dtype`` (w bytes: ``auto`` is planned as bf16, the GPU case) and the trainable ones are fp32
(:func:`medvl.models.precision.keep_trainable_in_fp32`), with fp32 gradients and AdamW state; frozen modules
HF keeps in fp32 whatever the dtype (``_keep_in_fp32_modules``: BLIP-2's Q-Former) count 4 bytes. DeepSpeed casts
the whole module to 16 bits and keeps the fp32 master copy in its optimizer; in fp32 (``train.precision:
fp32``) it stores 4-byte weights and gradients and 8 bytes of AdamW state per trainable parameter.

Activations per GPU (micro-batch b = ``train.batch_size``), per transformer layer of hidden size h, a heads,
FFN width f, s tokens, in 16-bit values (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", generalised from f = 4h to any f and to gated FFNs):

* self-attention 11·s·b·h + 5·a·s²·b bytes, two layer norms 4·s·b·h;
* FFN 3·s·b·h + 4·s·b·f (GELU/ReLU; 34·s·b·h in all for f = 4h, the paper's figure), or 2·s·b·h + 8·s·b·f
  for a gated FFN (LLaMA's SwiGLU);
* a cross-attention to c tokens of width h_c: 9·s·b·h + 4·c·b·h + 5·a·s·c·b;
* with full activation checkpointing, 2·s·b·h per layer (its input) plus one layer's full set (recomputed
  in backward) for the largest tower;
* the LM's logits: 10·s·b·V (16-bit logits, their fp32 copy for the loss and its log-softmax);
* a CNN (ResNet) tower: the outputs of its convolutions, norms and activations, measured by a forward pass on
  the meta device; checkpointing does not change it.

fp32 training (``train.precision: fp32``) doubles the activation bytes. A tower's activations count only
when it or a tower before it trains: a frozen vision encoder in front of a LoRA language model runs without
building an autograd graph.

What it leaves out: the CUDA context and allocator fragmentation (the fit check keeps 2 GiB of every card
free for them), NCCL and DeepSpeed communication buckets (``reduce_bucket_size``, ``allgather_bucket_size``:
DeepSpeed's defaults are ~0.5 B elements but ZeRO-3's ``stage3_prefetch_bucket_size`` etc. are tunable), the
autocast weight-cast cache (16-bit copies of trainable weights during a DDP forward), temporaries inside a
layer's backward, attention kernels that store no s×s scores (SDPA/flash: the 5·a·s² terms drop out, so the
estimate is an upper bound there), the frozen EMA teacher's forward (no graph) and generation at eval time.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from medvl.spec import JobSpec

GIB = 2**30
CUDA_RESERVE_GIB = 2.0  # CUDA context + allocator fragmentation, kept free on every card by the fit check
#: Cards by their marketing size → memory in GiB as nvidia-smi reports it (24,564 / 40,960 / 81,559 / 143,771 MiB).
CARDS_GIB: dict[str, float] = {"24": 23.99, "40": 40.0, "80": 79.65, "141": 140.4}
STRATEGIES = ("ddp", "zero2", "zero3", "zero3_offload")
STRATEGY_TITLES = {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "zero3_offload": "ZeRO-3 + offload"}


# --------------------------------------------------------------------------------------------- towers


@dataclass(frozen=True)
class Tower:
    """One stack of transformer layers (or a CNN) whose activations are estimated, in forward order."""

    name: str
    prefixes: tuple[str, ...]  # parameter-name parts that belong to it (a parameter matches if it contains one)
    layers: int = 0
    hidden: int = 0
    heads: int = 1
    ffn: int = 0
    tokens: int = 0
    gated_ffn: bool = False
    cross_tokens: int = 0  # tokens a cross-attention attends to (0: none)
    cross_hidden: int = 0
    cross_every: int = 1  # a cross-attention in every k-th layer
    passes: int = 1  # forward passes per sample (DAPT's ITM runs the text encoder on three pairings)
    vocab: int = 0  # an LM head over this many tokens (0: none)
    cnn_values: int = 0  # CNN towers: values stored per sample (measured on meta)
    cnn_flops: int = 0  # CNN towers: forward FLOPs per sample of their convolutions (measured on meta)

    def cross_layers(self) -> int:
        return self.layers // self.cross_every if self.cross_tokens else 0


def layer_bytes(tower: Tower, cross: bool) -> float:
    """16-bit activation bytes one layer stores for backward, per sample (see the module docstring)."""
    s, h, a, f = tower.tokens, tower.hidden, tower.heads, tower.ffn
    attention = 11 * s * h + 5 * a * s * s
    norms = 4 * s * h
    ffn = 2 * s * h + 8 * s * f if tower.gated_ffn else 3 * s * h + 4 * s * f
    total = attention + norms + ffn
    if cross:
        c = tower.cross_tokens
        total += 9 * s * h + 4 * c * h + 5 * a * s * c
    return float(total)


def tower_activation_bytes(tower: Tower, checkpointing: bool) -> tuple[float, float]:
    """(stored bytes per sample, one layer's working set per sample) for a tower; 16-bit values."""
    if tower.cnn_values:
        return 2.0 * tower.cnn_values * tower.passes, 0.0
    widest = layer_bytes(tower, cross=tower.cross_tokens > 0)
    if checkpointing:
        stored = 2.0 * tower.tokens * tower.hidden * tower.layers
    else:
        stored = layer_bytes(tower, cross=False) * (tower.layers - tower.cross_layers())
        stored += layer_bytes(tower, cross=True) * tower.cross_layers()
    logits = 10.0 * tower.tokens * tower.vocab
    return (stored + logits) * tower.passes, widest * tower.passes


def activation_bytes(towers: list[Tower], trains: list[bool], batch: int, checkpointing: bool,
                     fp32: bool) -> float:
    """Activation bytes per GPU for a micro-batch: towers that (or whose upstream) train, see the docstring."""
    total, working_set, upstream_trains = 0.0, 0.0, False
    for tower, tower_trains in zip(towers, trains):
        upstream_trains = upstream_trains or tower_trains
        if not upstream_trains:
            continue
        stored, widest = tower_activation_bytes(tower, checkpointing)
        total += stored
        working_set = max(working_set, widest)
    if checkpointing:
        total += working_set
    return total * batch * (2 if fp32 else 1)


# --------------------------------------------------------------------------------------------- model states


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU of one strategy's weights, gradients and optimizer state (plus CPU bytes when offloaded)."""

    weights: float
    gradients: float
    optimizer: float
    cpu: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def model_states(strategy: str, total: int, trainable: int, largest_layer: int, gpus: int,
                 sixteen_bit: bool, weight_bytes: float, frozen_fp32: int = 0) -> ModelStates:
    """Per-GPU model-state bytes (see the table in the module docstring). DDP only: ``weight_bytes`` per frozen
    weight (``model.dtype``), except ``frozen_fp32`` frozen weights HF keeps in fp32 whatever the dtype."""
    n, psi, t, big = gpus, float(total), float(trainable), float(largest_layer)
    if strategy == "ddp":  # frozen weights in model.dtype, trainable ones (and their states) in fp32
        buckets = 4 * t if n > 1 else 0.0  # DDP keeps a second copy of the gradients in its buckets
        frozen = weight_bytes * (psi - t - frozen_fp32) + 4 * frozen_fp32
        return ModelStates(frozen + 4 * t, 4 * t + buckets, 8 * t)
    if not sixteen_bit:  # DeepSpeed in fp32: 4-byte weights and gradients, AdamW m and v, no master copy
        if strategy == "zero2":
            return ModelStates(4 * psi, 4 * t / n, 8 * t / n)
        gathered = 4 * big
        if strategy == "zero3":
            return ModelStates(4 * psi / n + gathered, 4 * t / n + gathered, 8 * t / n)
        return ModelStates(gathered, gathered, 0.0, cpu=1.5 * (4 * psi + 12 * t))
    if strategy == "zero2":
        return ModelStates(2 * psi, 6 * t / n, 12 * t / n)
    if strategy == "zero3":
        return ModelStates(2 * psi / n + 2 * big, 4 * t / n + 2 * big, 12 * t / n)
    if strategy == "zero3_offload":
        return ModelStates(2 * big, 2 * big, 0.0, cpu=1.5 * (2 * psi + 16 * t))
    raise ValueError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")


# --------------------------------------------------------------------------------------------- the meta model


@dataclass
class MetaModel:
    """The training module on the meta device, its towers in forward order, and where its parameters are."""

    model: torch.nn.Module
    towers: list[Tower]
    notes: list[str] = field(default_factory=list)


def canonical_recipe(name: str) -> str:
    """``model.recipe`` with old names replaced (``blip2_lora`` → ``blip2``), as the registry resolves them."""
    from medvl.models.registry import canonical_name

    return canonical_name(name, warn=False)


def build_meta_model(spec: JobSpec) -> MetaModel:
    """The recipe's training module for ``spec``, on the meta device, with the spec's finetune policy applied."""
    recipe = canonical_recipe(spec.model.recipe)
    builders = {
        "blip_caption": _blip_caption,
        "blip_vqa": _blip_vqa,
        "blip_dapt": _blip_dapt,
        "blip2": _blip2,
        "softprompt_llm": _softprompt,
    }
    if recipe not in builders:
        raise ValueError(f"model.recipe: medvl plan knows {', '.join(builders)} (and blip2_lora), got {recipe!r}")
    meta = builders[recipe](spec)
    if spec.model.preset == "tiny":
        meta.notes.append(f"model.preset tiny is ignored: this plans the real {spec.model.name_or_path}")
    return meta


def _vit_tower(name: str, prefix: str, vision_config, image_size: int) -> Tower:
    patches = (image_size // vision_config.patch_size) ** 2 + 1  # + [CLS]
    return Tower(name, (prefix,), vision_config.num_hidden_layers, vision_config.hidden_size,
                 vision_config.num_attention_heads, vision_config.intermediate_size, patches)


def _bert_tower(name: str, prefixes: tuple[str, ...], text_config, tokens: int, cross_tokens: int = 0,
                cross_hidden: int = 0, passes: int = 1, vocab: int = 0) -> Tower:
    return Tower(name, prefixes, text_config.num_hidden_layers, text_config.hidden_size,
                 text_config.num_attention_heads, text_config.intermediate_size, tokens,
                 cross_tokens=cross_tokens, cross_hidden=cross_hidden, passes=passes, vocab=vocab)


def _blip_on_meta(spec: JobSpec, class_name: str):
    import transformers

    from medvl.models.architectures import build_on_meta, real_config

    return build_on_meta(real_config(spec.model.name_or_path), getattr(transformers, class_name))


def _blip_caption(spec: JobSpec) -> MetaModel:
    from medvl.models.blip_caption import apply_blip_finetune_policy

    model = _blip_on_meta(spec, "BlipForConditionalGeneration")
    apply_blip_finetune_policy(model, spec.train.finetune)
    config = model.config
    vision = _vit_tower("vision", "vision_model.", config.vision_config, spec.data.image_size)
    decoder = _bert_tower("text decoder", ("text_decoder.",), config.text_config, spec.data.max_text_length + 2,
                          vision.tokens, config.vision_config.hidden_size, vocab=config.text_config.vocab_size)
    return MetaModel(model, [vision, decoder])


def _vqa_towers(spec: JobSpec, config, prefix: str) -> list[Tower]:
    vision = _vit_tower("vision", f"{prefix}vision_model.", config.vision_config, spec.data.image_size)
    question = spec.data.max_question_length + 2
    encoder = _bert_tower("question encoder", (f"{prefix}text_encoder.",), config.text_config, question,
                          vision.tokens, config.vision_config.hidden_size)
    decoder = _bert_tower("answer decoder", (f"{prefix}text_decoder.",), config.text_config,
                          spec.data.max_text_length + 2, question, config.text_config.hidden_size,
                          vocab=config.text_config.vocab_size)
    return [vision, encoder, decoder]


def _blip_vqa(spec: JobSpec) -> MetaModel:
    from medvl.models.blip_vqa import apply_vqa_finetune_policy

    model = _blip_on_meta(spec, "BlipForQuestionAnswering")
    apply_vqa_finetune_policy(model, spec.train.finetune)
    return MetaModel(model, _vqa_towers(spec, model.config, ""))


def _blip_dapt(spec: JobSpec) -> MetaModel:
    from medvl.models.blip_dapt import BlipDaptModel, DaptNet
    from medvl.models.blip_vqa import apply_vqa_finetune_policy

    blip = _blip_on_meta(spec, "BlipForQuestionAnswering")
    with torch.device("meta"):
        model = BlipDaptModel(DaptNet(blip), distill=spec.model.distill)
    apply_vqa_finetune_policy(model.student, spec.train.finetune, vision_prefix="blip.vision_model.")
    config, text = blip.config, spec.data.max_text_length + 2
    vision = _vit_tower("vision", "student.blip.vision_model.", config.vision_config, spec.data.image_size)
    itc = _bert_tower("text encoder (ITC)", ("student.blip.text_encoder.",), config.text_config, text)
    itm = _bert_tower("text encoder (ITM ×3)", ("student.blip.text_encoder.", "student.itm_head"),
                      config.text_config, text, vision.tokens, config.vision_config.hidden_size, passes=3)
    decoder = _bert_tower("text decoder", ("student.blip.text_decoder.",), config.text_config, text,
                          vision.tokens, config.vision_config.hidden_size, vocab=config.text_config.vocab_size)
    notes = ["the EMA teacher (model.distill) is counted in params_total: its weights sit on every GPU"] \
        if spec.model.distill else []
    return MetaModel(model, [vision, itc, itm, decoder], notes)


def _blip2(spec: JobSpec) -> MetaModel:
    from peft import get_peft_model

    from medvl.models.blip2 import apply_blip2_policy, check_policy
    from medvl.models.lora import lora_config, scoped_targets, target_modules

    check_policy(spec.train.finetune, spec.model.load_in_8bit, spec.model.load_in_4bit)
    model = _blip_on_meta(spec, "Blip2ForConditionalGeneration")
    config = model.config
    if spec.train.finetune == "lora":  # as Blip2Recipe.load_for_training: peft freezes every non-adapter weight
        targets = target_modules(spec.model, config.text_config.model_type)
        with torch.device("meta"):  # the adapters too: peft builds them beside their (meta) base layers
            model = get_peft_model(model, lora_config(spec.model, scoped_targets("language_model", targets)))
    else:
        apply_blip2_policy(model, spec.train.finetune)
    vision = _vit_tower("vision", "vision_model.", config.vision_config, spec.data.image_size)
    q = config.qformer_config
    qformer = Tower("Q-Former", ("qformer.", "query_tokens", "language_projection."), q.num_hidden_layers,
                    q.hidden_size, q.num_attention_heads, q.intermediate_size, config.num_query_tokens,
                    cross_tokens=vision.tokens, cross_hidden=q.encoder_hidden_size,
                    cross_every=q.cross_attention_frequency)
    lm = causal_lm_tower("language model", ("language_model.",), config.text_config,
                          config.num_query_tokens + spec.data.max_text_length + 2)
    return MetaModel(model, [vision, qformer, lm])


def causal_lm_tower(name: str, prefixes: tuple[str, ...], config, tokens: int) -> Tower:
    """OPT, GPT-2 or LLaMA-style configs (their field names differ)."""
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    if config.model_type == "gpt2":
        ffn, gated = config.n_inner or 4 * hidden, False
    elif config.model_type == "opt":
        ffn, gated = config.ffn_dim, False
    else:  # LLaMA, Mistral: SwiGLU
        ffn, gated = config.intermediate_size, True
    return Tower(name, prefixes, layers, hidden, heads, ffn, tokens, gated_ffn=gated, vocab=config.vocab_size)


def _cnn_census(vision: torch.nn.Module, image_size: int) -> tuple[int, int]:
    """(values a CNN stores for backward, forward FLOPs of its convolutions) per image, from a forward on meta.

    Stored: the outputs of its convolutions, norms and activations. FLOPs: 2 × output values × (input channels
    / groups × kernel area) per convolution."""
    stored, flops = 0, 0

    def count(module, _inputs, output):
        nonlocal stored, flops
        stored += output.numel()
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            flops += 2 * output.numel() * kernel

    kinds = (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU)
    handles = [m.register_forward_hook(count) for m in vision.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            vision(pixel_values=torch.empty(1, 3, image_size, image_size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return stored, flops


def _softprompt(spec: JobSpec) -> MetaModel:
    import transformers

    from medvl.models.architectures import build_on_meta, real_config
    from medvl.models.softprompt_llm import apply_softprompt_policy, assemble_softprompt

    vision = build_on_meta(real_config(spec.model.vision_name_or_path), transformers.ResNetModel)
    lm_config = real_config(spec.model.name_or_path)
    lm = build_on_meta(lm_config, transformers.AutoModelForCausalLM)
    with torch.device("meta"):  # as SoftPromptRecipe.build starts fresh: LoRA on the LM unless model.lm_lora is off
        model = assemble_softprompt(vision, lm, spec.model, spec.model.name_or_path, spec.train.seed,
                                    fresh_lora=spec.model.lm_lora)
    apply_softprompt_policy(model, spec.train.finetune)
    width, prefix = model.config.vision_dim, model.config.num_prefix_tokens
    grid = math.ceil(spec.data.image_size / 32)  # ResNet-50 downsamples by 32
    stored, flops = _cnn_census(vision, spec.data.image_size)
    cnn = Tower("vision (ResNet)", ("vision.",), cnn_values=stored, cnn_flops=flops)
    mapper_tower = Tower("prefix mapper", ("mapper.",), 1, width, model.config.mapper_heads,
                         model.config.mapper_ffn_dim, prefix, cross_tokens=grid * grid, cross_hidden=width)
    lm_tower = causal_lm_tower("language model", ("lm.",), lm_config, prefix + spec.data.max_text_length + 2)
    return MetaModel(model, [cnn, mapper_tower, lm_tower])


# --------------------------------------------------------------------------------------------- counting


def unique_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Name → parameter, each shared (tied) parameter once under its first name."""
    return dict(model.named_parameters())  # named_parameters already skips duplicates (remove_duplicate=True)


def largest_layer_params(model: torch.nn.Module) -> int:
    """DeepSpeed's ``largest_layer_params``: the most parameters any one module holds itself (not recursing)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def frozen_fp32_params(model: torch.nn.Module) -> int:
    """Frozen parameters that HF loads in fp32 whatever ``model.dtype`` asks (``_keep_in_fp32_modules``, e.g.
    BLIP-2's Q-Former and query tokens)."""
    kept: dict[int, int] = {}
    for module in model.modules():
        keep = getattr(module, "_keep_in_fp32_modules", None) or []
        if not keep or not hasattr(module, "config"):
            continue
        for name, parameter in module.named_parameters():
            if not parameter.requires_grad and set(name.split(".")) & set(keep):
                kept[id(parameter)] = parameter.numel()
    return sum(kept.values())


def tower_trains(tower: Tower, parameters: dict[str, torch.nn.Parameter]) -> bool:
    return any(p.requires_grad and any(part in name for part in tower.prefixes) for name, p in parameters.items())


def is_on_meta(model: torch.nn.Module) -> bool:
    from medvl.models.architectures import is_on_meta as on_meta

    return on_meta(model)


# --------------------------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class FlopCount:
    """Training FLOPs of one sample (forward + backward), and the language model's tokens per sample."""

    train_per_sample: float
    forward_per_sample: float
    tokens_per_sample: int


MATMUL_MODULES = ("Linear", "Conv1D", "Conv2d", "NonDynamicallyQuantizableLinear")


def training_flops(meta: MetaModel) -> FlopCount:
    """Matmul FLOPs of one training sample, from the meta model (the usual MFU accounting, e.g. PaLM's 6N + attention).

    Every weight matrix (``nn.Linear``, GPT-2's ``Conv1D``, a ViT's patch ``Conv2d``) of a tower costs 2 FLOPs per
    weight per token forward; backward adds 4 when the weight trains (input and weight gradients), 2 when it is
    frozen but gradients flow through its tower (input gradient only: a frozen LM under LoRA), 0 when nothing at
    or before its tower trains (a frozen vision encoder in front of LoRA). Embedding lookups cost nothing; a tied
    LM head counts as the matmul it is. Attention scores add 4·s²·h per layer forward (4·s·c·h for a
    cross-attention), tripled when gradients flow. Cross-attention key/value projections run over the attended
    tokens. CNN towers count their convolutions (``cnn_flops``). Gradient flow is judged per tower, not per
    layer; biases, norms, softmax and the loss are left out (well under 1 % at these widths).
    """
    parameters = dict(meta.model.named_parameters())
    modules = [(name, m) for name, m in meta.model.named_modules() if type(m).__name__ in MATMUL_MODULES]
    forward, train, upstream_trains = 0.0, 0.0, False
    for tower in meta.towers:
        tower_trains_ = tower_trains(tower, parameters)
        flows = upstream_trains or tower_trains_
        upstream_trains = flows
        if tower.cnn_flops:
            fwd = float(tower.cnn_flops) * tower.passes
            forward, train = forward + fwd, train + fwd * (3 if tower_trains_ else 1)
            continue
        for name, module in modules:
            if not any(part in name + "." for part in tower.prefixes):
                continue
            is_cross_kv = "crossattention" in name and name.rsplit(".", 1)[-1] in ("key", "value")
            tokens = tower.cross_tokens if is_cross_kv else tower.tokens
            fwd = 2.0 * module.weight.numel() * tokens * tower.passes
            backward = 2.0 if module.weight.requires_grad else (1.0 if flows else 0.0)
            forward, train = forward + fwd, train + fwd * (1 + backward)
        s, h = tower.tokens, tower.hidden
        scores = 4.0 * s * s * h * tower.layers + 4.0 * s * tower.cross_tokens * h * tower.cross_layers()
        forward, train = forward + scores * tower.passes, train + scores * tower.passes * (3 if flows else 1)
    lm_tokens = next((t.tokens for t in reversed(meta.towers) if t.vocab), meta.towers[-1].tokens)
    return FlopCount(train, forward, lm_tokens)


# --------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class StrategyPlan:
    """GiB (2^30 bytes) per GPU for one strategy; ``cpu``: CPU RAM per node when offloaded."""

    weights: float
    gradients: float
    optimizer: float
    model_states: float
    activations: float
    activations_checkpointed: float
    total: float  # with the spec's checkpointing setting
    total_checkpointing_off: float
    total_checkpointing_on: float
    cpu: float
    fits: dict[str, bool]  # card size (GB) → total + reserve ≤ the card's memory


@dataclass(frozen=True)
class Plan:
    spec_name: str
    stage: str
    recipe: str
    model: str
    finetune: str
    precision: str
    weight_dtype: str
    params_total: int
    params_trainable: int
    largest_layer_params: int
    train_flops_per_sample: float  # forward + backward, see training_flops
    lm_tokens_per_sample: int
    batch_size: int
    checkpointing: bool
    towers: list[dict[str, Any]]
    gpus: int
    memory_gib: dict[str, StrategyPlan]
    by_gpus: dict[int, dict[str, StrategyPlan]]
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["by_gpus"] = {str(n): {k: asdict(v) for k, v in plans.items()} for n, plans in self.by_gpus.items()}
        return out


def planned_precision(spec: JobSpec) -> str:
    """``train.precision`` as :func:`medvl.models.precision.training_precision` resolves it on a bf16 GPU."""
    low = {"bfloat16": "bf16", "float16": "fp16"}
    if spec.train.precision != "auto":
        return spec.train.precision
    return low.get(spec.model.dtype, "bf16")


# Bytes per frozen weight that bitsandbytes holds quantised (LoRA only). Its per-block scales (~0.03 B a weight for
# NF4 with double quantisation) and the layers it leaves in model.dtype (embeddings, norms) are not counted.
QUANTISED = {"8bit": ("int8", 1.0), "4bit": ("nf4", 0.5)}


def planned_weight_dtype(spec: JobSpec) -> str:
    """``model.dtype`` as :func:`medvl.models.precision.weight_dtype` resolves it on a bf16 GPU (or the quantised
    format of ``model.load_in_8bit`` / ``load_in_4bit``)."""
    if spec.model.quantisation:
        return QUANTISED[spec.model.quantisation][0]
    if spec.model.dtype != "auto":
        return spec.model.dtype
    return {"fp16": "float16", "fp32": "float32"}.get(spec.train.precision, "bfloat16")


def weight_bytes_of(spec: JobSpec) -> float:
    if spec.model.quantisation:
        return QUANTISED[spec.model.quantisation][1]
    return 4 if planned_weight_dtype(spec) == "float32" else 2


def plan_job(spec: JobSpec, gpus: list[int] | None = None) -> list[Plan]:
    """One plan per train stage of ``spec`` (each with its stage's ``set`` applied); the spec itself if it has none."""
    stages = [stage for stage in spec.stages if stage.kind == "train"]
    if not stages:
        return [plan_spec(spec, gpus, stage="")]
    return [plan_spec(spec.for_stage(stage), gpus, stage=stage.name) for stage in stages]


def plan_spec(spec: JobSpec, gpus: list[int] | None = None, stage: str = "train") -> Plan:
    """The plan for ``spec`` on ``train.workers`` GPUs and every count in ``gpus`` (the last one is the headline)."""
    meta = build_meta_model(spec)
    if not is_on_meta(meta.model):
        raise RuntimeError("medvl plan: the model was allocated off the meta device")
    parameters = unique_parameters(meta.model)
    total = sum(p.numel() for p in parameters.values())
    trainable = sum(p.numel() for p in parameters.values() if p.requires_grad)
    largest = largest_layer_params(meta.model)
    frozen_fp32 = frozen_fp32_params(meta.model) if weight_bytes_of(spec) < 4 else 0
    trains = [tower_trains(tower, parameters) for tower in meta.towers]
    precision = planned_precision(spec)
    fp32 = precision == "fp32"
    weight_dtype, weight_bytes = planned_weight_dtype(spec), weight_bytes_of(spec)
    checkpointing = spec.train.checkpoints_activations
    batch = spec.train.batch_size
    activations = {on: activation_bytes(meta.towers, trains, batch, on, fp32) for on in (False, True)}

    counts = list(dict.fromkeys([spec.train.workers, *(gpus or [])]))
    by_gpus = {
        n: {
            strategy: _strategy_plan(
                model_states(strategy, total, trainable, largest, n, not fp32, weight_bytes, frozen_fp32),
                activations, checkpointing,
            )
            for strategy in STRATEGIES
        }
        for n in counts
    }
    headline = counts[-1]
    towers = [
        {"name": t.name, "tokens": t.tokens, "layers": t.layers, "hidden": t.hidden, "trains": on,
         "activations_stored": any(trains[: i + 1]), "image_size": spec.data.image_size if t.cnn_values else 0}
        for i, (t, on) in enumerate(zip(meta.towers, trains))
    ]
    flops = training_flops(meta)
    return Plan(spec.name, stage, canonical_recipe(spec.model.recipe), spec.model.name_or_path, spec.train.finetune,
                precision, weight_dtype, total, trainable, largest, flops.train_per_sample, flops.tokens_per_sample,
                batch, checkpointing, towers, headline, by_gpus[headline], by_gpus, meta.notes)


def _strategy_plan(states: ModelStates, activations: dict[bool, float], checkpointing: bool) -> StrategyPlan:
    off = (states.total + activations[False]) / GIB
    on = (states.total + activations[True]) / GIB
    total = on if checkpointing else off
    return StrategyPlan(
        weights=states.weights / GIB,
        gradients=states.gradients / GIB,
        optimizer=states.optimizer / GIB,
        model_states=states.total / GIB,
        activations=activations[False] / GIB,
        activations_checkpointed=activations[True] / GIB,
        total=total,
        total_checkpointing_off=off,
        total_checkpointing_on=on,
        cpu=states.cpu / GIB,
        fits={card: total + CUDA_RESERVE_GIB <= memory for card, memory in CARDS_GIB.items()},
    )


# --------------------------------------------------------------------------------------------- text output


def format_plan(plan: Plan) -> str:
    share = 100.0 * plan.params_trainable / plan.params_total
    title = f"{plan.spec_name}, stage {plan.stage}" if plan.stage else plan.spec_name
    lines = [
        f"{title}: {plan.recipe} on {plan.model}, train.finetune {plan.finetune}, precision "
        f"{plan.precision} (DDP: frozen weights {plan.weight_dtype}, trainable fp32)",
        f"parameters: {plan.params_total:,} total, {plan.params_trainable:,} trainable ({share:.2f} %); "
        f"largest layer {plan.largest_layer_params:,}; {plan.train_flops_per_sample / 1e12:.2f} TFLOP per training "
        "sample",
        f"activations per GPU for a micro-batch of {plan.batch_size} (train.batch_size), per sample: "
        + ", ".join(_tower_text(t) for t in plan.towers),
    ]
    for gpus, plans in plan.by_gpus.items():
        lines += ["", _table(gpus, plans, plan.checkpointing)]
    lines += ["", f"fits: total + {CUDA_RESERVE_GIB:g} GiB (CUDA context) within the card's memory; "
                  "GiB = 2^30 bytes. Estimates, not measurements: see `medvl.plan`'s docstring for what they omit."]
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def _tower_text(tower: dict[str, Any]) -> str:
    size = f"{tower['image_size']} px" if tower["image_size"] else f"{tower['tokens']} tokens"
    return f"{tower['name']} {size}" + ("" if tower["activations_stored"] else " (frozen, no graph)")


def _table(gpus: int, plans: dict[str, StrategyPlan], checkpointing: bool) -> str:
    cards = "/".join(CARDS_GIB)
    setting = "on" if checkpointing else "off"
    header = (f"per GPU, {gpus} GPU{'s' if gpus > 1 else ''} (GiB; activation checkpointing {setting} in the "
              f"spec, totals for off | on)")
    columns = f"{'strategy':<17} {'weights':>8} {'grads':>7} {'optim':>7} {'activ.':>7} {'act.ckpt':>8} " \
              f"{'total off | on':>16}  fits {cards} GB ({setting})"
    rows = [header, columns]
    for strategy, p in plans.items():
        fits = " ".join("yes" if ok else "no" for ok in p.fits.values())
        cpu = f"  (+{p.cpu:.1f} GiB CPU RAM)" if p.cpu else ""
        rows.append(f"{STRATEGY_TITLES[strategy]:<17} {p.weights:8.2f} {p.gradients:7.2f} "
                    f"{p.optimizer:7.2f} {p.activations:7.2f} {p.activations_checkpointed:8.2f} "
                    f"{p.total_checkpointing_off:7.2f} | {p.total_checkpointing_on:6.2f}  {fits}{cpu}")
    return "\n".join(rows)


def select_stage(plans: list[Plan], stage: str | None) -> Plan:
    """The plan of train stage ``stage``, or the first train stage's."""
    if not stage:
        return plans[0]
    for plan in plans:
        if plan.stage == stage:
            return plan
    raise ValueError(f"--stage: expected one of the spec's train stages {[p.stage for p in plans]}, got {stage!r}")


def job_json(plans: list[Plan], stage: str | None = None) -> dict[str, Any]:
    """One object: the selected train stage's plan at the top level, every train stage's under ``stages``."""
    return {**select_stage(plans, stage).to_json(), "stages": {p.stage: p.to_json() for p in plans}}
