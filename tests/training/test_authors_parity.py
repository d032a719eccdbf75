"""Our CondInst with converted weights reproduces the authors' own outputs.

The oracle (shared/fixtures/authors-boxteacher-r18) was made by running BoxTeacher's
code (detectron2 + AdelaiDet) on CPU. Tolerances follow its README.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import AUTHORS_FIXTURE
from PIL import Image

from training.convert import ConversionError, authors_config, convert_authors_checkpoint, convert_state, map_key, read_authors_state
from training.model.condinst import build_model
from training.model.fcos import decode_detections
from training.model.scores import authors_pseudo_weight

pytestmark = pytest.mark.skipif(not AUTHORS_FIXTURE.is_dir(), reason=f"authors' fixture not found at {AUTHORS_FIXTURE}")

MAX_PROB_DEVIATION = 1e-3  # see check_parity
IMAGES = {"image1": "image1_synth_160x224.png", "image2": "image2_pennfudan_FudanPed00001_256x267.png"}


@pytest.fixture(scope="module")
def authors():
    torch.set_num_threads(2)
    state, kind = read_authors_state(AUTHORS_FIXTURE / "teacher_state_dict_fp16.pt")
    outputs = torch.load(AUTHORS_FIXTURE / "outputs.pt", weights_only=False)
    return state, kind, outputs


def _model(state, kind, perturb: str | None = None):
    cfg = authors_config(state, kind, overrides=["model.fcos.score_threshold=0.0"])
    mapped, _ = convert_state(state, cfg)
    if perturb is not None:
        mapped = dict(mapped)
        mapped[perturb] = mapped[perturb].clone()
        mapped[perturb].view(-1)[0] += 0.5
    model = build_model(cfg)
    model.load_state_dict(mapped)
    return model.eval()


def _image(tag: str) -> torch.Tensor:
    array = np.array(Image.open(AUTHORS_FIXTURE / IMAGES[tag]).convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _run(model, tag):
    image = _image(tag)
    with torch.no_grad():
        batch, sizes = model.preprocess([image])
        feats = model.backbone(batch)
        bottom_up = model.backbone.bottom_up(batch)
        head, mask_feats = model(batch)
        raw = decode_detections(head, 0, model.cfg.model.fcos)
        det = model.detect(head, mask_feats, sizes)[0]
        inst = model.to_instances(det, sizes[0], return_probs=True)
    return dict(batch=batch, feats=feats, bottom_up=bottom_up, head=head, mask_feats=mask_feats, raw=raw, det=det, inst=inst)


def check_parity(ours: dict, theirs: dict, full_features: bool) -> dict[str, float]:
    """Assert every stage within the fixture README's tolerances; return the deviations."""
    dev: dict[str, float] = {}
    dev["input"] = float((ours["batch"][0] - theirs["input_tensor_normalized_padded"]).abs().max())
    assert dev["input"] == 0.0
    if full_features:
        for k, v in theirs["backbone_feats"].items():
            dev[f"backbone.{k}"] = _rel(ours["bottom_up"][k], v)
        for k, v in theirs["fpn_feats"].items():
            dev[f"fpn.{k}"] = _rel(ours["feats"][k], v)
        dev["mask_feats"] = _rel(ours["mask_feats"], theirs["mask_feats"])
        for name in ("cls_logits", "bbox_reg", "ctrness", "controller"):
            dev[f"head.{name}"] = max(float((a - b).abs().max()) for a, b in zip(getattr(ours["head"], name), theirs["head_raw"][name]))
        for k in [k for k in dev if k.startswith(("backbone", "fpn", "mask_feats"))]:
            assert dev[k] < 1e-4, (k, dev[k])
        for k in [k for k in dev if k.startswith("head.")]:
            assert dev[k] < 1e-3, (k, dev[k])
    det, inst = ours["det"], ours["inst"]
    n = int(theirs["num_dets"])
    assert len(inst) == n and det.dets.boxes.shape[0] == n
    # Detections before post-processing, in the same (NMS) order.
    assert torch.equal(det.dets.labels, theirs["pre_post_classes"])
    assert torch.equal(det.dets.levels, theirs["pre_post_fpn_levels"])
    dev["pre_post_boxes_px"] = float((det.dets.boxes - theirs["pre_post_boxes"]).abs().max())
    dev["pre_post_locations_px"] = float((det.dets.locations - theirs["pre_post_locations"]).abs().max())
    dev["s_det"] = float((det.dets.det_scores - theirs["pre_post_scores_sqrt_cls_ctr"]).abs().max())
    dev["controller_params"] = float((det.dets.params - theirs["mask_head_params"]).abs().max())
    assert dev["pre_post_boxes_px"] < 1e-2 and dev["pre_post_locations_px"] == 0.0
    assert dev["s_det"] < 1e-4 and dev["controller_params"] < 1e-3
    # Stride-4 mask probabilities on the padded canvas.
    # The README suggests abs 1e-4; the same code on 1 vs 2 threads already moves these by
    # 5e-5, and the CPU's kernels move them more (bmm for their grouped conv, torchvision's
    # FrozenBN): image2's max was 1.3e-4 (102 of 460k values over 1e-4) on an Intel CPU and
    # 3.9e-4 (157 values) on an AMD EPYC, mean 1.2e-6 / 2.8e-6 on both. So the bounds are
    # on the bulk (mean, share of values over 1e-4) with a looser max; a wrong weight moves
    # all three by orders of magnitude (test_parity_fails_when_one_weight_is_wrong).
    diff4 = (det.mask_probs - theirs["pred_global_masks_stride4"][:, 0]).abs()
    dev["masks_stride4"], dev["masks_stride4_mean"] = float(diff4.max()), float(diff4.mean())
    dev["masks_stride4_share_over_1e-4"] = float((diff4 > 1e-4).float().mean())
    assert dev["masks_stride4"] < MAX_PROB_DEVIATION and dev["masks_stride4_mean"] < 1e-5
    assert dev["masks_stride4_share_over_1e-4"] < 1e-3
    # Final instances: boxes, classes, both scores, binary masks.
    assert torch.equal(inst.labels, theirs["pred_classes"])
    dev["boxes_px"] = float((inst.boxes - theirs["pred_boxes"]).abs().max())
    dev["scores"] = float((inst.scores - theirs["scores"]).abs().max())
    weight = authors_pseudo_weight(inst.det_scores, inst.mean_mask_prob)
    dev["mask_score"] = float((weight - theirs["mask_score"]).abs().max())
    assert dev["boxes_px"] < 1e-2 and dev["scores"] < 1e-4 and dev["mask_score"] < 1e-4
    h, w = theirs["pred_masks_shape"][1:]
    packed = theirs["pred_masks_packbits"].numpy()
    their_masks = torch.from_numpy(np.unpackbits(packed, axis=-1)[..., :w].astype(bool))
    ious = _mask_iou(inst.masks, their_masks)
    dev["mask_iou_min"] = float(ious.min())
    assert dev["mask_iou_min"] > 0.999
    top = theirs["top10_index"]
    dev["top10_fullres_probs"] = float((inst.mask_probs[top] - theirs["top10_mask_probs_fullres"]).abs().max())
    assert dev["top10_fullres_probs"] < MAX_PROB_DEVIATION  # pasted from stride 4
    return dev


