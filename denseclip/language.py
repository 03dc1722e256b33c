"""The language side of DenseCLIP, written once for every model (segmentor, detectors, zero-shot, open vocabulary):
the text path and the score map as functions over explicit modules and tensors, in the paper's order.

    t  = TextEncoder([SOT, p_1..p_M, e_k, EOT])  (1, K, D)     class_text_features  language-domain prompting
    t <- t + γ · ContextDecoder(t, [z̄; z])       (B, K, D)     context_aware_text   post-model prompting
    s  = ẑ t̂ᵀ                                     (B, K, h, w)  score_map            the pixel-text score map

p are the M learnable contexts (CoOp), e_k the tokens of class name k; both promptings are the paper's Sec. 3.3,
the score map (cosines) its Sec. 3.2. Pre-model prompting (the paper's ablation) replaces p by the per-image
PreModelPrompter([z̄; z]) and skips the update.

`add_language(model, cfg, class_names)` gives a segmentor or detector these parts as its own attributes, under the
official top-level names (`text_encoder.*`, `contexts`, `context_decoder.*`, `gamma`, pre-model `prompter.*`, the
non-persistent buffer `texts`), so official checkpoints load without renaming. Differences from the official code:
- the text encoder is frozen with requires_grad_(False) (official: lr 0, issue #28); at evaluation its output is
  computed once and cached (official: every forward, issue #40), and `drop_text_encoder` exports a model without it
  (buffers `text_embeddings`, `text_class_names`);
- a class name longer than the token budget is a clear error naming it (official: a crash);
- under gradient accumulation the text encoder can run once per optimiser step instead of once per micro-batch
  (`text_once_per_step`): its output depends on the contexts, not on the images;
- the score map is normalised and computed in at least fp32 also under autocast (s / τ reaches 1 / 0.07 ≈ 14, where bf16
  steps by 0.06, and the auxiliary loss reads it directly);
- any class names can be scored through the same contexts, text encoder and context decoder (open vocabulary).
Shape letters: B batch, K classes, D joint dim, h w = the dense feature grid, M learnable contexts.
"""
import contextlib
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .clip import TextEncoder
from .configs import check_class_names
from .errors import ConfigError
from .precision import wide_dtype
from .prompting import ContextDecoder, PreModelPrompter
from .tokenizer import token_count, tokenize


def tokenize_class_names(names: Sequence[str], length: int, truncate: bool) -> torch.Tensor:
    """(K, length) token ids; a name that does not fit the budget is an error naming it."""
    rows = []
    for name in names:
        try:
            rows.append(tokenize(name, context_length=length, truncate=truncate))
        except RuntimeError:
            raise ConfigError(f"class name {name!r} needs {token_count(name)} tokens (SOT + BPE + EOT), more than "
                              f"class_token_length {length}: shorten it, or --set class_token_length="
                              f"{token_count(name)}, or --set truncate_class_names=True") from None
    return torch.cat(rows)


def encode_names(names: Sequence[str]) -> torch.Tensor:
    """Class names as a uint8 tensor (UTF-8, one per line): state dicts hold tensors only."""
    return torch.tensor(list("\n".join(names).encode("utf-8")), dtype=torch.uint8)


def decode_names(t: torch.Tensor) -> list:
    return bytes(t.tolist()).decode("utf-8").split("\n")


class TextCache(nn.Module):
    """The state of a model's text features, kept in a parameter-less child module (`model.text_cache`).

    The text features do not depend on the images: at evaluation they are computed once per model (official issue
    #40), and inside text_once_per_step once per optimiser step. A cached tensor is stale once the model changes
    mode, device or dtype, or loads weights. nn.Module.train(), ._apply() (.to(), .cuda(), .float(), ...) and
    load_state_dict() visit every child module, so this child clears itself there and the model itself overrides
    nothing. It holds no parameters or buffers: the state-dict keys are the model's own."""

    def __init__(self):
        super().__init__()
        self.text = None  # (1, K, D) features of the class names, filled in eval mode without autograd
        self.step = None  # inside text_once_per_step: {"text": graph output or None, "leaf": its detached copy}

    def train(self, mode: bool = True):
        self.text = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.text = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.text = None
        return super()._load_from_state_dict(*args, **kwargs)


