"""``python -m trustcnn.study build``: sample test images, render every model's map, write the study directory.

The models are loaded as :mod:`trustcnn.evaluate` loads them (the baseline first, the test set of the
baseline's data config, each run's own saliency method unless ``saliency`` names one for all). Each map is
the one a user sees post hoc: the run's saliency method explaining the class the model predicts (the runs'
``saliency.target``), on the model in eval mode.

Every panel is drawn on one colour scale: each map is upsampled to the display size, divided by its own
maximum (so 0 stays 0 and the peak is 1, whatever the model's scale) and drawn in ``jet`` colours on the
fixed range [0, 1] over the gray image (:func:`trustcnn.viz.overlay_map`).
"""

from __future__ import annotations

import string
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Subset

from trustcnn.metrics import energy_pointing_game
from trustcnn.maps import upsample
from trustcnn.saliency.normalize import normalize_maps
from trustcnn.runs import load_compared_runs
from trustcnn.study.manifest import IMAGES, MANIFEST, Panel, Question, Study
from trustcnn.viz import overlay_map

PANEL_KEYS = string.ascii_uppercase


def sample_questions(test_size: int, questions: int, models: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(test indices (Q,), panel orders (Q, models))``: ``questions`` distinct test images drawn at random,
    and for each a random order of the models on its panels; both from one generator seeded by ``seed``."""
    if questions < 1:
        raise ValueError(f"A study needs at least one question, got --questions {questions}.")
    if questions > test_size:
        raise ValueError(f"--questions {questions} is more than the {test_size} images of the test set; ask for "
                         f"at most {test_size}.")
    rng = np.random.default_rng(seed)
    indices = rng.choice(test_size, size=questions, replace=False)
    orders = np.stack([rng.permutation(models) for _ in range(questions)])
    return indices, orders


def display_size(height: int, width: int, longer_side: int) -> tuple[int, int]:
    """The size at which a ``height × width`` image is shown: its longer side scaled to ``longer_side``."""
    scale = longer_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def render_panels(images: torch.Tensor, maps: dict[str, torch.Tensor], size: tuple[int, int]
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Pictures of a batch, as uint8 RGB arrays at ``size``: the images ``(N, H', W', 3)`` and, per model,
    its maps over the images on the shared colour scale (see the module docstring).

    Args:
        images: ``(N, 3, H, W)`` in [0, 1] (denormalized).
        maps: model name -> ``(N, h, w)`` maps.
        size: ``(H', W')``.
    """
    pics = F.interpolate(images.float().cpu(), size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    pics = pics.permute(0, 2, 3, 1).numpy()

    def uint8(a: np.ndarray) -> np.ndarray:
        return (np.clip(a, 0, 1) * 255).round().astype(np.uint8)

    panels = {}
    for name, m in maps.items():
        scaled = normalize_maps(upsample(m.detach().float().cpu(), size).clamp_min(0), "max").numpy()
        panels[name] = np.stack([uint8(overlay_map(p, s)) for p, s in zip(pics, scaled)])
    return uint8(pics), panels


def build_study(
    runs: Sequence[str | Path],
    baseline: str | Path,
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    questions: int = 50,
    seed: int = 0,
    title: str = "Which map highlights the object?",
    image_size: int = 256,
    data_root: str | None = None,
    device: str | None = None,
    saliency: str | None = None,
) -> Study:
    """Write a study directory (see :mod:`trustcnn.study.manifest`) and return its manifest.

    Args:
        runs: the other models' run directories or ``.ckpt`` files (one or more).
        baseline: the baseline run (e.g. ``loss=ce``); its data config gives the test set.
        out_dir: a new or empty directory.
        names: model names, baseline first (default: the run directories' names). Participants never see them.
        questions: test images to ask about, drawn at random without replacement.
        seed: seeds the images drawn and the panel order of each question.
        title: the heading participants see.
        image_size: the longer side, in pixels, of every picture shown.
        data_root: another ``data.root`` for every run.
        device: where the maps are computed (default CUDA when available).
        saliency: explain every model with this method instead of each run's own.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; a study directory is written once (its answers refer to its "
                         "questions). Choose a new --out.")
    if not runs:
        raise ValueError("A study compares two or more models: pass the baseline and at least one run "
                         "(--baseline RUN --runs RUN [RUN ...]).")
    loaded, base, warnings = load_compared_runs(runs, baseline, names, {"root": data_root} if data_root else None,
                                                saliency=saliency)
    if len(loaded) < 2:
        raise ValueError("A study compares two or more models, but the runs given are all the same checkpoint.")
    if len(loaded) > len(PANEL_KEYS):
        raise ValueError(f"{len(loaded)} models are more than the {len(PANEL_KEYS)} panels (A-Z) a question can show.")
    assert base is not None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for run in loaded.values():
        run.module.to(dev).eval()
    datamodule = loaded[base].datamodule
    test_set = datamodule.main_test_dataloader().dataset
    indices, orders = sample_questions(len(test_set), questions, len(loaded), seed)
    class_names = list(getattr(datamodule, "readable_names", None) or datamodule.class_names)
    model_names = list(loaded)

    images_dir = out / IMAGES
    images_dir.mkdir(parents=True, exist_ok=True)
    items: list[Question] = []
    has_masks = False
    loader = DataLoader(Subset(test_set, indices.tolist()), batch_size=datamodule.batch_size, shuffle=False)
    for x, y, masks in loader:
        x, y, masks = x.to(dev), y.to(dev), masks.to(dev)
        with_masks = masks.numel() > 0
        has_masks |= with_masks
        maps, preds, epg = {}, {}, {}
        for name, run in loaded.items():
            explained = run.module.explain(x, y, create_graph=False)
            maps[name] = explained.maps.detach()
            preds[name] = explained.logits.detach().argmax(dim=1).cpu()
            if with_masks:
                epg[name] = energy_pointing_game(maps[name], masks).cpu()
        size = display_size(*x.shape[-2:], image_size)
        pictures, panels = render_panels(datamodule.denormalize(x), maps, size)
        for i in range(x.shape[0]):
            q = len(items)
            qid = f"q{q:03d}"
            Image.fromarray(pictures[i]).save(images_dir / f"{qid}.png")
            label = int(y[i])
            shown = []
            for key, m in zip(PANEL_KEYS, orders[q]):
                name = model_names[m]
                Image.fromarray(panels[name][i]).save(images_dir / f"{qid}_{key}.png")
                score = float(epg[name][i]) if with_masks else None
                pred = int(preds[name][i])
                shown.append(Panel(key=key, image=f"{qid}_{key}.png", model=name, prediction=pred,
                                   prediction_name=class_names[pred], correct=pred == label,
                                   energy_pointing_game=None if score is None or np.isnan(score) else score))
            items.append(Question(id=qid, test_index=int(indices[q]), label=label, label_name=class_names[label],
                                  image=f"{qid}.png", panels=shown))

    base_data = loaded[base]
    study = Study(
        title=title, seed=int(seed), baseline=base,
        models={n: {"run_dir": str(r.run_dir), "checkpoint": str(r.checkpoint), "loss": r.cfg.loss.name,
                    "saliency": r.cfg.saliency.method} for n, r in loaded.items()},
        data={"datamodule": type(datamodule).__name__, "test_set": datamodule.test_set_names[0],
              "test_set_size": len(test_set), "reference_run": str(base_data.run_dir),
              "config": OmegaConf.to_container(base_data.cfg.data, resolve=True)},
        rendering={"image_size": int(image_size), "colormap": "jet", "alpha": 0.5, "range": [0.0, 1.0],
                   "map_scaling": "each map divided by its own maximum", "device": str(dev)},
        questions=items, has_masks=has_masks,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), warnings=warnings,
    )
    (out / MANIFEST).write_text(study.to_json())
    return study


def build_summary(study: Study, out_dir: str | Path) -> str:
    """What ``build`` prints: the study's size and the commands that come next."""
    correct = {n: sum(p.correct for q in study.questions for p in q.panels if p.model == n) for n in study.models}
    lines = [f"Study written to {out_dir}: {len(study.questions)} questions, {len(study.models)} panels each "
             f"(models {', '.join(study.models)}; baseline {study.baseline}).",
             "Correct predictions on the study images: "
             + ", ".join(f"{n} {c}/{len(study.questions)}" for n, c in correct.items()) + ".",
             f"Next: python -m trustcnn.study serve {out_dir}",
             f"Then: python -m trustcnn.study analyze {out_dir}"]
    return "\n".join(lines)
