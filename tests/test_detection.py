"""Detection: the DenseCLIP RetinaNet against the official computations written out here (mmdet 2.17's FPN and
AnchorGenerator, DenseCLIP's build_seg_target / compute_seg_loss and its cropped positional grid), the detection
contract (losses in train, detections in the input's pixels in eval, parameter names), shapes at two sizes."""
import math

import pytest
import torch
import torch.nn.functional as F

import denseclip
import official_keys
from denseclip.checkpoint import CheckpointError, load_checkpoint, mmdet_retina_head_to_ours
from denseclip.resnet import AttentionPool2d
from denseclip.configs import CONFIGS, task_of
from denseclip.fpn import FPN
from denseclip.detection.anchors import MMDetAnchorGenerator
from denseclip import language
from denseclip.detection.features import box_seg_loss, box_seg_targets, extract_feat
from denseclip.run.optim import CUSTOM_KEYS, param_rule

from peers import tiny_openai_clip

NAMES = ["circle", "square", "triangle"]


def _batch():
    images = [torch.rand(3, 128, 160), torch.rand(3, 150, 128)]
    targets = [dict(boxes=torch.tensor([[10.0, 20, 60, 90], [0, 0, 30, 30]]), labels=torch.tensor([0, 2])),
               dict(boxes=torch.tensor([[40.0, 50, 120, 149]]), labels=torch.tensor([1]))]
    return images, targets


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return denseclip.build_model("retinanet_denseclip_tiny", NAMES, decoder_dropout=0.0)


# ----------------------------------------------------------------------------- the official functions
def official_build_seg_target(img_shape, gt_bboxes, gt_labels, num_classes):
    """DenseCLIP_RetinaNet.build_seg_target, the official computation step by step."""
    B, _, H, W = img_shape
    H //= 4
    W //= 4
    target = torch.zeros(B, num_classes, H, W)
    mask = torch.zeros(B, 1, H, W)
    for i, (bboxes, labels) in enumerate(zip(gt_bboxes, gt_labels)):
        bboxes = (bboxes / 4).long()
        bboxes[:, 0] = bboxes[:, 0].clamp(0, W - 1)
        bboxes[:, 1] = bboxes[:, 1].clamp(0, H - 1)
        bboxes[:, 2] = bboxes[:, 2].clamp(0, W - 1)
        bboxes[:, 3] = bboxes[:, 3].clamp(0, H - 1)
        for bbox, label in zip(bboxes, labels):
            target[i, label, bbox[1]: bbox[3], bbox[0]: bbox[2]] = 1
            mask[i, :, bbox[1]: bbox[3], bbox[0]: bbox[2]] = 1
    return target, mask.expand(-1, num_classes, -1, -1)


def official_seg_loss(score_map3, stage1_shape, target, mask):
    """compute_seg_loss on score_map0 = bilinear upsample of s / τ to the stage-1 grid (sigmoid, then BCE)."""
    score_map0 = F.interpolate(score_map3, stage1_shape, mode="bilinear", align_corners=False)
    loss = F.binary_cross_entropy(torch.sigmoid(score_map0), target, weight=mask, reduction="sum")
    return loss / mask.sum()


HAND_MADE = [  # (boxes, labels) per image of a 64 x 96 padded batch: stage-1 grid 16 x 24
    ([[0, 0, 96, 64], [90, 60, 96, 64]], [0, 1]),  # touches every border; one entirely in the last 6 px
    ([[10, 10, 13, 40], [20.5, 7.9, 23.9, 12.1], [4, 4, 8, 8]], [2, 1, 0]),  # 3 px wide twice; exactly one cell
    ([[8, 8, 48, 40], [24, 16, 80, 60], [30, 20, 40, 30]], [0, 1, 0]),  # overlapping, different classes
    ([], []),  # an image without boxes
]


