"""The running layer: what train.py, eval.py and demo.py are made of. Tasks (segmentation, detection), the training
step and batch stream, distributed set-up, optimiser groups and schedules, evaluation and metrics, run checkpoints,
pictures. It imports the method and the data, never the other way round."""
