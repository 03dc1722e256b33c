"""The language side of DenseCLIP, shared by every task (segmentation and detection): class names with
learnable contexts through CLIP's frozen text encoder (paper Sec. 3.2, CoOp), context-aware prompting
(Sec. 3.3: the post-model context decoder, or the pre-model prompter of the ablation) and the pixel-text
score map s = <ẑ, t̂> (Eq. 5).

`PixelTextMatching` is a base class for a task model, not a submodule: its parameters keep the official
top-level names (`text_encoder.*`, `contexts`, `gamma`, `context_decoder.*`) so official checkpoints load
without renaming. Differences from the official code:
- the text encoder is frozen with requires_grad_(False) (official: lr 0, issue #28), and at evaluation its
  output is computed once and cached (official: every forward, issue #40); `drop_text_encoder` exports it;
- a class name longer than the token budget is a clear error naming it (official: a crash);
- under gradient accumulation the text encoder can run once per optimiser step instead of once per micro-batch
  (`text_once_per_step`): its output does not depend on the images, only on the contexts;
- the score map is normalised and computed in fp32 also under autocast (s / τ reaches 1 / 0.07 ≈ 14, where
  bf16 steps by 0.06, and the auxiliary loss reads it directly).
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
from .prompting import ContextDecoder, PreModelPrompter
from .tokenizer import tokenize


def tokenize_class_names(names: Sequence[str], length: int, truncate: bool) -> torch.Tensor:
    """(K, length) token ids; a name that does not fit the budget is an error naming it."""
    rows = []
    for name in names:
        try:
            rows.append(tokenize(name, context_length=length, truncate=truncate))
        except RuntimeError:
            raise ValueError(f"class name {name!r} needs more than {length} tokens (SOT + BPE + EOT); raise "
                             f"class_token_length or set truncate_class_names=True") from None
    return torch.cat(rows)


def encode_names(names: Sequence[str]) -> torch.Tensor:
    """Class names as a uint8 tensor (UTF-8, one per line): state dicts hold tensors only."""
    return torch.tensor(list("\n".join(names).encode("utf-8")), dtype=torch.uint8)


def decode_names(t: torch.Tensor) -> list:
    return bytes(t.tolist()).decode("utf-8").split("\n")


class PixelTextMatching(nn.Module):
    """Base class of the DenseCLIP task models. `init_language(cfg, class_names)` builds the text side from the
    config fields use_text, class_token_length, num_contexts, text_*, vocab_size, embed_dim,
    freeze_text_encoder, truncate_class_names, prompting, decoder_* and gamma_init."""

    def init_language(self, cfg, class_names: Sequence[str]):
        if cfg.prompting not in ("post", "pre", "none"):
            raise ValueError(f"prompting must be 'post', 'pre' or 'none', not {cfg.prompting!r}")
        self.class_names = [n.strip() for n in check_class_names(class_names)]
        self.num_classes = len(self.class_names)
        self._text_cache = None
        self._text_step = None  # inside text_once_per_step: {"text": graph output or None, "leaf": its copy}
        if not cfg.use_text:
            return
        self.text_encoder = TextEncoder(cfg.class_token_length + cfg.num_contexts, cfg.vocab_size, cfg.text_width,
                                        cfg.text_heads, cfg.text_layers, cfg.embed_dim)
        if cfg.freeze_text_encoder:
            self.text_encoder.requires_grad_(False)
        texts = tokenize_class_names(self.class_names, cfg.class_token_length, cfg.truncate_class_names)
        self.register_buffer("texts", texts, persistent=False)  # (K, class_token_length)
        if cfg.prompting == "pre":
            self.prompter = PreModelPrompter(cfg.num_contexts, cfg.text_width, cfg.embed_dim, cfg.decoder_width,
                                             cfg.decoder_heads, cfg.decoder_layers, cfg.decoder_dropout)
        else:  # learnable contexts (1, M, text_width), truncated normal with std 1 as the official code
            self.contexts = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, cfg.num_contexts, cfg.text_width)))
        if cfg.prompting == "post":
            self.context_decoder = ContextDecoder(cfg.embed_dim, cfg.decoder_width, cfg.decoder_heads,
                                                  cfg.decoder_layers, cfg.decoder_dropout)
            self.gamma = nn.Parameter(torch.full((cfg.embed_dim,), cfg.gamma_init))

    # --- text features: fixed once trained, so computed once per model at evaluation
    def text_features(self) -> torch.Tensor:
        """(1, K, D) for post-model / no prompting. Cached while in eval mode without autograd."""
        if hasattr(self, "text_embeddings"):  # after drop_text_encoder()
            return self.text_embeddings
        if self._text_cache is not None:
            return self._text_cache
        step = self._text_step
        if step is not None and self.training:  # one text forward per optimiser step, see text_once_per_step
            if step["leaf"] is None:
                step["text"] = self.text_encoder(self.texts, self.contexts)  # (1, K, D), with its graph
                # At least fp32: the leaf's gradient sums the micro-batches' in fp32 even when the text ran in bf16.
                dtype = torch.promote_types(step["text"].dtype, torch.float32)
                step["leaf"] = step["text"].detach().to(dtype).requires_grad_()
            return step["leaf"].to(step["text"].dtype)
        text = self.text_encoder(self.texts, self.contexts)  # (1, K, D)
        if not self.training and not torch.is_grad_enabled():
            self._text_cache = text
        return text

    def text_once_parameters(self) -> List[nn.Parameter]:
        """The trainable parameters that text_once_per_step backpropagates into itself, outside the micro-batches'
        backward passes (the contexts; the text encoder's too if it is not frozen). Empty when it does nothing."""
        if not self.cfg.use_text or self.cfg.prompting == "pre" or not hasattr(self, "text_encoder"):
            return []
        return [p for p in [self.contexts, *self.text_encoder.parameters()] if p.requires_grad]

    @contextlib.contextmanager
    def text_once_per_step(self, all_reduce: bool = False):
        """Gradient accumulation with one text-encoder pass per optimiser step instead of one per micro-batch.

        The text features t = f(contexts) do not depend on the images. Inside this context the first training
        forward computes t once and every micro-batch gets the same detached leaf copy of it; each micro-batch's
        backward adds its dL/dt to the leaf's .grad. On exit, t.backward(sum of dL/dt) sends the summed gradient
        through the text encoder once: by the chain rule the contexts' gradient is the per-micro-batch sum, up to
        float rounding. A GradScaler's scale is already in the leaf gradients, so it carries over unchanged.

        all_reduce: under DDP, pass True and keep text_once_parameters() out of DDP's reducer (its hooks only
        see the micro-batches' backward passes); their gradients are then averaged over the ranks here, as DDP
        averages everything else. Pre-model prompting (text depends on each image) keeps one pass per micro-batch.
        """
        params = self.text_once_parameters()
        if not params:
            yield
            return
        self._text_step = step = {"text": None, "leaf": None}
        try:
            yield
        finally:
            self._text_step = None
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
    def drop_text_encoder(self):
        """For deployment (official issue #40): the text features no longer change once trained, so keep
        them as a buffer `text_embeddings` (1, K, D) and delete the text encoder and the contexts (RN50:
        -63M parameters). The class names go along (buffer `text_class_names`, see encode_names): the features
        hold them for good. load_checkpoint calls this itself for checkpoints saved after it."""
        if self.cfg.prompting == "pre":
            raise ValueError("pre-model prompting runs the text encoder on every image; it cannot be dropped")
        if hasattr(self, "text_encoder"):
            was_training = self.training
            self.train(False)
            self.register_buffer("text_embeddings", self.text_encoder(self.texts, self.contexts).detach())
            self.register_buffer("text_class_names", encode_names(self.class_names))
            del self.text_encoder, self.contexts, self.texts
            self.train(was_training)
        return self

    def train(self, mode: bool = True):
        self._text_cache = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .float(): the cache would be stale
        self._text_cache = None
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self._text_cache = None
        return super().load_state_dict(*args, **kwargs)

    # --- open vocabulary: other class names through the same trained contexts and frozen text encoder
    def name_tokens(self, names: Sequence[str]) -> torch.Tensor:
        """(K', class_token_length) token ids of any class names, on the model's device."""
        if not hasattr(self, "text_encoder"):
            raise ValueError("this model has no text encoder (exported with drop_text_encoder): it knows only its "
                             f"training classes {self.class_names}")
        texts = tokenize_class_names([n.strip() for n in names], self.cfg.class_token_length,
                                     self.cfg.truncate_class_names)
        return texts.to(self.text_encoder.positional_embedding.device)

    def name_features(self, names: Sequence[str]) -> torch.Tensor:
        """(1, K', D) text features of any class names (post-model / no prompting). A text-free export has
        only its training names' features, so it answers for those names only."""
        if not hasattr(self, "text_encoder"):
            unknown = [n for n in names if n.strip() not in self.class_names]
            if unknown:
                self.name_tokens(unknown)  # raises: no text encoder for new names
            return self.text_embeddings[:, [self.class_names.index(n.strip()) for n in names]]
        return self.text_encoder(self.name_tokens(names), self.contexts)  # (1, K', D)

    # --- the pixel-text score map
    def score_map(self, z_global, z_dense, names: Optional[Sequence[str]] = None):
        """Pixel-text score map s (B, K, h, w) from z̄ (B, D) and z (B, D, h, w), Eq. 3-5 (cosine, not / τ).
        names: other class names (open vocabulary, K' of them): the same contexts, text encoder and context
        decoder with these names instead of the training ones -> (B, K', h, w)."""
        B, D, h, w = z_dense.shape
        visual = torch.cat([z_global[:, None], z_dense.flatten(2).transpose(1, 2)], dim=1)  # (B, 1+hw, D)
        if self.cfg.prompting == "pre":
            texts = self.texts if names is None else self.name_tokens(names)
            text = self.text_encoder(texts, self.prompter(visual))  # (B, K, D): per-image prompts
        else:
            text = self.text_features() if names is None else self.name_features(names)  # (1, K, D)
            text = text.to(z_dense.dtype).expand(B, -1, -1)  # (B, K, D)
        if self.cfg.prompting == "post":
            text = text + self.gamma * self.context_decoder(text, visual)  # (B, K, D)
        with torch.autocast(z_dense.device.type, enabled=False):  # fp32 cosines (module docstring)
            return torch.einsum("bdhw,bkd->bkhw", F.normalize(z_dense.float(), dim=1),
                                F.normalize(text.float(), dim=2))  # (B, K, h, w)


def text_once_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters that text_once_per_step backpropagates itself, of every text side inside `model`."""
    return [p for m in model.modules() if isinstance(m, PixelTextMatching) for p in m.text_once_parameters()]


@contextlib.contextmanager
def text_once_per_step(model: nn.Module, all_reduce: bool = False):
    """PixelTextMatching.text_once_per_step for every text side inside `model` (the unwrapped model)."""
    with contextlib.ExitStack() as stack:
        for m in model.modules():
            if isinstance(m, PixelTextMatching):
                stack.enter_context(m.text_once_per_step(all_reduce))
        yield


def drop_text_encoder(model: nn.Module) -> nn.Module:
    """PixelTextMatching.drop_text_encoder (official issue #40): keep the text features, delete the text encoder."""
    return model.drop_text_encoder()