@pytest.mark.parametrize("images", [[0, 1, 2, 3], [3], [1, 3]])
def test_aux_target_and_loss_equal_the_official_functions(images):
    torch.manual_seed(0)
    boxes = [torch.tensor(HAND_MADE[i][0], dtype=torch.float32).reshape(-1, 4) for i in images]
    labels = [torch.tensor(HAND_MADE[i][1], dtype=torch.long) for i in images]
    K, shape = 3, (len(images), 3, 64, 96)
    ref_target, ref_mask = official_build_seg_target(shape, boxes, labels, K)
    target, mask = box_seg_targets(boxes, labels, K, (16, 24))
    assert torch.equal(target, ref_target) and torch.equal(mask.expand_as(target), ref_mask)
    score = (torch.rand(len(images), K, 2, 3) * 2 - 1) / 0.07  # s / τ: cosine / τ on the stride-32 grid
    loss = box_seg_loss(score, target, mask)
    if ref_mask.sum() == 0:  # no box in the batch: the official code divides 0 by 0
        assert loss.item() == 0
    else:
        assert torch.allclose(loss, official_seg_loss(score, (16, 24), ref_target, ref_mask), rtol=1e-5)
    if images == [0, 1, 2, 3]:  # the cases do what they say
        assert ref_mask[0, 0, 15, 23] == 0 and ref_mask[0, 0, 14, 22] == 1  # end-exclusive at the far border
        assert target[1, 2].sum() == 8 and target[1, 1].sum() == 0  # 3 px across a cell edge: 1 column; within: 0
        assert target[1, 0].sum() == 1
        assert target[2, 0, 5, 7] == 1 and target[2, 1, 5, 7] == 1  # overlap: both classes
        assert target[3].sum() == 0 and mask[3].sum() == 0


# ----------------------------------------------------------------------------- attention pool, FPN, anchors
def official_detection_attnpool(m, x):
    """The official detection AttentionPool2d.forward: positions cropped, nn.MultiheadAttention in (L, B, C)."""
    B, C, H, W = x.shape
    S = math.isqrt(m.positional_embedding.shape[0] - 1)
    x = x.reshape(B, C, H * W).permute(2, 0, 1)  # (HW, B, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    spatial = m.positional_embedding[1:].reshape(S, S, C)[:H, :W].reshape(-1, C)
    x = x + torch.cat([m.positional_embedding[:1], spatial])[:, None, :]
    x, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=C, num_heads=m.num_heads, q_proj_weight=m.q_proj.weight,
        k_proj_weight=m.k_proj.weight, v_proj_weight=m.v_proj.weight, in_proj_weight=None,
        in_proj_bias=torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]), bias_k=None, bias_v=None,
        add_zero_attn=False, dropout_p=0, out_proj_weight=m.c_proj.weight, out_proj_bias=m.c_proj.bias,
        use_separate_proj_weight=True, training=False, need_weights=False)
    x = x.permute(1, 2, 0)
    return x[:, :, 0], x[:, :, 1:].reshape(B, -1, H, W)


def test_attention_pool_crops_its_positional_grid():
    torch.manual_seed(0)
    crop = AttentionPool2d(4, 32, 4, 16, crop_pos_embed=True)
    resize = AttentionPool2d(4, 32, 4, 16)
    resize.load_state_dict(crop.state_dict())
    for size in ((3, 2), (4, 4)):
        x = torch.randn(2, 32, *size)
        ours, ref = crop(x), official_detection_attnpool(crop, x)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, ref))
    x = torch.randn(2, 32, 3, 2)
    assert not torch.allclose(crop(x)[1], resize(x)[1], atol=1e-3)  # segmentation resizes instead
    with pytest.raises(ValueError, match="exceeds the stored 4x4"):
        crop(torch.randn(1, 32, 5, 2))