def add_language(model: nn.Module, cfg, class_names: Sequence[str]):
    """Give `model` its class names (.class_names, .num_classes) and, with cfg.use_text, the text side as its own
    attributes, in this order: text_cache, text_encoder (frozen unless cfg.freeze_text_encoder is off), the buffer
    texts (K, class_token_length), then contexts (1, M, text_width) or, pre-model, prompter; post-model also
    context_decoder and gamma (D,). Reads the LanguageConfig fields of cfg (configs.py)."""
    model.class_names = [n.strip() for n in check_class_names(class_names)]
    model.num_classes = len(model.class_names)
    if not cfg.use_text:
        return
    model.text_cache = TextCache()
    model.text_encoder = TextEncoder(cfg.class_token_length + cfg.num_contexts, cfg.vocab_size, cfg.text_width,
                                     cfg.text_heads, cfg.text_layers, cfg.embed_dim)
    if cfg.freeze_text_encoder:
        model.text_encoder.requires_grad_(False)
    elif cfg.freeze_token_embedding:
        model.text_encoder.token_embedding.requires_grad_(False)
    texts = tokenize_class_names(model.class_names, cfg.class_token_length, cfg.truncate_class_names)
    model.register_buffer("texts", texts, persistent=False)  # (K, class_token_length)
    if cfg.prompting == "pre":
        model.prompter = PreModelPrompter(cfg.num_contexts, cfg.text_width, cfg.embed_dim, cfg.decoder_width,
                                          cfg.decoder_heads, cfg.decoder_layers, cfg.decoder_dropout)
    else:  # learnable contexts (1, M, text_width), truncated normal with std 1 as the official code
        model.contexts = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, cfg.num_contexts, cfg.text_width)))
    if cfg.prompting == "post":
        model.context_decoder = ContextDecoder(cfg.embed_dim, cfg.decoder_width, cfg.decoder_heads,
                                               cfg.decoder_layers, cfg.decoder_dropout)
        model.gamma = nn.Parameter(torch.full((cfg.embed_dim,), cfg.gamma_init))


# --- the text path
def _no_text_encoder(model) -> ConfigError:
    return ConfigError("this model has no text encoder (exported with drop_text_encoder): it knows only its training "
                      f"classes {model.class_names}")


def name_tokens(model: nn.Module, names: Sequence[str]) -> torch.Tensor:
    """(K', class_token_length) token ids of any class names, on the model's device."""
    if not hasattr(model, "text_encoder"):
        raise _no_text_encoder(model)
    texts = tokenize_class_names([n.strip() for n in names], model.cfg.class_token_length,
                                 model.cfg.truncate_class_names)
    return texts.to(model.text_encoder.positional_embedding.device)


