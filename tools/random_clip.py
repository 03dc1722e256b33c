"""Write a randomly initialised CLIP as a state dict with OpenAI's key names, for trying the zero-shot and
loading paths where no CLIP weights can be downloaded. Its predictions mean nothing: real weights are
OpenAI's RN50.pt / ViT-B-16.pt (see data/README.md).

    python tools/random_clip.py pretrained/random_tiny.pt     # the towers of denseclip_tiny, 128 px
    python eval.py pretrained/random_tiny.pt --zero-shot      # zero-shot on the built-in data: near chance
    python tools/random_clip.py pretrained/random_vit.pt --vit   # a small ViT/16 (128 px, 4 blocks) instead
"""
import argparse
from pathlib import Path

import torch

from denseclip.clip import CLIP, TextEncoder, VisionTransformer
from denseclip.configs import denseclip_tiny
from denseclip.errors import run_main, whole
from denseclip.resnet import ModifiedResNet
from denseclip.run.outputs import check_out_file


def random_clip(seed: int = 0, vit: bool = False) -> CLIP:
    """OpenAI's initialisation, with the image and text towers of the denseclip_tiny config; vit: a ViT image tower
    (patch 16, 128 px, width 128, 4 blocks; 2 heads, as load_clip infers from the width) for the ViT read-outs."""
    torch.manual_seed(seed)
    cfg = denseclip_tiny()
    visual = VisionTransformer(cfg.input_resolution, 16, 128, 4, 2, cfg.embed_dim) if vit else \
        ModifiedResNet(cfg.vision_layers, cfg.embed_dim, cfg.vision_heads, cfg.input_resolution, cfg.vision_width)
    text = TextEncoder(77, cfg.vocab_size, cfg.text_width, cfg.text_heads, cfg.text_layers, cfg.embed_dim)
    return CLIP(visual, text)  # 77 text positions: CLIP's own context length, so prompt templates fit


def openai_state_dict(model: CLIP) -> dict:
    """Our CLIP keys -> OpenAI's (the text tower's keys lose the prefix `text.`): the inverse of openai_to_ours."""
    return {k.removeprefix("text."): v for k, v in model.state_dict().items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="file to write (a plain state dict; load_clip and eval.py --zero-shot read it)")
    p.add_argument("--seed", type=whole(0, 2 ** 31 - 1), default=0, help="seed of the random weights (default 0)")
    p.add_argument("--vit", action="store_true", help="a ViT/16 image tower (128 px, 4 blocks) instead of the ResNet")
    args = p.parse_args(argv)
    check_out_file(args.out, "output file", make_folder=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(openai_state_dict(random_clip(args.seed, args.vit)), args.out)
    what = "a small ViT/16 image tower" if args.vit else "denseclip_tiny's towers"
    print(f"wrote a random CLIP ({what}) to {args.out}")


if __name__ == "__main__":
    run_main(main)