def mmdet_fpn(fpn, inputs, start_level, extra, relu_before=False):
    """mmdet 2.17 FPN.forward with the module's weights, written out level by level (P3..P7 or P2..P6)."""
    def conv(m, x, stride=1):
        return F.conv2d(x, m.conv.weight, m.conv.bias, stride=stride, padding=m.conv.kernel_size[0] // 2)

    laterals = [conv(fpn.lateral_convs[i], inputs[i + start_level]) for i in range(len(inputs) - start_level)]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
    outs = [conv(fpn.fpn_convs[i], laterals[i]) for i in range(len(laterals))]
    n = len(laterals)
    if not extra:
        while len(outs) < fpn.num_outs:
            outs.append(outs[-1][:, :, ::2, ::2])  # max_pool2d(kernel 1, stride 2) is this subsampling
        return outs
    outs.append(conv(fpn.fpn_convs[n], inputs[-1], stride=2))
    for i in range(n + 1, fpn.num_outs):
        outs.append(conv(fpn.fpn_convs[i], F.relu(outs[-1]) if relu_before else outs[-1], stride=2))
    return outs


@pytest.mark.parametrize("size", [(96, 160), (100, 132)])
@pytest.mark.parametrize("kind", ["retinanet", "retinanet_relu", "maskrcnn"])
def test_fpn_computes_what_mmdet_computes(kind, size):
    torch.manual_seed(0)
    cin = [8, 12, 16, 20]
    start, extra = (0, "") if kind == "maskrcnn" else (1, "on_input")
    fpn = FPN(cin, 6, 5, start, extra, relu_before_extra_convs=kind == "retinanet_relu")
    for m in fpn.modules():  # random biases (the init zeroes them) so that a skipped bias shows
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.bias)
    H, W = size
    inputs = [torch.randn(2, c, math.ceil(H / 2 ** (i + 2)), math.ceil(W / 2 ** (i + 2))) for i, c in enumerate(cin)]
    outs = fpn(inputs)
    ref = mmdet_fpn(fpn, inputs, start, extra, relu_before=kind == "retinanet_relu")
    assert len(outs) == 5 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outs, ref))
    keys = set(fpn.state_dict())
    if kind != "maskrcnn":  # mmdet's names and shapes: 3 laterals, 3 outputs, P6 on C5's 20 channels, P7
        assert len(fpn.lateral_convs) == 3 and len(fpn.fpn_convs) == 5
        assert fpn.fpn_convs[3].conv.weight.shape == (6, 20, 3, 3) and fpn.fpn_convs[4].conv.stride == (2, 2)
        assert "fpn_convs.4.conv.bias" in keys and "lateral_convs.0.conv.weight" in keys
    else:
        assert len(fpn.lateral_convs) == 4 and len(fpn.fpn_convs) == 4
    fresh = FPN(cin, 6, 5, start, extra)
    assert all(m.bias.abs().sum() == 0 for m in fresh.modules() if isinstance(m, torch.nn.Conv2d))


def mmdet_anchors(strides, octave_base_scale, scales_per_octave, ratios, feat_sizes):
    """mmdet 2.17 AnchorGenerator.grid_anchors (center_offset 0, scale_major), written out."""
    octave_scales = torch.tensor([2 ** (i / scales_per_octave) for i in range(scales_per_octave)])
    scales = octave_scales * octave_base_scale
    ratios = torch.tensor(ratios)
    out = []
    for stride, (fh, fw) in zip(strides, feat_sizes):
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (stride * w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (stride * h_ratios[:, None] * scales[None, :]).view(-1)
        base = torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)
        shift_x, shift_y = torch.arange(0, fw) * stride, torch.arange(0, fh) * stride
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
        shifts = torch.stack([xx.reshape(-1), yy.reshape(-1), xx.reshape(-1), yy.reshape(-1)], dim=-1).float()
        out.append((base[None, :, :] + shifts[:, None, :]).view(-1, 4))
    return torch.cat(out)