def class_text_features(model: nn.Module, names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """t (1, K, D): each class name after the learnable contexts through the frozen text encoder (Sec. 3.3,
    language-domain prompting; post-model or no prompting). It depends on no image, so in eval mode without
    autograd it is computed once and cached (model.text_cache), inside text_once_per_step once per step, and after
    drop_text_encoder it is the buffer text_embeddings. names: other class names (open vocabulary, K' of them)
    through the same contexts and text encoder, not cached; a text-free export answers for its training names only."""
    if names is not None:
        if hasattr(model, "text_encoder"):
            return model.text_encoder(name_tokens(model, names), model.contexts)  # (1, K', D)
        if any(n.strip() not in model.class_names for n in names):
            raise _no_text_encoder(model)
        return model.text_embeddings[:, [model.class_names.index(n.strip()) for n in names]]  # (1, K', D)
    if hasattr(model, "text_embeddings"):  # after drop_text_encoder()
        return model.text_embeddings
    cache = model.text_cache
    if cache.text is not None:
        return cache.text
    step = cache.step
    if step is not None and model.training:  # one text forward per optimiser step, see text_once_per_step
        if step["leaf"] is None:
            step["text"] = model.text_encoder(model.texts, model.contexts)  # (1, K, D), with its graph
            # At least fp32: the leaf's gradient sums the micro-batches' in fp32 even when the text ran in bf16.
            step["leaf"] = step["text"].detach().to(wide_dtype(step["text"].dtype)).requires_grad_()
        return step["leaf"].to(step["text"].dtype)
    text = model.text_encoder(model.texts, model.contexts)  # (1, K, D)
    if not model.training and not torch.is_grad_enabled():
        cache.text = text
    return text


def context_aware_text(model: nn.Module, z_global: torch.Tensor, z_dense: torch.Tensor,
                       names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """The text features t (B, K, D) of one batch, from z̄ (B, D) and z (B, D, h, w) (Sec. 3.3): the class names
    with the contexts through the text encoder, then vision-to-language prompting with the visual context [z̄; z]:
    post-model t <- t + γ · ContextDecoder(t, [z̄; z]); pre-model, per-image prompts PreModelPrompter([z̄; z]) in
    place of the contexts; "none", t itself. names: other class names (open vocabulary) -> (B, K', D)."""
    B = z_dense.shape[0]
    visual = torch.cat([z_global[:, None], z_dense.flatten(2).transpose(1, 2)], dim=1)  # [z̄; z] (B, 1+hw, D)
    if model.cfg.prompting == "pre":
        texts = model.texts if names is None else name_tokens(model, names)
        return model.text_encoder(texts, model.prompter(visual))  # (B, K, D)
    text = class_text_features(model, names).to(z_dense.dtype).expand(B, -1, -1)  # (B, K, D)
    if model.cfg.prompting == "post":
        text = text + model.gamma * model.context_decoder(text, visual)  # (B, K, D)
    return text


def score_map(z_dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The pixel-text score map s = ẑ t̂ᵀ (B, K, h, w) of z (B, D, h, w) and t (B, K, D) (Sec. 3.2): cosines, not
    divided by τ. In at least fp32 under autocast too (module docstring); a float64 model's in float64."""
    dtype = wide_dtype(z_dense.dtype, text.dtype)
    with torch.autocast(z_dense.device.type, enabled=False):
        return torch.einsum("bdhw,bkd->bkhw", F.normalize(z_dense.to(dtype), dim=1),
                            F.normalize(text.to(dtype), dim=2))  # (B, K, h, w)


# --- what the running layer does with the text side of a model
def _text_sides(model: nn.Module) -> List[nn.Module]:
    """The modules inside `model` (itself included) that carry a text side (add_language with use_text)."""
    return [m for m in model.modules() if isinstance(getattr(m, "text_cache", None), TextCache)]


def _text_once_parameters(side: nn.Module) -> List[nn.Parameter]:
    if side.cfg.prompting == "pre" or not hasattr(side, "text_encoder"):
        return []
    return [p for p in [side.contexts, *side.text_encoder.parameters()] if p.requires_grad]


def text_once_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The trainable parameters that text_once_per_step backpropagates itself, outside the micro-batches' backward
    passes (the contexts; the text encoder's too if it is not frozen). Empty where it does nothing: no text side,
    pre-model prompting, or a text-free export."""
    return [p for side in _text_sides(model) for p in _text_once_parameters(side)]


@contextlib.contextmanager
def text_once_per_step(model: nn.Module, all_reduce: bool = False):
    """Gradient accumulation with one text-encoder pass per optimiser step instead of one per micro-batch, for the
    unwrapped `model` (a no-op for a model without a text side).

    The text features t = f(contexts) do not depend on the images. Inside this context the first training forward
    computes t once and every micro-batch gets the same detached leaf copy of it; each micro-batch's backward adds
    its dL/dt to the leaf's .grad. On exit, t.backward(sum of dL/dt) sends the summed gradient through the text
    encoder once: by the chain rule the contexts' gradient is the per-micro-batch sum, up to float rounding. A
    GradScaler's scale is already in the leaf gradients, so it carries over unchanged.

    all_reduce: under DDP, pass True and keep text_once_parameters(model) out of DDP's reducer (its hooks only see
    the micro-batches' backward passes); their gradients are then averaged over the ranks here, as DDP averages
    everything else. Pre-model prompting (text depends on each image) keeps one pass per micro-batch."""
    with contextlib.ExitStack() as stack:
        for side in _text_sides(model):
            stack.enter_context(_text_once(side, all_reduce))
        yield


@contextlib.contextmanager
def _text_once(side: nn.Module, all_reduce: bool):
    params = _text_once_parameters(side)
    if not params:
        yield
        return
    side.text_cache.step = step = {"text": None, "leaf": None}
    try:
        yield
    finally:
        side.text_cache.step = None
    if step["leaf"] is None or step["leaf"].grad is None:
        return  # no training forward used the text features
    step["text"].backward(step["leaf"].grad.to(step["text"].dtype))
    if all_reduce and dist.is_initialized() and dist.get_world_size() > 1:
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(chunk.view_as(g))


@torch.no_grad()
def drop_text_encoder(model: nn.Module) -> nn.Module:
    """For deployment (official issue #40): the text features no longer change once trained, so keep them as a
    buffer `text_embeddings` (1, K, D) and delete the text encoder and the contexts (RN50: -63M parameters). The
    class names go along (buffer `text_class_names`, see encode_names): the features hold them for good.
    load_checkpoint calls this itself for checkpoints saved after it. Returns the model."""
    for side in _text_sides(model):
        if side.cfg.prompting == "pre":
            raise ValueError("pre-model prompting runs the text encoder on every image; it cannot be dropped")
        if hasattr(side, "text_encoder"):
            was_training = side.training
            side.train(False)
            side.register_buffer("text_embeddings", side.text_encoder(side.texts, side.contexts).detach())
            side.register_buffer("text_class_names", encode_names(side.class_names))
            del side.text_encoder, side.contexts, side.texts
            side.train(was_training)
    return model
