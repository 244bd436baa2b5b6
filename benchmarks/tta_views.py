"""Test-time views for a saved encoder, on the validation split only: which average of shifted
views of the stored chip to use (``fewshot.tta: hflip+crops`` was chosen here).

    python benchmarks/tta_views.py ENCODER.pt [--data runs/learning_curves/data/mstar128]
        [--seeds 5] [--tag NAME]

ENCODER.pt is a file ``benchmarks/learning_curves.py`` saves; ``--data`` the MSTAR shards it
ingested. The split is the one the learning curves probe (the report pool cut 70/30, seed 1); the
report split's test chips are never read. Every view is mirror-averaged and mean-pooled (the
``hflip`` features) and taken from the stored chip before the resize to the model:

- ``full``: the chip (what ``tta: hflip`` sees); ``cS``: a centre crop of side S px;
  ``cS{tl,tr,bl,br}``: the corner crops of side S; ``sN{u,d,l,r}``: the chip rolled by N px;
- a view set's feature is the mean of its views' features. ``full+five120`` at 128 px is
  ``transforms.crop_views`` (the chip, the centre and four corner crops of 15/16 of its side).

Each view set is scored for the encoder and its random init, 10 classes, K = 10 and 20, linear
and k-NN probes, ``--seeds`` support draws, and paired against ``full``; the hand-made baselines
are scored with ``full`` and ``full+five120``. Results: ``benchmarks/results/tta_views[_TAG].json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import learning_curves as lc  # noqa: E402
from sarjepa_dist.fewshot.protocol import EncoderFeatures, paired_differences, run_protocol, summarise  # noqa: E402
from sarjepa_dist.model.pooling import encode_tokens  # noqa: E402
from sarjepa_dist.transforms import center_resize, prepare_inputs  # noqa: E402

SHIFTS = {"u": (-1, 0), "d": (1, 0), "l": (0, -1), "r": (0, 1)}


def view_specs(side: int) -> dict[str, tuple[str, int, int, int]]:
    """name → (kind, size, dy, dx): ``crop`` of ``size`` offset from the centre, or ``roll``."""
    specs = {"full": ("crop", side, 0, 0)}
    for c in (side * 15 // 16, side * 7 // 8, side * 13 // 16):
        d = (side - c) // 2
        specs[f"c{c}"] = ("crop", c, 0, 0)
        for name, (sy, sx) in {"tl": (-1, -1), "tr": (-1, 1), "bl": (1, -1), "br": (1, 1)}.items():
            specs[f"c{c}{name}"] = ("crop", c, sy * d, sx * d)
    for n in (side // 32, side // 16):
        for name, (sy, sx) in SHIFTS.items():
            specs[f"s{n}{name}"] = ("roll", side, sy * n, sx * n)
    return specs


def view_sets(side: int) -> dict[str, list[str]]:
    c1, c2, c3 = side * 15 // 16, side * 7 // 8, side * 13 // 16
    five = lambda c: [f"c{c}", f"c{c}tl", f"c{c}tr", f"c{c}bl", f"c{c}br"]  # noqa: E731
    n1, n2 = side // 32, side // 16
    return {"full": ["full"], f"c{c1}": [f"c{c1}"], f"c{c2}": [f"c{c2}"], f"full+c{c2}": ["full", f"c{c2}"],
            f"full+c{c1}": ["full", f"c{c1}"], f"five{c2}": five(c2), f"full+five{c2}": ["full", *five(c2)],
            f"full+five{c1}": ["full", *five(c1)], f"full+c{c1}+c{c2}+c{c3}": ["full", f"c{c1}", f"c{c2}", f"c{c3}"],
            f"full+shift{n1}": ["full", *(f"s{n1}{k}" for k in SHIFTS)],
            f"full+shift{n2}": ["full", *(f"s{n2}{k}" for k in SHIFTS)],
            "all": list(view_specs(side))}


def view_amplitude(chips: torch.Tensor, spec: tuple[str, int, int, int], size: int) -> torch.Tensor:
    kind, c, dy, dx = spec
    if kind == "roll":
        return center_resize(torch.roll(chips, shifts=(dy, dx), dims=(-2, -1)), size)
    side = chips.shape[-1]
    top, left = (side - c) // 2 + dy, (side - c) // 2 + dx
    return center_resize(chips[..., top:top + c, left:left + c].contiguous(), size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("encoder", help="an encoder file benchmarks/learning_curves.py saved")
    ap.add_argument("--data", default="runs/learning_curves/data/mstar128", help="the MSTAR shards it ingested")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    chips, labels, val_pool, val_test, class_names = lc.validation_chips(args.data)
    model, init_state, overrides = lc.load_saved(args.encoder)
    cfg = lc.variant_config(overrides, 1)
    key = lc.eval_key(cfg)
    side = chips.shape[-1]
    specs, sets = view_specs(side), view_sets(side)
    enc = model.eval_encoder.eval()

    per_view: dict[tuple[str, str], np.ndarray] = {}
    for tag, state in (("encoder", None), ("random-init", init_state)):
        if state is not None:
            enc.load_state_dict(state)
        for name, spec in specs.items():
            x = prepare_inputs(view_amplitude(chips, spec, cfg.data.img_size), cfg.data, cfg.gradient,
                               need=(key,))[key]
            with torch.no_grad():
                per_view[(tag, name)] = torch.cat([encode_tokens(enc, x[i:i + 256], enc.grid_size, "hflip").mean(1)
                                                   for i in range(0, len(x), 256)]).numpy()
        print(f"embedded {tag}: {len(specs)} views", flush=True)
    feats: dict[str, EncoderFeatures] = {}
    for tag in ("encoder", "random-init"):
        for set_name, names in sets.items():
            f = np.mean([per_view[(tag, n)] for n in names], axis=0)
            feats[f"{tag}/{set_name}"] = EncoderFeatures(f[val_pool], f[val_test])
    crops = f"full+five{side * 15 // 16}"
    for set_name in ("full", crops):
        base = [lc.baseline_features(view_amplitude(chips, specs[n], cfg.data.img_size), cfg) for n in sets[set_name]]
        for b in base[0]:
            f = np.mean([v[b] for v in base], axis=0)
            feats[f"{b}/{set_name}"] = EncoderFeatures(f[val_pool], f[val_test])
    runs = run_protocol(feats, labels[val_pool], labels[val_test], class_names, shots=[10, 20],
                        seeds=args.seeds, methods=["linear", "knn"])
    table = {f"{r.encoder}|{r.method}|{r.shots}": [round(100 * r.interval.mean, 1),
                                                    round(100 * (r.interval.half_width or 0), 1)]
             for r in summarise(runs)}
    paired = {}
    for tag in ("encoder", "random-init", "raw-pixels", "gradient-maps"):
        for set_name in (sets if tag in ("encoder", "random-init") else [crops]):
            if set_name == "full":
                continue
            for row in paired_differences(runs, f"{tag}/{set_name}", f"{tag}/full"):
                paired[f"{tag}/{set_name} − {tag}/full|{row['method']}|{row['shots']}"] = [
                    round(100 * row["mean"], 1), round(100 * (row["half_width"] or 0), 1)]
    for k, (m, h) in table.items():
        print(f"  {k:45s} {m:5.1f} ± {h:4.1f}")
    for k, (m, h) in paired.items():
        print(f"  {k:65s} {m:+5.1f} ± {h:4.1f}")
    out = lc.RESULTS / f"tta_views{'_' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps({"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                               "split": "validation: report pool cut 70/30 (seed 1)", "encoder": args.encoder,
                               "overrides": overrides, "views": {k: list(v) for k, v in specs.items()},
                               "view_sets": sets, "accuracy_pct_mean_halfwidth": table,
                               "paired_pct_mean_halfwidth": paired}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
