"""Learning from annotators' boxes: export, fine-tune with BoxTeacher, evaluate, promote.

A training run (``START_TRAINING`` from Label Studio's "Start Training", or every N new
annotations when configured) runs in a background thread, so the webhook answers at once:

1. **export**: the project's annotated tasks through label-studio-sdk
   (``projects.exports.download_sync``, JSON), written as a box-only COCO dataset
   (:mod:`labelstudio_backend.dataset`);
2. **train**: ``training.train.Trainer`` with the served checkpoint's own config and
   ``method=boxteacher``, ``model.weights=<served checkpoint>``, ``solver.max_iter=N``
   (plus ``train_overrides``); boxes are the only supervision;
3. **evaluate**: the old and the new model on the held-out tasks (or the training tasks
   when there are too few, said in the result): box AP (COCO bbox, percent) of their
   detections and, where the annotators drew masks (or accepted brush predictions), the
   mean IoU of the masks they give for the annotators' boxes as prompts;
4. **promote** (:func:`not_worse`): the new checkpoint replaces the served model only when
   it is not worse on both numbers (box AP down by at most ``train_promote_ap_tolerance``
   points, mask IoU by at most ``train_promote_iou_tolerance``; a number not measured on
   both models does not count); then the generation in ``model_version`` goes up, so Label
   Studio predicts again. Otherwise the previous model keeps serving and the new
   checkpoint stays on disk as the run's ``candidate``. Override: ``train_promote=always``,
   or ``"force": true`` in the START_TRAINING request.

Both evaluations, the decision and its reason are in ``status()`` (``/health``) and in the
log. Any failure leaves the old model serving; the error is in ``status()``. The state
(which checkpoint is current, its generation, the last result) is kept in
``WORK_DIR/state.json``, so a restart serves the promoted model again.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import traceback
from pathlib import Path

from labelstudio_backend.images import ImageFetcher
from labelstudio_backend.label_config import parse_label_config
from labelstudio_backend.model import ModelHolder

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


class TrainingError(RuntimeError):
    """A training run that cannot go on; the message says why."""


def read_state(work_dir: Path) -> dict:
    path = Path(work_dir) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_state(work_dir: Path, state: dict) -> None:
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = work_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(work_dir / STATE_FILE)


class TrainingManager:
    """Starts, tracks and reports training runs; one at a time."""

    def __init__(self, holder: ModelHolder, fetcher: ImageFetcher, settings, base_model: Path | None = None):
        self.holder = holder
        self.fetcher = fetcher
        self.settings = settings
        self.work_dir = Path(settings.work_dir)
        self.base_model = base_model
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.annotations_since = 0
        self.runs = 0
        self.failures = 0
        self.current: dict | None = None  # the running run: stage, iteration, ...
        self.last: dict | None = read_state(self.work_dir).get("last_training")

    # ---- triggers --------------------------------------------------------------------------
    def available(self) -> str | None:
        """None when training can run, else why not."""
        s = self.settings
        if not s.train_enabled:
            return "training is disabled (BOXTEACHER_LS_TRAIN_ENABLED=false)"
        if self.holder.path is None:
            return "training needs a PyTorch checkpoint (.pth) served in-process, not an exported model or --server-url"
        if not s.label_studio_url or not s.api_key:
            return "training needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to export the project's annotations"
        return None

    def on_event(self, action: str, payload: dict) -> dict:
        """A Label Studio webhook: START_TRAINING starts a run; created/updated annotations
        count towards ``train_every_n_annotations``. Returns the webhook's answer (fast)."""
        project = payload.get("project") or {}
        if action in ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED"):
            self.annotations_since += 1
            n = self.settings.train_every_n_annotations
            if n and self.annotations_since >= n:
                return self.start(project, reason=f"{self.annotations_since} new annotations")
            return {"status": "ok", "annotations_since_training": self.annotations_since}
        if action == "START_TRAINING":
            return self.start(project, reason="START_TRAINING", force=payload.get("force") is True)
        return {"status": "ok"}

    def start(self, project: dict, reason: str, force: bool = False) -> dict:
        """Start a run in the background for ``project`` (the webhook's project object);
        ``force``: promote its model even when it is worse."""
        why_not = self.available()
        if why_not:
            log.warning("training not started: %s", why_not)
            return {"status": "unavailable", "reason": why_not}
        project_id = project.get("id")
        label_config = project.get("label_config")
        if project_id is None or not label_config:
            return {"status": "unavailable", "reason": "the webhook carries no project id or label config"}
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return {"status": "already_training", "training": dict(self.current or {})}
            self.annotations_since = 0
            self.current = {
                "stage": "starting", "project": project_id, "reason": reason, "force": force, "started_at": time.time(),
                "iteration": 0, "iterations": self.settings.train_iters,
            }  # fmt: skip
            self._thread = threading.Thread(
                target=self._run, args=(int(project_id), label_config, force), name="labelstudio-fit", daemon=True
            )
            self._thread.start()
        log.info("training started for project %s (%s)", project_id, reason)
        return {"status": "training_started", "project": project_id}

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the running run (tests); True when none is running afterwards."""
        t = self._thread
        if t is not None:
            t.join(timeout)
        return t is None or not t.is_alive()

    def promotion_rule(self) -> str:
        s = self.settings
        if s.train_promote == "always":
            return "always (train_promote=always)"
        return (
            f"if not worse on the held-out tasks: box AP down by at most {s.train_promote_ap_tolerance:g} points and "
            f"box-prompted mask IoU (where annotators drew masks) down by at most {s.train_promote_iou_tolerance:g}"
        )

    def status(self) -> dict:
        running = self._thread is not None and self._thread.is_alive()
        return {
            "running": running,
            "serving": {
                "model_version": self.holder.model_version,
                "generation": self.holder.generation,
                "checkpoint": str(self.holder.path) if self.holder.path else None,
            },
            "promotion_rule": self.promotion_rule(),
            "current": dict(self.current) if running and self.current else None,
            "last": self.last,
            "runs": self.runs,
            "failures": self.failures,
            "annotations_since_training": self.annotations_since,
            "available": self.available() is None,
        }

    # ---- one run ----------------------------------------------------------------------------
    def _stage(self, stage: str, **extra) -> None:
        if self.current is not None:
            self.current.update(stage=stage, **extra)
        log.info("training: %s %s", stage, extra or "")

    def _run(self, project_id: int, label_config: str, force: bool = False) -> None:
        started = time.time()
        old_version = self.holder.model_version
        try:
            result = self._train(project_id, label_config, force)
            result.update(status="ok", old_model_version=old_version, new_model_version=self.holder.model_version)
            self.runs += 1
        except Exception as err:  # noqa: BLE001 - any failure keeps the old model serving
            self.failures += 1
            log.error("training failed (the old model keeps serving): %s\n%s", err, traceback.format_exc())
            result = {"status": "failed", "error": f"{type(err).__name__}: {err}", "model_version": old_version}
        result.update(project=project_id, started_at=started, finished_at=time.time(), seconds=round(time.time() - started, 1))
        self.last = result
        state = read_state(self.work_dir)
        state["last_training"] = result
        write_state(self.work_dir, state)
        self.current = None

    def _train(self, project_id: int, label_config: str, force: bool = False) -> dict:
        from labelstudio_backend.dataset import build_box_dataset
        from serving.runtime import load_predictor

        s = self.settings
        config = parse_label_config(label_config)
        if config.rectangle is None:
            raise TrainingError("the labeling config has no <RectangleLabels>: there are no boxes to learn from")
        generation = self.holder.generation + 1
        run_dir = self.work_dir / "runs" / f"v{generation}-{time.strftime('%Y%m%d-%H%M%S')}"

        # 1. export
        self._stage("exporting")
        tasks = self._export(project_id)
        summary = build_box_dataset(tasks, config, self.holder.class_names, self.fetcher, run_dir / "data", s.train_val_fraction)
        if summary.tasks < s.train_min_tasks:
            raise TrainingError(f"{summary.tasks} annotated task(s) with rectangles; at least {s.train_min_tasks} needed")
        self._stage("training", dataset=summary.as_dict())

        # 2. fine-tune (BoxTeacher, boxes only), from the served checkpoint
        current = self.holder.path
        device = s.train_device or s.device

        def on_step(iteration: int, loss: float) -> None:
            if self.current is not None:
                self.current.update(iteration=iteration, loss=round(loss, 4))

        final, losses = fine_tune(current, run_dir / "data", run_dir, s, summary.train_images, on_step)

        # 3. evaluate, old and new, on the same images; 4. promote, or keep the old model
        self._stage("evaluating")
        split = "val" if summary.eval_split == "val" else "train"
        decision = evaluate_and_decide(current, final, run_dir / "data", split, device, s, force)
        better, forced, why = decision["better"], decision["forced"], decision["decision"]
        before, after = decision["eval_before"], decision["eval_after"]
        state = read_state(self.work_dir)
        if better or forced:
            self._stage("swapping")
            predictor = load_predictor(final, s.device, s.branch, int(s.encoding_cache_mb * 1024 * 1024))
            self.holder.swap(predictor, generation)
            state.update(base_model=str(self.base_model) if self.base_model else None, current=str(final), generation=generation)
            state.pop("candidate", None)
            log.info("training done: model %s promoted%s on %s: %s", self.holder.model_version, " (forced)" if forced else "", split, why)
        else:
            state["candidate"] = str(final)
            log.warning(
                "training done: %s kept serving, the new model is not promoted on %s: %s (candidate: %s)",
                self.holder.model_version,
                split,
                why,
                final,
            )
        write_state(self.work_dir, state)
        return {
            "promoted": better or forced,
            "forced": forced,
            "decision": why,
            "checkpoint": str(final),
            "iterations": len(losses),
            "first_loss": round(losses[0], 4) if losses else None,
            "last_loss": round(losses[-1], 4) if losses else None,
            "dataset": summary.as_dict(),
            "eval_split": split,
            "eval_before": before,
            "eval_after": after,
        }

    def _export(self, project_id: int) -> list[dict]:
        """The project's annotated tasks (Label Studio JSON export, through the SDK)."""
        from label_studio_sdk import LabelStudio

        s = self.settings
        client = LabelStudio(base_url=s.label_studio_url, api_key=s.api_key, timeout=120)
        raw = b"".join(client.projects.exports.download_sync(project_id, export_type="JSON", download_all_tasks=False))
        tasks = json.loads(raw)
        if not isinstance(tasks, list):
            raise TrainingError(f"unexpected export from Label Studio: {str(tasks)[:200]}")
        return tasks


