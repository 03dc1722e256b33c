"""torch.hub entry points: one per named config (denseclip.CONFIGS), each building that model and loading weights.

    model = torch.hub.load("path/to/clone", "denseclip_r50", source="local", weights="runs/r50/iter_080000.pt")
    model = torch.hub.load("path/to/clone", "denseclip_tiny", source="local", weights="exports/tiny.safetensors")
    model = torch.hub.load("path/to/clone", "denseclip_r50", source="local", class_names=["sky", "tree"])  # untrained

weights: any file denseclip.load_checkpoint reads (a train.py checkpoint, an export of tools/export.py, an official
DenseCLIP .pth, an OpenAI CLIP .pt to start training from); the config overrides and class names come from the file
when it records them (train.py checkpoints and exports do), else from class_names (default: ADE20K's 150, COCO's 80
for detectors) and the keyword arguments (config fields, e.g. test_mode="whole"). The model is returned in eval mode.
torch.hub lists every public callable of this file as an entry point, so the imports below are private names.
"""
from denseclip.configs import CONFIGS as _CONFIGS

dependencies = ["torch", "torchvision", "ftfy", "regex", "numpy", "PIL"]


def _entry(name: str):
    def entry(weights=None, class_names=None, **overrides):
        from denseclip import build_model
        from denseclip.run.checkpoints import model_from_checkpoint

        if weights is None:
            return build_model(name, class_names, **overrides).eval()
        items = [f"{k}={v!r}" for k, v in overrides.items()]  # as --set FIELD=VALUE, after the file's own
        return model_from_checkpoint(str(weights), name, class_names, items)[0]

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"The {name} model (denseclip.build_model({name!r}, ...)) in eval mode; weights: a file "
                     "load_checkpoint reads. See the module docstring.")
    return entry


for _name in _CONFIGS:
    globals()[_name] = _entry(_name)
