"""Float64 end to end: a model converted with `.double()` computes in float64 everywhere (the score map, the
losses, inference averaging, the detectors' features and head outputs: at least fp32 means promoted, never cast
to fp32), and then agrees with the official computations the other tests write out to 1e-10: the context decoder
(test_prompting), the detection attention pool, mmdet's FPN, build_seg_target / compute_seg_loss (test_detection),
the score map and mmseg's loss averaging (test_segmentor), measured ≤ 1.2e-15. One step in fp32 on the path
caps the agreement at 1e-9 to 1e-6 (the casts these tests replaced: 1.6e-9 on the logits to 7e-7 on s / τ), so
these tests fail on it. The convolutions, text encoder and head are the modules themselves
(their official equality is other tests' business, in fp32)."""
import pytest
import torch

from denseclip import build_model
from denseclip.detection.features import aux_losses, extract_feat
from denseclip.segmentor import resize

from test_detection import mmdet_fpn, official_build_seg_target, official_detection_attnpool, official_seg_loss
from test_prompting import _official_decoder
from test_segmentor import mmseg_cross_entropy, official_score_map

TOL = 1e-10
F64 = torch.float64


def double(name, names, **overrides):
    """A tiny model in float64, eval mode, no decoder dropout, γ = 0.5 so that the context decoder's update counts."""
    torch.manual_seed(0)
    model = build_model(name, names, decoder_dropout=0.0, **overrides).double().eval()
    model.gamma.data.fill_(0.5)
    return model


def official_features(model, x):
    """The official DenseCLIP feature path from our stage outputs C2..C5: attention pool (crop; at the stored grid
    also the segmentor's resize), contexts through the text encoder, t + γ · decoder, the score map.
    -> (C2..C5, s (B, K, h, w))."""
    feats = model.backbone.forward_pyramid(x)
    z_global, z_dense = official_detection_attnpool(model.backbone.attnpool, feats[-1])
    t0 = model.text_encoder(model.texts, model.contexts).expand(len(x), -1, -1)  # (B, K, D)
    visual = torch.cat([z_global[:, None], z_dense.flatten(2).transpose(1, 2)], 1)  # [z̄; z] (B, 1+hw, D)
    text = t0 + model.gamma * _official_decoder(model.context_decoder, t0, visual)
    return feats, official_score_map(z_dense, text)


def close(a, b):
    assert a.dtype == b.dtype == F64 and a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= TOL * max(1.0, b.abs().max().item()), f"max |diff| {err:.3g}"


NAMES = ["background", "circle", "square", "triangle"]


@torch.no_grad()
def test_segmentor_logits_losses_and_inference_in_float64():
    model = double("denseclip_tiny", NAMES, head_dropout=0.0)
    x = torch.randn(2, 3, 128, 128, dtype=F64)  # the stored 4 x 4 positional grid: no resize
    y = torch.randint(0, 4, (2, 128, 128))
    y[:, :16] = 255
    seen = {}
    hook = model.neck.register_forward_pre_hook(lambda m, args: seen.update(x4=args[0][3]))
    logits, losses = model(x), model(x, y)
    hook.remove()
    feats, s = official_features(model, x)
    x4 = torch.cat([feats[3], s], dim=1)  # (B, C4 + K, h, w)
    ref = resize(model.decode_head(mmdet_fpn(model.neck, feats[:3] + [x4], 0, "")), (128, 128))
    close(seen["x4"], x4)
    close(logits, ref)
    close(losses["loss_decode"], mmseg_cross_entropy(ref, y))
    close(losses["loss_aux"], 0.4 * mmseg_cross_entropy(resize(s / 0.07, (128, 128)), y))
    wide = torch.randn(1, 3, 128, 192, dtype=F64)  # slide: windows [0, 128) and [64, 192), averaged where they meet
    left, right = model(wide[..., :128]), model(wide[..., 64:])
    mean = torch.cat([left[..., :64], (left[..., 64:] + right[..., :64]) / 2, right[..., 64:]], dim=-1)
    close(model.predict(wide, mode="slide"), mean.softmax(1))
    close(model.predict(x, mode="whole"), ref.softmax(1))


DET_NAMES = ["circle", "square", "triangle"]
BOXES = [([[10.0, 20, 60, 90], [0, 0, 30, 30]], [0, 2]), ([[40.0, 50, 120, 150], [100, 8, 180, 40]], [1, 0])]


@pytest.mark.parametrize("name", ["retinanet_denseclip_tiny", "maskrcnn_denseclip_tiny"])
@torch.no_grad()
def test_detector_feature_path_and_aux_loss_in_float64(name):
    model = double(name, DET_NAMES)
    cfg = model.cfg
    x = torch.randn(2, 3, 160, 192, dtype=F64)  # a padded batch inside the 7 x 7 grid: the pool crops
    levels, score = extract_feat(model, x)
    feats, s = official_features(model, x)
    ref = mmdet_fpn(model.neck, feats[:3] + [torch.cat([feats[3], s / 0.07], 1)], cfg.fpn_start_level,
                    cfg.fpn_add_extra_convs, cfg.fpn_relu_before_extra_convs)
    close(score, s / 0.07)
    assert len(levels) == len(ref) == 5
    for ours, theirs in zip(levels, ref):
        close(ours, theirs)
    boxes = [torch.tensor(b) for b, _ in BOXES]
    labels = [torch.tensor(k) for _, k in BOXES]
    target, mask = official_build_seg_target(x.shape, boxes, labels, 3)
    loss = aux_losses(cfg, score, [dict(boxes=b, labels=k) for b, k in zip(boxes, labels)], x.shape[-2:])
    close(loss["loss_aux"], official_seg_loss(s / 0.07, (40, 48), target.to(F64), mask.to(F64)))


@pytest.mark.parametrize("name", ["retinanet_denseclip_tiny", "maskrcnn_denseclip_tiny"])
def test_detector_losses_and_detections_are_float64(name):
    model = double(name, DET_NAMES).train()
    images = [torch.rand(3, 128, 160, dtype=F64), torch.rand(3, 150, 128, dtype=F64)]
    targets = [dict(boxes=torch.tensor(b, dtype=F64), labels=torch.tensor(k)) for b, k in BOXES]
    if "maskrcnn" in name:
        for t, img in zip(targets, images):
            t["masks"] = torch.zeros(len(t["boxes"]), *img.shape[-2:], dtype=torch.uint8)
            for m, (x1, y1, x2, y2) in zip(t["masks"], t["boxes"].long().tolist()):
                m[y1:y2, x1:x2] = 1
    losses = model(images, targets)
    assert {k: v.dtype for k, v in losses.items()} == {k: F64 for k in losses}
    model.eval()
    with torch.no_grad():
        dets = model(images)
    assert all(d["boxes"].dtype == d["scores"].dtype == F64 for d in dets)