@pytest.mark.parametrize("tag", ["image1", "image2"])
def test_converted_model_matches_the_authors(authors, tag):
    state, kind, outputs = authors
    model = _model(state, kind)
    dev = check_parity(_run(model, tag), outputs[tag], full_features=tag == "image1")
    print(tag, {k: f"{v:.2e}" for k, v in dev.items()})


# One tensor per part of the network: a wrong mapping of any of them must fail.
PERTURBED = [
    "backbone.body.bn1.running_var",
    "backbone.body.layer3.0.downsample.1.bias",
    "backbone.fpn.extra_blocks.p7.weight",
    "head.bbox_tower.4.weight",
    "head.scales.2.scale",
    "head.controller.bias",
    "mask_branch.refine.2.1.running_mean",
    "mask_branch.tower.4.bias",
]


@pytest.mark.parametrize("key", PERTURBED)
def test_parity_fails_when_one_weight_is_wrong(authors, key):
    state, kind, outputs = authors
    model = _model(state, kind, perturb=key)
    with pytest.raises(AssertionError):
        check_parity(_run(model, "image1"), outputs["image1"], full_features=True)


def test_key_mapping_examples():
    assert map_key("backbone.bottom_up.res4.1.conv2.norm.running_var") == "backbone.body.layer3.1.bn2.running_var"
    assert map_key("backbone.bottom_up.res3.0.shortcut.weight") == "backbone.body.layer2.0.downsample.0.weight"
    assert map_key("backbone.fpn_output5.bias") == "backbone.fpn.layer_blocks.2.0.bias"
    assert map_key("proposal_generator.fcos_head.cls_tower.9.weight") == "head.cls_tower.9.weight"
    assert map_key("controller.weight") == "head.controller.weight"
    assert map_key("backbone.bottom_up.res3.0.conv2_offset.weight") is None


def test_converter_refuses_unexpected_key_and_shape(authors, tmp_path):
    state, kind, _ = authors
    cfg = authors_config(state, kind)
    extra = dict(state, **{"backbone.bottom_up.res3.0.conv2_offset.weight": torch.zeros(18, 128, 3, 3)})
    with pytest.raises(ConversionError, match="conv2_offset"):
        convert_state(extra, cfg)
    bad = dict(state)
    bad["proposal_generator.fcos_head.ctrness.weight"] = torch.zeros(2, 256, 3, 3)
    with pytest.raises(ConversionError, match="fcos_head.ctrness.weight"):
        convert_state(bad, cfg)
    missing = {k: v for k, v in state.items() if k != "mask_branch.tower.4.bias"}
    with pytest.raises(ConversionError, match="mask_branch.tower.4.bias"):
        convert_state(missing, cfg)


def test_convert_detectron2_checkpoint_with_branches(authors, tmp_path):
    """A BoxTeacher-style {"model": {teacher.*, student.*}} file converts per branch."""
    state, _, _ = authors
    src = tmp_path / "boxteacher.pth"
    student = {k: v.clone() for k, v in state.items()}
    student["controller.bias"] = student["controller.bias"] + 1
    torch.save(
        {"model": {**{f"teacher.{k}": v for k, v in state.items()}, **{f"student.{k}": v for k, v in student.items()}}, "iteration": 5}, src
    )
    from training.checkpoint import load_model, read_checkpoint

    out = convert_authors_checkpoint(src, tmp_path / "ours.pth", branch="student")
    model, cfg = load_model(out)
    assert cfg.input.format == "BGR" and cfg.model.num_classes == 2 and cfg.model.mask.out_channels == 16
    assert torch.allclose(model.head.controller.bias, student["controller.bias"].float())
    assert read_checkpoint(out).get("teacher") is None