def test_anchors_are_mmdets():
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    strides, ratios = (8, 16, 32, 64, 128), (0.5, 1.0, 2.0)
    gen = MMDetAnchorGenerator(strides, 4, 3, ratios)
    H, W = 800, 1344  # 1333 x 800 padded; P6 13 x 21 and P7 7 x 11 are not 800 / 64, 800 / 128
    feats = [torch.zeros(1, 1, math.ceil(H / s), math.ceil(W / s), dtype=torch.bfloat16) for s in strides]
    images = ImageList(torch.zeros(2, 3, H, W), [(800, 1333), (790, 1344)])
    ours = gen(images, feats)
    ref = mmdet_anchors(strides, 4, 3, ratios, [f.shape[-2:] for f in feats])
    assert len(ours) == 2 and ours[0].dtype == torch.float32 and torch.equal(ours[0], ref)
    assert gen.num_anchors_per_location() == [9] * 5
    # torchvision's generator with the same sizes: rounded cell anchors, and strides from the padded size
    tv = AnchorGenerator(gen.sizes, gen.aspect_ratios)(images, [f.float() for f in feats])[0]
    assert not torch.equal(tv, ref)
    p3 = slice(0, 100 * 168 * 9)
    assert (tv[p3] - ref[p3]).abs().max() <= 0.5  # P3..P5 differ by the rounding only
    p6 = sum(math.ceil(H / s) * math.ceil(W / s) * 9 for s in strides[:3])
    last_row = p6 + 9 * 21 * 12  # P6's 13th row: torchvision's y-stride is 800 // 13 = 61, not 64
    assert abs((tv[last_row] - ref[last_row])[1] - 12 * (61 - 64)) <= 0.5


# ----------------------------------------------------------------------------- the model
@pytest.mark.parametrize("name", ["retinanet_denseclip_tiny", "retinanet_tiny"])
def test_train_losses_and_eval_detections(name):
    torch.manual_seed(0)
    model = denseclip.build_model(name, NAMES, score_thresh=0.0)
    assert model.task == "detection" and model.num_classes == 3 and model.class_names == NAMES
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    expected = {"loss_cls", "loss_bbox"} | ({"loss_aux"} if name == "retinanet_denseclip_tiny" else set())
    assert set(losses) == expected and all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.neck.fpn_convs[4].conv.weight.grad is not None
    model.eval()
    with torch.no_grad():
        dets = model(images)
    assert len(dets) == 2
    for d, img in zip(dets, images):
        assert set(d) == {"boxes", "scores", "labels"} and 0 < len(d["boxes"]) <= 100
        assert d["labels"].dtype == torch.int64 and d["labels"].max() < 3 and d["scores"].min() > 0
        assert d["boxes"][:, 2].max() <= img.shape[2] and d["boxes"][:, 3].max() <= img.shape[1]  # own pixels
    if name == "retinanet_tiny":  # under autocast the boxes are still decoded in fp32 (mmdet's force_fp32)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(images[:1])[0]["boxes"].dtype == torch.float32


def test_score_map_over_tau_joins_c5_and_aux_loss_sees_resized_boxes(tiny):
    """extract_feat concatenates s / τ (not s); the aux loss gets the boxes in the resized image's pixels."""
    images, targets = _batch()
    big = [F.interpolate(i[None], scale_factor=2.0, mode="bilinear")[0] for i in images]  # resized back to ~128
    big_targets = [dict(t, boxes=t["boxes"] * 2) for t in targets]
    tiny.train()
    losses = tiny(big, big_targets)
    seen = {}
    hook = tiny.neck.register_forward_pre_hook(lambda m, args: seen.update(c5=args[0][-1]))
    batch, resized = tiny.transform(big, big_targets)
    assert batch.tensors.shape[-2:] == (160, 160)  # halved to 128 x 160 and 150 x 128, padded to 32
    feats, score = extract_feat(tiny, batch.tensors)
    hook.remove()
    _, z_global, z_dense = tiny.backbone.forward_dense(batch.tensors)
    s = language.score_map(z_dense, language.context_aware_text(tiny, z_global, z_dense))
    assert torch.allclose(score, s / 0.07, atol=1e-4)
    assert torch.equal(seen["c5"][:, -3:], score) and score.abs().max() > 1  # s / τ, beyond a cosine's range
    target, mask = box_seg_targets([t["boxes"] for t in resized], [t["labels"] for t in resized], 3, (40, 40))
    assert torch.allclose(losses["loss_aux"], box_seg_loss(score, target, mask), atol=1e-6)
    assert not torch.allclose(resized[0]["boxes"], big_targets[0]["boxes"])


