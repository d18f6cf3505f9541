"""The training side of DiT detection: data loading and checking, COCO evaluation, the staged Trainer, recipes,
model cards and the built-in synthetic data.

Nothing in here is imported by the inference files (configs, modeling, loss, image processing), and nothing in here
travels to the Hub as remote code.
"""