def fine_tune(current: Path, data_dir: Path, run_dir: Path, settings, train_images: int, on_step=None) -> tuple[Path, list[float]]:
    """Step 2 of a run: BoxTeacher from the checkpoint ``current`` on the box-only COCO
    folder ``data_dir`` (``train`` split), ``settings.train_iters`` iterations at
    ``settings.train_base_lr`` (None: a tenth of the checkpoint's), with the checkpoint's own
    config; warm-ups are shortened to fit the run. Returns (RUN_DIR/model_final.pth, the
    loss at each iteration). ``on_step(iteration, loss)`` is called after every step."""
    import torch

    from training.checkpoint import config_of, read_checkpoint
    from training.config import build_config
    from training.train import Trainer, infinite

    s = settings
    base = config_of(read_checkpoint(current))
    n = s.train_iters
    lr = s.train_base_lr or base.solver.base_lr * 0.1
    overrides = [
        "method=boxteacher",
        f"model.weights={current}",
        "model.backbone.weights=none",  # every weight comes from the checkpoint
        f"solver.max_iter={n}",
        "solver.steps=[]",
        f"solver.base_lr={lr}",
        f"solver.batch_size={min(s.train_batch_size, train_images)}",
        f"solver.warmup_iters={min(base.solver.warmup_iters, max(n // 10, 1))}",
        f"boxteacher.warmup_iters={min(base.boxteacher.warmup_iters, max(n // 4, 1))}",
        f"boxinst.pairwise_warmup_iters={min(base.boxinst.pairwise_warmup_iters, max(n // 4, 1))}",
        "data.num_workers=0",
        "train.checkpoint_period=0",
        "train.eval_period=0",
        *s.train_overrides,
    ]
    tree = base.model_dump()
    tree["class_names"] = []
    cfg = build_config(tree, overrides)
    trainer = Trainer(cfg, data_dir, run_dir, s.train_device or s.device)
    data = infinite(trainer.loader)
    losses = []
    while trainer.iteration < n:
        images, targets = next(data)
        record = trainer.step(images, targets)
        losses.append(record["loss"])
        if on_step is not None:
            on_step(trainer.iteration, record["loss"])
    final = trainer.save("model_final.pth")
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return final, losses