@pytest.mark.parametrize("size", [(96, 128), (160, 224)])  # padded sizes: multiples of 32
def test_features_at_two_sizes(tiny, size):
    tiny.eval()
    with torch.no_grad():
        feats, score = extract_feat(tiny, torch.randn(1, 3, *size))
    H, W = size
    assert [tuple(f.shape[-2:]) for f in feats] == [(math.ceil(H / s), math.ceil(W / s)) for s in (8, 16, 32, 64, 128)]
    assert all(f.shape[:2] == (1, 32) for f in feats) and score.shape == (1, 3, H // 32, W // 32)


def test_text_features_cached_in_eval_and_names_follow_the_contract(tiny):
    calls = []
    hook = tiny.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    tiny.eval()
    with torch.no_grad():
        tiny(_batch()[0])
        tiny(_batch()[0])
    hook.remove()
    assert len(calls) == 1
    rules = {name: param_rule(name, CUSTOM_KEYS)["key"] for name, _ in tiny.named_parameters()}
    assert all(k == "backbone" for n, k in rules.items() if n.startswith("backbone."))
    assert all(k != "backbone" for n, k in rules.items() if not n.startswith("backbone."))  # neck, head, decoder
    # the tiny recipes train their random text encoder but its BPE table (configs.TINY_TEXT)
    assert {n for n, p in tiny.named_parameters() if n.startswith("text_encoder.") and not p.requires_grad} == {
        "text_encoder.token_embedding.weight"}
    assert any(k == "norm" for n, k in rules.items() if n.startswith("context_decoder."))
    assert tiny.contexts.requires_grad and tiny.gamma.requires_grad


def test_configs_and_tasks():
    detection = ["retinanet_denseclip_r50", "retinanet_clip_r50", "retinanet_denseclip_r101", "retinanet_clip_r101",
                 "retinanet_denseclip_tiny", "retinanet_tiny"]
    assert set(detection) <= set(CONFIGS)
    assert all(task_of(n) == "detection" for n in detection)
    assert task_of("denseclip_tiny") == "segmentation" and denseclip.DenseCLIP.task == "segmentation"
    r50 = CONFIGS["retinanet_denseclip_r50"]()
    assert (r50.input_resolution, r50.min_size, r50.max_size, r50.topk_candidates, r50.detections_per_img,
            r50.score_thresh, r50.nms_thresh, r50.crop_pos_embed) == (1344, 800, 1333, 1000, 100, 0.05, 0.5, True)
    clip = CONFIGS["retinanet_clip_r101"]()
    assert not clip.use_text and clip.embed_dim is None and clip.vision_layers == (3, 4, 23, 3)
    with pytest.raises(ValueError, match="unknown config"):
        task_of("retinanet_r18")
    with pytest.raises(ValueError, match="must cover max_size"):
        denseclip.build_model("retinanet_denseclip_tiny", NAMES, max_size=300)


# ----------------------------------------------------------------------------- official checkpoints
def _random_state_dict(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(0, 100, s, generator=g) if k.endswith("num_batches_tracked")
            else torch.randn(s, generator=g) for k, s in spec.items()}


@pytest.mark.parametrize("name", ["retinanet_denseclip_r50", "retinanet_clip_r50"])
def test_official_retinanet_checkpoint_loads_strictly(name):
    sd = _random_state_dict(getattr(official_keys, name)())
    model = denseclip.build_model(name)  # COCO's 80 classes
    report = load_checkpoint(model, sd)
    assert report.kind == "model" and not report.missing and not report.unused and len(report.loaded) == len(sd)
    ours = model.state_dict()
    mapped = mmdet_retina_head_to_ours(sd)
    assert len(mapped) == len(sd) and all(torch.equal(ours[k], v) for k, v in mapped.items())
    assert torch.equal(ours["neck.fpn_convs.3.conv.weight"], sd["neck.fpn_convs.3.conv.weight"])  # names kept


def test_mapped_head_gives_the_official_per_anchor_outputs(tmp_path):
    K, A = 3, 9
    sd = _random_state_dict(official_keys.retinanet_denseclip_tiny(K))
    torch.save({"meta": {"mmdet_version": "2.17.0"}, "state_dict": sd}, tmp_path / "official.pth")  # mmdet's file
    model = denseclip.build_model("retinanet_denseclip_tiny", NAMES)
    assert not load_checkpoint(model, str(tmp_path / "official.pth")).missing
    feats = [torch.randn(2, 32, h, w) for h, w in ((12, 10), (6, 5), (3, 3), (2, 2), (1, 1))]
    with torch.no_grad():
        out = model.head(feats)

    def official(branch, final, x):  # mmdet RetinaHead.forward_single, then the (N, H*W*A, C) layout of its loss
        for i in range(4):
            x = F.relu(F.conv2d(x, sd[f"bbox_head.{branch}.{i}.conv.weight"], sd[f"bbox_head.{branch}.{i}.conv.bias"],
                                padding=1))
        x = F.conv2d(x, sd[f"bbox_head.{final}.weight"], sd[f"bbox_head.{final}.bias"], padding=1)
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1] // A)

    cls = torch.cat([official("cls_convs", "retina_cls", f) for f in feats], dim=1)  # (N, sum H*W*A, K)
    reg = torch.cat([official("reg_convs", "retina_reg", f) for f in feats], dim=1)  # (N, sum H*W*A, 4)
    assert cls.shape == (2, (120 + 30 + 9 + 4 + 1) * A, K)
    assert torch.allclose(out["cls_logits"], cls, atol=1e-4) and torch.allclose(out["bbox_regression"], reg, atol=1e-4)


