"""The data layer: datasets (procedural shapes, the mmseg layouts of layouts.py, user folders, COCO-format detection),
mmseg's transforms, the one image reader (image_io.py), the data options of the scripts (options.py) and the
pre-flight checks (preflight.py). It imports the method at most for configs and constants, never running code."""
