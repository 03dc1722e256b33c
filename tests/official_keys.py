"""Key names and shapes of official DenseCLIP (mmseg 0.19) segmentation checkpoints, written out
from the official module definitions (CLIPResNetWithAttention, CLIPVisionTransformer,
CLIPTextContextEncoder, ContextDecoder, mmseg FPN + FPNHead with ConvModule's conv/bn names).
Independent of our model code on purpose: a test loads a checkpoint made from these."""


def _bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def _ln(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def _linear(prefix, cin, cout, bias=True):
    return {f"{prefix}.weight": (cout, cin), **({f"{prefix}.bias": (cout,)} if bias else {})}


def clip_resnet(layers, width=64, attnpool_dim=None, grid=16):
    k = {"conv1.weight": (width // 2, 3, 3, 3), **_bn("bn1", width // 2),
         "conv2.weight": (width // 2, width // 2, 3, 3), **_bn("bn2", width // 2),
         "conv3.weight": (width, width // 2, 3, 3), **_bn("bn3", width)}
    inplanes = width
    for i, n in enumerate(layers):
        planes = width * 2 ** i
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            cin = inplanes if j == 0 else planes * 4
            k.update({f"{p}.conv1.weight": (planes, cin, 1, 1), **_bn(f"{p}.bn1", planes),
                      f"{p}.conv2.weight": (planes, planes, 3, 3), **_bn(f"{p}.bn2", planes),
                      f"{p}.conv3.weight": (planes * 4, planes, 1, 1), **_bn(f"{p}.bn3", planes * 4)})
            if j == 0:
                k.update({f"{p}.downsample.0.weight": (planes * 4, cin, 1, 1), **_bn(f"{p}.downsample.1", planes * 4)})
        inplanes = planes * 4
    if attnpool_dim:
        c = width * 32
        k["attnpool.positional_embedding"] = (grid * grid + 1, c)
        for name in ("k_proj", "q_proj", "v_proj"):
            k.update(_linear(f"attnpool.{name}", c, c))
        k.update(_linear("attnpool.c_proj", c, attnpool_dim))
    return k


def _resblocks(prefix, width, layers):
    k = {}
    for i in range(layers):
        p = f"{prefix}.resblocks.{i}"
        k.update({f"{p}.attn.in_proj_weight": (3 * width, width), f"{p}.attn.in_proj_bias": (3 * width,),
                  **_linear(f"{p}.attn.out_proj", width, width), **_ln(f"{p}.ln_1", width),
                  **_linear(f"{p}.mlp.c_fc", width, 4 * width), **_linear(f"{p}.mlp.c_proj", 4 * width, width),
                  **_ln(f"{p}.ln_2", width)})
    return k


def clip_vit(width=768, layers=12, patch=16, grid=40, out_dim=512):
    k = {"conv1.weight": (width, 3, patch, patch), "class_embedding": (width,),
         "positional_embedding": (grid * grid + 1, width), **_ln("ln_pre", width),
         **_resblocks("transformer", width, layers)}
    if out_dim:
        k.update({**_ln("ln_post", width), "proj": (width, out_dim)})
    k.update({**_ln("fpn1.0", width), "fpn1.1.weight": (width, width, 2, 2), "fpn1.1.bias": (width,),
              **_bn("fpn1.2", width), "fpn1.4.weight": (width, width, 2, 2), "fpn1.4.bias": (width,),
              **_ln("fpn2.0", width), "fpn2.1.weight": (width, width, 2, 2), "fpn2.1.bias": (width,),
              **_ln("fpn3", width), **_ln("fpn4.0", width)})
    return k


def text_encoder(embed_dim, width=512, layers=12, length=13, vocab=49408):
    return {"token_embedding.weight": (vocab, width), "positional_embedding": (length, width),
            **_resblocks("transformer", width, layers), **_ln("ln_final", width), "text_projection": (width, embed_dim)}


def context_decoder(visual_dim, width=256, layers=3):
    k = {**_ln("memory_proj.0", visual_dim), **_linear("memory_proj.1", visual_dim, width),
         **_ln("memory_proj.2", width),
         **_ln("text_proj.0", visual_dim), **_linear("text_proj.1", visual_dim, width),
         **_ln("out_proj.0", width), **_linear("out_proj.1", width, visual_dim)}
    for i in range(layers):
        p = f"decoder.{i}"
        for attn in ("self_attn", "cross_attn"):
            for name in ("q_proj", "k_proj", "v_proj"):
                k.update(_linear(f"{p}.{attn}.{name}", width, width, bias=False))
            k.update(_linear(f"{p}.{attn}.proj", width, width))
        k.update({**_ln(f"{p}.norm1", width), **_ln(f"{p}.norm2", width), **_ln(f"{p}.norm3", width),
                  **_linear(f"{p}.mlp.0", width, 4 * width), **_linear(f"{p}.mlp.3", 4 * width, width)})
    return k


def fpn_neck_and_head(in_channels, num_classes, channels=256, neck=256):
    k = {}
    for i, c in enumerate(in_channels):
        k.update({f"lateral_convs.{i}.conv.weight": (neck, c, 1, 1), f"lateral_convs.{i}.conv.bias": (neck,),
                  f"fpn_convs.{i}.conv.weight": (neck, neck, 3, 3), f"fpn_convs.{i}.conv.bias": (neck,)})
    head = {"conv_seg.weight": (num_classes, channels, 1, 1), "conv_seg.bias": (num_classes,)}
    for i in range(4):  # ConvModule at even positions, parameter-free Upsample at odd ones
        for j in range(max(1, i)):
            cin = neck if j == 0 else channels
            head.update({f"scale_heads.{i}.{2 * j}.conv.weight": (channels, cin, 3, 3),
                         **_bn(f"scale_heads.{i}.{2 * j}.bn", channels)})
    return {**{"neck." + n: s for n, s in k.items()}, **{"decode_head." + n: s for n, s in head.items()}}


def _prefix(prefix, keys):
    return {f"{prefix}.{n}": s for n, s in keys.items()}


def denseclip_r50(K=150):
    return {**_prefix("backbone", clip_resnet((3, 4, 6, 3), attnpool_dim=1024)),
            **_prefix("text_encoder", text_encoder(1024)),
            **_prefix("context_decoder", context_decoder(1024)), "contexts": (1, 8, 512), "gamma": (1024,),
            **fpn_neck_and_head([256, 512, 1024, 2048 + K], K)}


def fpn_clip_r50(K=150):
    return {**_prefix("backbone", clip_resnet((3, 4, 6, 3))), **fpn_neck_and_head([256, 512, 1024, 2048], K)}


def denseclip_vitb16(K=150):
    return {**_prefix("backbone", clip_vit()), **_prefix("text_encoder", text_encoder(512)),
            **_prefix("context_decoder", context_decoder(512)), "contexts": (1, 8, 512), "gamma": (512,),
            **fpn_neck_and_head([768, 768, 768 + K, 768], K)}


# ----------------------------------------------------------------------------- detection (mmdet 2.17)
def mmdet_fpn(in_channels, out=256, start_level=1, num_outs=5, extra_on_input=True):
    """mmdet FPN: ConvModule laterals / outputs (bias, no norm) for inputs start_level.., then the extra
    stride-2 convs, the first on the last input when add_extra_convs='on_input'."""
    k, used = {}, in_channels[start_level:]
    for i, c in enumerate(used):
        k.update({f"lateral_convs.{i}.conv.weight": (out, c, 1, 1), f"lateral_convs.{i}.conv.bias": (out,)})
    for i in range(num_outs):
        cin = in_channels[-1] if i == len(used) and extra_on_input else out
        k.update({f"fpn_convs.{i}.conv.weight": (out, cin, 3, 3), f"fpn_convs.{i}.conv.bias": (out,)})
    return _prefix("neck", k)


def retina_head(K, channels=256, stacked_convs=4, num_anchors=9):
    """mmdet RetinaHead: cls_convs / reg_convs (ConvModule, bias, ReLU), retina_cls (A*K), retina_reg (A*4)."""
    k = {}
    for branch in ("cls_convs", "reg_convs"):
        for i in range(stacked_convs):
            k.update({f"{branch}.{i}.conv.weight": (channels, channels, 3, 3), f"{branch}.{i}.conv.bias": (channels,)})
    k.update({"retina_cls.weight": (num_anchors * K, channels, 3, 3), "retina_cls.bias": (num_anchors * K,),
              "retina_reg.weight": (num_anchors * 4, channels, 3, 3), "retina_reg.bias": (num_anchors * 4,)})
    return _prefix("bbox_head", k)


def retinanet_denseclip_r50(K=80):
    """DenseCLIP_RetinaNet: CLIPResNetWithAttention(input_resolution=1344: 42 x 42 grid), text encoder, contexts,
    gamma, context decoder, FPN [256, 512, 1024, 2048 + K], RetinaHead."""
    return {**_prefix("backbone", clip_resnet((3, 4, 6, 3), attnpool_dim=1024, grid=42)),
            **_prefix("text_encoder", text_encoder(1024)),
            **_prefix("context_decoder", context_decoder(1024)), "contexts": (1, 8, 512), "gamma": (1024,),
            **mmdet_fpn([256, 512, 1024, 2048 + K]), **retina_head(K)}


def retinanet_clip_r50(K=80):
    """mmdet RetinaNet with CLIPResNet (no attention pool) and FPN [256, 512, 1024, 2048]."""
    return {**_prefix("backbone", clip_resnet((3, 4, 6, 3))), **mmdet_fpn([256, 512, 1024, 2048]), **retina_head(K)}


def retinanet_denseclip_tiny(K=3):
    """The official layout at retinanet_denseclip_tiny's sizes (width 16, D 64, text width 128, 2 layers)."""
    return {**_prefix("backbone", clip_resnet((1, 1, 1, 1), width=16, attnpool_dim=64, grid=7)),
            **_prefix("text_encoder", text_encoder(64, width=128, layers=2)),
            **_prefix("context_decoder", context_decoder(64, width=32, layers=1)), "contexts": (1, 8, 128),
            "gamma": (64,), **mmdet_fpn([64, 128, 256, 512 + K], out=32), **retina_head(K, channels=32)}
