"""Label Studio ML backend: annotators' boxes become pre-filled masks, and the model learns
from their boxes. ``boxteacher labelstudio`` runs it; see README.md in this folder.

Modules: settings (configuration), label_config (the labeling config, label mapping),
regions (rectangles <-> pixels, brush RLE), images (fetching task images safely),
model (the served model, local or remote, hot-swappable), predict (tasks -> predictions),
dataset + fit (export, fine-tune, evaluate, swap), app (the HTTP routes), cli,
devserver (a local headless Label Studio), benchmark.
"""
