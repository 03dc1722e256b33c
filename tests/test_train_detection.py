"""train.py / eval.py on a detector: a COCO-format dataset on disk trains through the real main(), eval.py --out
writes COCO results whose COCOeval AP is exactly the AP printed, resumes are bit-exact, and distributed
evaluation (2 CPU processes, unpadded shards) gives the same detections and AP as one process."""
import json
import shutil
import sys
from pathlib import Path

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_coco import make_coco_dataset  # noqa: E402
from test_train import ROOT, load, torchrun  # noqa: E402

sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402
import train  # noqa: E402

# 64-pixel images kept at their size (min_size 64), 2 images a step (not the official 16); a low score threshold
# so that a barely trained detector still returns boxes for COCOeval to score.
TINY = ["--batch-size", "2", "--global-batch", "2", "--log-interval", "1", "--workers", "0", "--set", "min_size=64",
        "--set", "max_size=107", "--set", "score_thresh=0.001", "--lr", "1e-3", "--warmup-iters", "1"]


def cocoeval_stats(ann_file, results_file):
    gt = COCO(str(ann_file))
    e = COCOeval(gt, gt.loadRes(str(results_file)), "bbox")
    e.evaluate()
    e.accumulate()
    e.summarize()
    return list(e.stats)


def test_train_eval_out_equals_cocoeval(tmp_path, capsys):
    data = make_coco_dataset(tmp_path / "data")
    out = tmp_path / "run"
    res = train.main(["--model", "retinanet_tiny", *TINY, *data, "--iters", "3", "--eval-interval", "0",
                      "--out-dir", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"bbox AP {100 * res['AP']:.2f}"
    assert sorted(p.name for p in out.glob("iter_*.pt")) == ["iter_000002.pt", "iter_000003.pt"]  # every epoch
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"loss_cls", "loss_bbox", "grad_norm"} <= set(log[0]) and log[-1]["AP"] == res["AP"]
    ckpt = load(out / "iter_000003.pt")
    assert ckpt["class_names"] == ["circle", "square", "triangle", "star", "ring", "cross", "heart"]
    assert ckpt["data"] == {"epoch": 1, "seen": 2}  # 4 usable training images of 6: 2 steps an epoch

    dets = tmp_path / "dets.json"
    ev = evaluation.main([str(out / "iter_000003.pt"), "--workers", "0", "--out", str(dets)])
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"bbox AP {100 * ev['AP']:.2f}"
    results = json.loads(dets.read_text())
    assert len(results) > 0 and {r["category_id"] for r in results} <= {2, 5, 8, 11, 14, 17, 20}  # the json's ids
    assert {r["image_id"] for r in results} <= {1001, 1008, 1015}
    assert ev["AP"] == res["AP"]  # the checkpoint reproduces the final evaluation of training
    stats = cocoeval_stats(tmp_path / "data" / "val.json", dets)
    assert stats == [ev[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
                                     "ARm", "ARl")]


def test_detection_resume_is_bit_exact(tmp_path):
    """2N steps == N, --resume auto, N: the DenseCLIP detector (context-decoder dropout on), 2 accumulation steps,
    flips drawn per (epoch, index); 4 usable images at 4 per step make 1 step an epoch, so epochs are crossed."""
    data = make_coco_dataset(tmp_path / "data")
    common = ["--model", "retinanet_denseclip_tiny", *TINY, *data, "--global-batch", "4", "--iters", "4",
              "--save-interval", "2", "--eval-interval", "0", "--val-size", "1"]
    train.main([*common, "--out-dir", str(tmp_path / "a")])
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "iter_000002.pt", tmp_path / "b")
    train.main([*common, "--out-dir", str(tmp_path / "b"), "--resume", "auto"])
    a, b = load(tmp_path / "a" / "iter_000004.pt"), load(tmp_path / "b" / "iter_000004.pt")
    assert a["data"] == b["data"] == {"epoch": 3, "seen": 4}
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    assert not torch.equal(load(tmp_path / "a" / "iter_000002.pt")["model"]["gamma"], a["model"]["gamma"])


def test_distributed_detection_eval_matches_one_process(tmp_path):
    """3 validation images on 2 ranks (shards of 2 and 1, nothing padded): the same results list, the same AP."""
    data = make_coco_dataset(tmp_path / "data", n_train=4)
    torch.manual_seed(0)
    from denseclip import build_model
    model = build_model("retinanet_tiny", ["circle", "square", "triangle", "star", "ring", "cross", "heart"],
                        score_thresh=0.001)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    common = [str(ckpt), "--model", "retinanet_tiny", *data, "--workers", "0", "--set", "min_size=64", "--set",
              "max_size=107", "--set", "score_thresh=0.001"]
    one = evaluation.main([*common, "--out", str(tmp_path / "one.json")])
    torchrun("eval.py", [*common, "--out", str(tmp_path / "ddp.json")])
    assert json.loads((tmp_path / "ddp.json").read_text()) == json.loads((tmp_path / "one.json").read_text())
    assert cocoeval_stats(tmp_path / "data" / "val.json", tmp_path / "ddp.json")[0] == one["AP"]


def test_detection_recipe_is_the_default_for_detectors():
    args = train.parse_args(["--model", "retinanet_denseclip_r50", "--dataset", "coco"])
    assert (args.lr, args.weight_decay, args.backbone_lr_mult, args.clip_grad) == (1e-4, 1e-4, 0.1, 0.1)
    assert (args.epochs, args.lr_steps, args.warmup_iters) == (12, [8, 11], 500)
    assert (args.batch_size, args.global_batch, args.iters) == (2, 16, None)  # iters: 12 epochs of the data
    # the official Mask R-CNN configs (CLIP and DenseCLIP, R50 and R101) double RetinaNet's lr, nothing else
    for name in ("maskrcnn_denseclip_r50", "maskrcnn_clip_r101"):
        mask = train.parse_args(["--model", name, "--dataset", "coco"])
        assert vars(mask) == {**vars(args), "model": name, "lr": 2e-4}
    seg = train.parse_args(["--model", "denseclip_r50", "--dataset", "ade20k"])
    assert (seg.lr, seg.iters, seg.batch_size, seg.global_batch, seg.clip_grad) == (1e-4, 80000, 4, 32, None)
