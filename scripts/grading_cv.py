"""Cross-validated comparison of grading-classifier settings on the training studies (model-card ceiling study).

Usage:
    python scripts/grading_cv.py TASK [--set KEY=VALUE ...] [--folds 5] [--multitask] [--save FILE.npz]
                                 [--num-threads N] [--quiet]

``TASK`` is ``vertebra`` or ``disc``. Each fold trains one classifier with the searched parameters of
``spinepath/configs/grading_params.json`` changed by ``--set`` (any
:class:`spinepath.grading.classifier.GradingConfig` field, e.g.
``--set crop_mm=56 --set epochs=96 --set mixup=0.4 --set ema=0.995``) on the other folds' studies and predicts
the held-out studies' structures at their labelled centres (one view, superior-inferior flip averaged). Folds
are by study, as in ``spinepath train grading``; the validation split is never used. ``--multitask`` trains one
ConvNeXt with a vertebra logit and five disc logits on both kinds of crops (each kind cut with its own task's
crop settings; ``--set`` applies to both) and reports both tasks.

Prints one JSON object: vertebra AUC and/or disc quadratic kappa, macro-F1 and within-one accuracy (contract
definitions of ``spinepath evaluate grading``) for the argmax and ordinal decision rules, out of fold.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _parse_sets(items: list[str], cfg) -> dict:
    """``KEY=VALUE`` overrides typed like the config field they replace."""
    out = {}
    names = {f.name: f for f in dataclasses.fields(cfg)}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(names)}")
        out[key] = type(getattr(cfg, key))(value)
    return out


def _metrics(task: str, y: np.ndarray, p: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    from spinepath.evaluation.grading import disc_metrics
    from spinepath.grading.calibration import disc_grade

    if task == "vertebra":
        return {"auc": round(float(roc_auc_score(y, p)), 4), "n": int(len(y))}
    res: dict = {"n": int(len(y))}
    for rule in ("argmax", "ordinal"):
        d = disc_metrics(y + 1, disc_grade(p, rule) + 1)  # 0-based grades -> v1..v5 = 1..5
        res[rule] = {k: round(d[k], 4) for k in ("quadratic_kappa", "macro_f1", "within_one_accuracy")}
    return res


def _train_multitask(cfgs: dict, images: dict, train: dict, progress: bool):
    """One ConvNeXt, logit 0 = vertebra, logits 1-5 = disc grades; returns one eval-mode module per task."""
    import torch

    from spinepath.grading.classifier import CropDataset, build_classifier, class_weights, loss_fn, warmup_cosine

    class Tagged(torch.utils.data.Dataset):
        def __init__(self, ds, tag: int) -> None:
            self.ds, self.tag = ds, tag

        def __len__(self) -> int:
            return len(self.ds)

        def __getitem__(self, i: int):
            x, y = self.ds[i]
            return x, y, self.tag

    class Head(torch.nn.Module):
        def __init__(self, net, sl: slice) -> None:
            super().__init__()
            self.net, self.sl = net, sl

        def forward(self, x):
            return self.net(x)[:, self.sl]

    cv, cd = cfgs["vertebra"], cfgs["disc"]
    torch.manual_seed(cd.seed)
    ds = torch.utils.data.ConcatDataset([Tagged(CropDataset(images, train["vertebra"], cv, True), 0),
                                         Tagged(CropDataset(images, train["disc"], cd, True), 1)])
    dl = torch.utils.data.DataLoader(ds, batch_size=cd.batch_size, shuffle=True, drop_last=True,
                                     generator=torch.Generator().manual_seed(cd.seed))
    weights = {"vertebra": class_weights([s.grade for s in train["vertebra"]], 2, cv.class_weight_power),
               "disc": class_weights([s.grade for s in train["disc"]], 5, cd.class_weight_power)}
    net = build_classifier(cd, num_outputs=6)
    opt = torch.optim.AdamW(net.parameters(), lr=cd.lr, weight_decay=cd.weight_decay)
    sched = warmup_cosine(opt, len(dl), cd.epochs * len(dl))
    from tqdm.auto import tqdm

    for _ in tqdm(range(cd.epochs), desc="multitask epochs", disable=not progress, leave=False):
        net.train()
        for x, y, tag in dl:
            logits = net(x)
            loss = 0.0
            for t, k, sl in (("vertebra", 0, slice(0, 1)), ("disc", 1, slice(1, 6))):
                m = tag == k
                if bool(m.any()):  # the task's mean loss, weighted by its share of the batch
                    loss = loss + m.float().mean() * loss_fn(t, logits[m][:, sl], y[m], weights[t],
                                                             cd.label_smoothing, cd.ordinal_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    return {"vertebra": Head(net, slice(0, 1)), "disc": Head(net, slice(1, 6))}


def main(argv: list[str] | None = None) -> int:
    """Run the cross-validation and print the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=("vertebra", "disc"))
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--multitask", action="store_true")
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--save", help="write the out-of-fold labels and probabilities (npz)")
    ap.add_argument("--num-threads", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)

    import torch
    from tqdm.auto import tqdm

    from spinepath.data.datasets import load_spark
    from spinepath.data.split import is_validation
    from spinepath.grading.classifier import predict_structures, train_classifier
    from spinepath.grading.crops import spark_structures
    from spinepath.grading.search import load_params
    from spinepath.transforms import normalise_image

    if a.num_threads:
        torch.set_num_threads(a.num_threads)
    tasks = ("vertebra", "disc") if a.multitask else (a.task,)
    cfgs = {t: load_params(t) for t in ("vertebra", "disc")}
    for t in cfgs:
        cfgs[t] = dataclasses.replace(cfgs[t], **_parse_sets(a.sets, cfgs[t]))
    cases = [c for c in load_spark(Path(a.data_root) / "spark_midsag") if not is_validation("spark_midsag", c.case)]
    images = {c.case: normalise_image(c.load_image()) for c in cases}
    structs = {c.case: [s for s in spark_structures(c) if s.grade >= 0] for c in cases}
    ids = [c.case for c in cases]
    t0 = time.time()
    ys: dict = {t: [] for t in tasks}
    ps: dict = {t: [] for t in tasks}
    for f in tqdm(range(a.folds), desc="folds", disable=a.quiet):
        part = {side: {t: [s for i, c in enumerate(ids) if (i % a.folds == f) == (side == "test")
                           for s in structs[c] if s.kind == t] for t in ("vertebra", "disc")}
                for side in ("train", "test")}
        if a.multitask:
            models = _train_multitask(cfgs, images, part["train"], not a.quiet)
        else:
            models = {a.task: train_classifier(cfgs[a.task], images, part["train"][a.task], progress=not a.quiet)[0]}
        for t in tasks:
            ys[t].append(np.array([s.grade for s in part["test"][t]]))
            ps[t].append(predict_structures([models[t]], cfgs[t], images, part["test"][t]))
    result: dict = {"task": a.task, "multitask": a.multitask, "set": a.sets, "folds": a.folds,
                    "minutes": round((time.time() - t0) / 60, 1)}
    for t in tasks:
        result[t] = _metrics(t, np.concatenate(ys[t]), np.concatenate(ps[t]))
    if a.save:
        np.savez(a.save, **{f"{t}_{k}": np.concatenate(v[t]) for t in tasks for k, v in (("y", ys), ("p", ps))})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