def evaluate_and_decide(current: Path, new: Path, data_dir: Path, split: str, device: str, settings, force: bool = False) -> dict:
    """Steps 3 and 4 of a run: both checkpoints evaluated on the same ``split`` of
    ``data_dir`` (:func:`evaluate_checkpoint`) and the promotion rule (:func:`not_worse`
    with the settings' tolerances; ``force`` or ``train_promote=always`` promotes a worse
    model). Returns {"better", "forced", "decision", "eval_before", "eval_after"}."""
    s = settings
    before = evaluate_checkpoint(current, data_dir, split, device, s.branch)
    after = evaluate_checkpoint(new, data_dir, split, device, s.branch)
    better, why = not_worse(before, after, s.train_promote_ap_tolerance, s.train_promote_iou_tolerance)
    forced = not better and (force or s.train_promote == "always")
    return {"better": better, "forced": forced, "decision": why, "eval_before": before, "eval_after": after}


def not_worse(before: dict, after: dict, ap_tolerance: float = 0.0, iou_tolerance: float = 0.0) -> tuple[bool, str]:
    """The promotion rule: (is the new model not worse than the old one, why).

    ``before``, ``after``: :func:`evaluate_checkpoint` of the old and the new model on the
    same images. Not worse = box AP ``>= old - ap_tolerance`` and, when both have a mask
    IoU (the images carry annotators' masks), mask IoU ``>= old - iou_tolerance``. A NaN
    counts as worse. When the old model's box AP is not comparable (the labels gained a
    class it does not have), the new model is needed and counts as not worse.
    """
    if before.get("AP") is None:
        return True, "the old model cannot be compared (the labels gained classes it lacks)"
    checks = [("box AP", before["AP"], after.get("AP"), ap_tolerance, "{:.2f}")]
    if before.get("mask_iou") is not None and after.get("mask_iou") is not None:
        checks.append(("mask IoU", before["mask_iou"], after["mask_iou"], iou_tolerance, "{:.3f}"))
    worse, said = [], []
    for name, old, new, tolerance, fmt in checks:
        ok = new is not None and math.isfinite(new) and new >= old - tolerance
        said.append(f"{name} {fmt.format(old)} -> {'none' if new is None else fmt.format(new)}")
        if not ok:
            worse.append(name)
    if worse:
        return False, f"worse {' and '.join(worse)}: " + ", ".join(said)
    return True, "not worse: " + ", ".join(said)


