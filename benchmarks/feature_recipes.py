"""Evaluation feature recipes for a saved encoder, on the validation split only.

    python benchmarks/feature_recipes.py ENCODER.pt [--data runs/learning_curves/data/mstar128]
        [--seeds 3] [--tag NAME]

ENCODER.pt is a file ``benchmarks/learning_curves.py`` saves (the final evaluation encoder, its
random init and the recipe's overrides); ``--data`` the MSTAR shards that script ingested. The
split is the one the learning curves probe: the report pool (70% of each class, seed 0) cut
again 70/30 (seed 1); the report split's test chips are never read. Every recipe averages the
tokens over the chip and its azimuth mirror (``fewshot.tta: hflip``), then:

- ``mean``: mean of the last block's normed tokens (the default);
- ``mean+centre``: that, concatenated with the mean of the central half of the patch grid;
- ``mean+grid2``: that, concatenated with the tokens pooled on a 2×2 grid;
- ``last2`` / ``last4``: the mean-pooled normed tokens of the last 2 / 4 blocks, concatenated.

Each is scored for the encoder and for its random init (the same recipe), 10 classes, K = 10
and 20, linear and k-NN probes, ``--seeds`` support draws, mean ± 95% interval, plus each
recipe's paired difference from ``mean``. Results: ``benchmarks/results/feature_recipes[_TAG].json``.
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
from sarjepa_dist.model.pooling import pool_tokens  # noqa: E402
from sarjepa_dist.transforms import center_resize, prepare_inputs  # noqa: E402

RECIPES = ("mean", "mean+centre", "mean+grid2", "last2", "last4")


def block_tokens(encoder: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The normed tokens after every block (the last one is what ``encoder(x)`` returns)."""
    vit = encoder.vit
    tokens, out = vit.norm_pre(encoder.embed(x)), []
    for blk in vit.blocks:
        tokens = blk(tokens)
        out.append(vit.norm(tokens))
    return out


def mirror_averaged(encoder: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Per block: tokens of ``x`` averaged with those of its azimuth mirror, mirrored back."""
    gh, gw = encoder.grid_size
    b = len(x)
    views = zip(block_tokens(encoder, x), block_tokens(encoder, torch.flip(x, dims=[-1])))
    return [(t + m.reshape(b, gh, gw, -1).flip(2).reshape(b, gh * gw, -1)) / 2 for t, m in views]


def recipe_features(encoder: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> dict[str, np.ndarray]:
    encoder.eval()
    out: dict[str, list[torch.Tensor]] = {r: [] for r in RECIPES}
    with torch.no_grad():
        for start in range(0, len(x), batch):
            blocks = mirror_averaged(encoder, x[start:start + batch])
            last = blocks[-1]
            feats = {"mean": last.mean(1),
                     "mean+centre": torch.cat([last.mean(1), pool_tokens(last, encoder.grid_size, "centre")], 1),
                     "mean+grid2": torch.cat([last.mean(1), pool_tokens(last, encoder.grid_size, "grid2")], 1),
                     "last2": torch.cat([t.mean(1) for t in blocks[-2:]], 1),
                     "last4": torch.cat([t.mean(1) for t in blocks[-4:]], 1)}
            for name, f in feats.items():
                out[name].append(f)
    return {name: torch.cat(parts).numpy() for name, parts in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("encoder", help="an encoder file benchmarks/learning_curves.py saved")
    ap.add_argument("--data", default="runs/learning_curves/data/mstar128", help="the MSTAR shards it ingested")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    chips, labels, val_pool, val_test, class_names = lc.validation_chips(args.data)
    model, init_state, overrides = lc.load_saved(args.encoder)
    cfg = lc.variant_config(overrides, 1)
    key = lc.eval_key(cfg)
    amp = center_resize(chips, cfg.data.img_size)
    x = prepare_inputs(amp, cfg.data, cfg.gradient, need=(key,))[key]

    feats: dict[str, EncoderFeatures] = {}
    for tag, state in (("encoder", None), ("random-init", init_state)):
        if state is not None:
            model.eval_encoder.load_state_dict(state)
        for name, f in recipe_features(model.eval_encoder, x).items():
            feats[f"{tag}/{name}"] = EncoderFeatures(f[val_pool], f[val_test])
    runs = run_protocol(feats, labels[val_pool], labels[val_test], class_names, shots=[10, 20],
                        seeds=args.seeds, methods=["linear", "knn"])
    table = {f"{r.encoder}|{r.method}|{r.shots}": [round(100 * r.interval.mean, 1),
                                                    round(100 * (r.interval.half_width or 0), 1)]
             for r in summarise(runs)}
    paired = {}
    for tag in ("encoder", "random-init"):
        for name in RECIPES[1:]:
            for row in paired_differences(runs, f"{tag}/{name}", f"{tag}/mean"):
                paired[f"{tag}/{name} − {tag}/mean|{row['method']}|{row['shots']}"] = [
                    round(100 * row["mean"], 1), round(100 * (row["half_width"] or 0), 1)]
    for k, (m, h) in table.items():
        print(f"  {k:40s} {m:5.1f} ± {h:4.1f}")
    for k, (m, h) in paired.items():
        print(f"  {k:60s} {m:+5.1f} ± {h:4.1f}")
    out = lc.RESULTS / f"feature_recipes{'_' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps({"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                               "split": "validation: report pool cut 70/30 (seed 1)", "encoder": args.encoder,
                               "overrides": overrides, "accuracy_pct_mean_halfwidth": table,
                               "paired_pct_mean_halfwidth": paired}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