def test_head_mapping_fails_on_unknown_or_missing_keys():
    sd = _random_state_dict(official_keys.retinanet_denseclip_tiny(3))
    with pytest.raises(CheckpointError, match=r"bbox_head\.retina_iou\.weight"):
        mmdet_retina_head_to_ours({**sd, "bbox_head.retina_iou.weight": torch.zeros(1)})
    del sd["bbox_head.reg_convs.3.conv.bias"]
    with pytest.raises(CheckpointError, match=r"missing \['head\.regression_head\.conv\.3\.0\.bias'\]"):
        load_checkpoint(denseclip.build_model("retinanet_denseclip_tiny", NAMES), sd)


def test_openai_clip_initialises_the_detector():
    torch.manual_seed(0)
    clip_sd = tiny_openai_clip().state_dict()
    model = denseclip.build_model("retinanet_denseclip_tiny", NAMES)
    report = load_checkpoint(model, clip_sd)
    assert report.kind == "clip" and report.unused == ["logit_scale"]
    assert all(k.startswith(("neck.", "head.", "context_decoder.", "contexts", "gamma")) for k in report.missing)
    assert torch.equal(model.backbone.layer4[0].conv3.weight, clip_sd["visual.layer4.0.conv3.weight"])
    assert model.backbone.attnpool.positional_embedding.shape == (7 * 7 + 1, 512)  # 2x2 grid resized to 7x7