def evaluate_checkpoint(checkpoint: Path, data_dir: Path, split: str, device: str, branch: str | None = None) -> dict:
    """:func:`_box_ap` and :func:`_prompted_mask_iou` of a checkpoint's ``branch`` (the one
    served) on a dataset split."""
    return {**_box_ap(checkpoint, data_dir, split, device, branch), **_prompted_mask_iou(checkpoint, data_dir, split, device, branch)}


def _prompted_mask_iou(checkpoint: Path, data_dir: Path, split: str, device: str, branch: str | None = None) -> dict:
    """Mean IoU between the annotators' masks and the masks the checkpoint gives for their
    boxes as prompts (what an annotator gets from a rectangle), over the split's boxes
    that carry a mask; ``mask_iou`` None when none does."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from serving.runtime import load_predictor
    from training.data.coco import CocoInstances

    dataset = CocoInstances(data_dir, split)
    coco = dataset.coco
    predictor = None
    ious = []
    for image_id in dataset.image_ids:
        anns = [a for a in coco.imgToAnns.get(image_id, []) if a.get("segmentation") and not a.get("iscrowd")]
        if not anns:
            continue
        image = dataset.try_load(image_id)
        if image is None:
            continue
        predictor = predictor or load_predictor(checkpoint, device, branch)
        boxes = np.asarray(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=np.float32
        )
        (instances,) = predictor.predict([image.permute(1, 2, 0).numpy()], boxes=[boxes], use_cache=False)
        for inst, ann in zip(instances, anns):
            true = mask_utils.decode(coco.annToRLE(ann)).astype(bool)
            union = np.logical_or(inst.mask, true).sum()
            ious.append(float(np.logical_and(inst.mask, true).sum() / union) if union else 1.0)
    return {"mask_iou": round(float(np.mean(ious)), 4) if ious else None, "masks": len(ious)}


def _box_ap(checkpoint: Path, data_dir: Path, split: str, device: str, branch: str | None = None) -> dict:
    """COCO box AP / AP50 (percent) of a checkpoint's ``branch`` (None: its default) on a dataset split."""
    from training.checkpoint import load_model
    from training.data.coco import CocoInstances
    from training.evaluate import coco_metrics, predict_dataset

    model, cfg = load_model(checkpoint, branch, device=device)
    dataset = CocoInstances(data_dir, split, class_agnostic=bool(cfg.data.class_agnostic))
    if len(dataset.class_names) != cfg.model.num_classes and not cfg.data.class_agnostic:
        return {"AP": None, "AP50": None, "note": "the classes changed (new labels); not comparable"}
    bbox, _, ids = predict_dataset(model, dataset)
    metrics = coco_metrics(dataset.coco, bbox, "bbox", ids, use_cats=not cfg.data.class_agnostic)
    return {"AP": metrics["AP"], "AP50": metrics["AP50"], "images": len(ids)}
