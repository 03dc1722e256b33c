"""How well a trained segmentor's text side tells its classes apart, next to how well its image side does.

    python bench/text_side.py runs/demo/iter_003000.pt              # a train.py checkpoint of the procedural data
    python bench/text_side.py runs/seeds/denseclip_tiny_seed*/iter_003000.pt --val-size 50

For each checkpoint, on the built-in procedural validation images:
- the cosine similarity between the K class embeddings t (language.class_text_features: the class names after the
  learnable contexts through the text encoder), their mean over the K(K-1) pairs and the pairs above --close;
- the confusion of the score map (argmax of s / tau, the auxiliary loss's classifier) and of the decode head
  (the model's prediction), each row a ground-truth class in % of its pixels, with the per-class IoU.
With CLIP's text encoder, t carries a language prior; with the tiny models' random one, trained with the contexts,
t is in effect a learned linear classifier of the stride-32 map z, and the pairs of names it leaves close are the
pairs of shapes the image side confuses (bench/README.md, "Why it stays level").
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from denseclip import language  # noqa: E402
from denseclip.data.procedural import ProceduralShapes  # noqa: E402
from denseclip.errors import ConfigError, run_main  # noqa: E402
from denseclip.run.checkpoints import model_from_checkpoint  # noqa: E402
from denseclip.run.metrics import ConfusionMatrix  # noqa: E402


def percent_rows(mat: torch.Tensor) -> torch.Tensor:
    """A confusion matrix (true x predicted counts) as % of each true class's pixels."""
    return 100 * mat.double() / mat.sum(1, keepdim=True).clamp(min=1)


def table(names, rows, fmt: str) -> str:
    width = max(len(n) for n in names)
    head = " " * (width + 2) + " ".join(f"{n[:6]:>6}" for n in names)
    return "\n".join([head] + [f"{n:>{width}}  " + " ".join(fmt.format(v) for v in row)
                               for n, row in zip(names, rows.tolist())])


@torch.no_grad()
def inspect(path: str, val_size: int, batch: int, close: float):
    model, _, run = model_from_checkpoint(path)
    if not getattr(model.cfg, "use_text", False) or not hasattr(model, "score_logits"):
        raise ConfigError(f"{path}: not a segmentor with a text side (a DenseCLIP segmentation checkpoint is needed)")
    names = model.class_names
    data = ProceduralShapes("val", size=run.get("crop_size") or model.cfg.input_resolution)  # as train.py's eval
    if list(data.class_names) != list(names):
        raise ConfigError(f"{path}: its classes {names} are not the procedural data's {data.class_names}")
    t = torch.nn.functional.normalize(language.class_text_features(model)[0].double(), dim=-1)  # (K, D)
    cos = t @ t.T
    pairs = [(cos[i, j].item(), names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]
    off = cos[~torch.eye(len(names), dtype=torch.bool)]
    count = len(data) if val_size <= 0 else min(val_size, len(data))
    print(f"\n== {path} ({count} val images of {data.size} pixels)")
    print(f"cosine between the class embeddings t: mean {off.mean():.3f}, min {off.min():.3f}, max {off.max():.3f}")
    print(table(names, cos, "{:6.2f}"))
    near = sorted(p for p in pairs if p[0] > close)[::-1]
    print(f"pairs above {close}: " + (", ".join(f"{a}/{b} {c:.2f}" for c, a, b in near) or "none"))
    score_cm, head_cm = (ConfusionMatrix(len(names), model.cfg.ignore_index) for _ in range(2))
    for start in range(0, count, batch):
        images, labels = map(torch.stack, zip(*(data[i] for i in range(start, min(start + batch, count)))))
        score_cm.update(model.score_logits(images).argmax(1), labels)  # s / tau at input size: the aux classifier
        head_cm.update(model.predict(images, out_size=labels.shape[-2:]).argmax(1), labels)
    found = {"cos": cos}
    for key, title, cm in (("score", "score map (argmax s / tau)", score_cm), ("head", "decode head", head_cm)):
        found[key] = res = cm.compute()
        print(f"{title}: mIoU {100 * res['mIoU']:.2f}, IoU per class "
              + " ".join(f"{n} {100 * v:.0f}" for n, v in zip(names, res["IoU"])))
        print("confusion, % of each true class (rows) predicted as (columns):")
        print(table(names, percent_rows(cm.mat), "{:6.0f}"))
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="train.py checkpoints of DenseCLIP segmentors (procedural data)")
    p.add_argument("--val-size", type=int, default=0, help="validation images to read (0: all 200)")
    p.add_argument("--batch", type=int, default=50, help="images per forward")
    p.add_argument("--close", type=float, default=0.95, help="list the name pairs whose cosine is above this")
    args = p.parse_args(argv)
    for path in args.checkpoints:
        inspect(path, args.val_size, args.batch, args.close)


if __name__ == "__main__":
    run_main(main)
