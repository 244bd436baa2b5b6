"""What the demo's encoder could gain on synthetic chips at all: the demo's JEPA recipe against the
same network trained *supervised* on every label of the pool, for the same steps, and against its
random init, all scored with the same few-shot protocol (mean-pooled tokens, test-time mirror,
10/20-shot linear and 1-NN, 5 seeds, paired on the same support sets).

    python benchmarks/synthetic_ceiling.py --steps 300

Data: the demo's synthetic chips (10 classes × 200, 32 px, seed 0); the 17° chips only, cut into a
validation pool and test (30% of each class, seed 1), so nothing here touches the demo's 15° report
split. The supervised encoder sees all pool labels (a ceiling no few-shot user has): if it gains
little over random init at this budget, a label-free objective cannot be expected to gain more.
Saves ``benchmarks/results/synthetic_ceiling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning_curves as lc  # noqa: E402

from sarjepa_dist.config import ProbeConfig, load_config, merge_tree, to_plain  # noqa: E402
from sarjepa_dist.data.synth import SynthConfig, generate  # noqa: E402
from sarjepa_dist.demo import demo_config  # noqa: E402
from sarjepa_dist.model.encoder import build_encoder  # noqa: E402
from sarjepa_dist.fewshot.protocol import EncoderFeatures, paired_differences, run_protocol, summarise  # noqa: E402
from sarjepa_dist.probe import build_probe_set, embed, stratified_rows  # noqa: E402
from sarjepa_dist.transforms import augment_batch, center_resize, prepare_inputs  # noqa: E402

RECIPE_SECTIONS = ("data", "gradient", "mask", "model", "optim")


def demo_recipe() -> dict:
    """The demo's recipe, taken from ``sarjepa_dist.demo.demo_config`` itself (without its sweep, its
    storage and its few-shot report), so this benchmark cannot drift from the demo."""
    tree = to_plain(demo_config("unused", "unused", "unused", quick=False))
    return {section: tree[section] for section in RECIPE_SECTIONS}


def supervised(cfg, chips: torch.Tensor, labels: np.ndarray, steps: int, key: str, seed: int):
    """The same encoder, mean-pooled tokens → a linear head, cross-entropy on every pool label."""
    torch.manual_seed(seed)
    enc = build_encoder(cfg.model, cfg.data.img_size, cfg.data.channels)
    head = torch.nn.Linear(enc.embed_dim, int(labels.max()) + 1)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=5e-4, weight_decay=0.05)
    y = torch.from_numpy(labels)
    g = torch.Generator().manual_seed(seed)
    aug = cfg.data.augment
    enc.train()
    for _ in range(steps):
        idx = torch.randint(0, len(chips), (cfg.data.batch_size,), generator=g)
        amp = augment_batch(chips[idx], cfg.data.img_size, tuple(aug.crop_scale), aug.flips, aug.rot90, g,
                            vertical_flips=aug.vertical_flips)
        x = prepare_inputs(amp, cfg.data, cfg.gradient, need=(key,))[key]
        loss = torch.nn.functional.cross_entropy(head(enc(x).mean(1)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return enc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(lc.RESULTS / "synthetic_ceiling.json"))
    args = ap.parse_args()
    b = generate(SynthConfig(num_classes=10, per_class=200, size=32, seed=0))
    keep = np.flatnonzero(np.isclose(b.depression_deg, 17.0))
    chips = torch.from_numpy(b.chips[keep].astype(np.float32))
    labels = b.labels[keep].astype(np.int64)
    vp, vt = stratified_rows(labels, None, 0.3, 1)
    recipe = demo_recipe()
    cfg = load_config(None, [], base=merge_tree(recipe, {"train": {"steps": args.steps}}))
    key = lc.eval_key(cfg)
    probe_cfg = ProbeConfig(every=args.steps, shots=10, episodes=5, test_fraction=0.3, max_per_class=None,
                            methods=["knn", "linear"], pooling="mean", seed=1)
    probe_set = build_probe_set(chips.numpy(), labels, probe_cfg, cfg.data, cfg.gradient, keys=("x", "gx"))

    def features(enc, rows):
        x = prepare_inputs(center_resize(chips[rows], cfg.data.img_size), cfg.data, cfg.gradient, need=(key,))[key]
        return embed(enc, x, ["mean"], tta="hflip")["mean"].numpy()

    t0 = time.time()
    model, init_state, _, jepa_s = lc.pretrain(cfg, chips[vp], probe_set, probe_cfg, args.seed, "jepa")
    feats = {"jepa": EncoderFeatures(features(model.eval_encoder, vp), features(model.eval_encoder, vt))}
    model.eval_encoder.load_state_dict(init_state)
    feats["random-init"] = EncoderFeatures(features(model.eval_encoder, vp), features(model.eval_encoder, vt))
    t1 = time.time()
    sup = supervised(cfg, chips[vp], labels[vp], args.steps, key, args.seed)
    feats["supervised"] = EncoderFeatures(features(sup, vp), features(sup, vt))
    sup_s = time.time() - t1
    runs = run_protocol(feats, labels[vp], labels[vt], [str(i) for i in range(10)], shots=[10, 20], seeds=5,
                        methods=["linear", "knn"])
    table = {f"{r.encoder}|{r.method}|{r.shots}": [round(100 * r.interval.mean, 1),
                                                    round(100 * (r.interval.half_width or 0), 1)] for r in summarise(runs)}
    paired = {f"{e}-random-init|{p['method']}|{p['shots']}": [round(100 * p["mean"], 1),
                                                               round(100 * (p.get("half_width") or 0), 1)]
              for e in ("jepa", "supervised") for p in paired_differences(runs, e, "random-init")}
    out = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "steps": args.steps,
           "recipe": recipe, "split": "synthetic 32 px, 17° chips, validation pool/test 70/30 per class (seed 1)",
           "seconds": {"jepa_train": round(jepa_s, 1), "supervised_train": round(sup_s, 1),
                       "total": round(time.time() - t0, 1)},
           "load_avg": os.getloadavg(), "accuracy_pct_mean_halfwidth": table, "paired_pct_mean_halfwidth": paired}
    print("accuracy % (mean ± 95%)")
    for k, (m, h) in table.items():
        print(f"  {k:28s} {m:5.1f} ± {h:4.1f}")
    print("paired against random init (points)")
    for k, (m, h) in paired.items():
        print(f"  {k:40s} {m:+5.1f} ± {h:4.1f}")
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=float))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
