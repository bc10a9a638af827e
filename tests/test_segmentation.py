"""Segmentation (issue 14): partial labels, each dataset supervising only the classes it annotates."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from spinepath.segmentation.partial import CLASSES, group_log_probs, label_groups, partial_label_loss


def test_label_groups_of_each_dataset():
    spider = label_groups(["vertebra", "disc", "spinal_canal"])
    assert spider.shape == (4, len(CLASSES))
    assert spider[0].tolist() == [1, 0, 0, 0, 0]  # SPIDER annotates everything else: background is background
    assert spider[1].tolist() == [0, 1, 1, 0, 0]  # its vertebra = body or posterior elements
    body = label_groups(["vertebral_body"])  # chu_t2 / spineweb_vb
    assert body[0].tolist() == [1, 0, 1, 1, 1] and body[1].tolist() == [0, 1, 0, 0, 0]
    disc = label_groups(["disc"])  # ivd_t2
    assert disc[0].tolist() == [1, 1, 1, 0, 1]
    with pytest.raises(ValueError, match="unknown annotation"):
        label_groups(["ribs"])
    with pytest.raises(ValueError, match="twice"):
        label_groups(["vertebra", "vertebral_body"])


def _logits(cls: int, shape=(1, 4, 4), strength: float = 8.0) -> torch.Tensor:
    z = torch.zeros(shape[0], len(CLASSES), *shape[1:])
    z[:, cls] = strength
    return z


def test_an_unannotated_class_is_not_pushed_to_background():
    """On a body-only mask, posterior elements where the mask says 0 cost nothing; a body there costs."""
    groups = torch.from_numpy(label_groups(["vertebral_body"]))[None]
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    posterior = partial_label_loss(_logits(CLASSES.index("posterior_elements")), target, groups, dice_weight=0)
    body = partial_label_loss(_logits(CLASSES.index("vertebral_body")), target, groups, dice_weight=0)
    assert posterior < 0.01 < 5 < body
    # SPIDER's vertebra is satisfied by either the body or the posterior elements, not by the disc
    sg = torch.from_numpy(label_groups(["vertebra", "disc", "spinal_canal"]))[None]
    t1 = torch.ones(1, 4, 4, dtype=torch.long)
    for c in ("vertebral_body", "posterior_elements"):
        assert partial_label_loss(_logits(CLASSES.index(c)), t1, sg, dice_weight=0) < 0.01
    assert partial_label_loss(_logits(CLASSES.index("disc")), t1, sg, dice_weight=0) > 5


def test_marginals_sum_to_one_and_mixed_batches_pad_groups():
    """Samples of different datasets in one batch: groups padded with zero rows; ignored pixels cost nothing."""
    rng = torch.Generator().manual_seed(0)
    logits = torch.randn(2, len(CLASSES), 6, 6, generator=rng, requires_grad=True)
    a = label_groups(["vertebra", "disc", "spinal_canal"])
    b = np.zeros_like(a)
    b[:2] = label_groups(["disc"])
    groups = torch.from_numpy(np.stack([a, b]))
    lg = group_log_probs(logits, groups)
    assert torch.allclose(lg[0].exp().sum(0), torch.ones(6, 6), atol=1e-5)
    assert torch.allclose(lg[1, :2].exp().sum(0), torch.ones(6, 6), atol=1e-5) and (lg[1, 2:].exp() == 0).all()
    target = torch.randint(0, 4, (2, 6, 6), generator=rng)
    target[1] = target[1].clamp(max=1)
    target[1, :3] = -1
    loss = partial_label_loss(logits, target, groups)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad[1, :, :3].abs().sum() == 0  # ignored rows
    perfect = torch.where(_onehot(target[0], 4) > 0, 20.0, -20.0)  # SPIDER sample predicted exactly
    z = torch.full((1, len(CLASSES), 6, 6), -20.0)
    z[0, 0], z[0, 1], z[0, 3], z[0, 4] = perfect[0], perfect[1], perfect[2], perfect[3]
    assert partial_label_loss(z, target[:1], groups[:1]) < 1e-3


def _onehot(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(t, n).permute(2, 0, 1)


def test_real_slices_on_the_grid_keep_their_size_and_labels(data_root):
    from spinepath.data.datasets import load_volume_index
    from spinepath.data.spider import load_spider_seg
    from spinepath.segmentation.data import GRID_MM, spider_seg_slices, volume_seg_slices

    case = load_spider_seg(data_root / "spider_seg")[0]
    img, msk = case.load(0)
    (s,) = list(spider_seg_slices(case, [0]))
    assert s.annotated == ["vertebra", "disc", "spinal_canal"] and s.groups.shape == (4, len(CLASSES))
    assert s.image.dtype == np.float32 and 0 <= s.image.min() and s.image.max() <= 1
    assert abs(s.image.shape[0] * GRID_MM - img.shape[0] * case.spacing[0]) <= GRID_MM
    for v, g in ((1, 1), (2, 2), (3, 3)):  # areas in mm^2 kept within 5%
        a, b = (msk == v).sum() * np.prod(case.spacing), (s.target == g).sum() * GRID_MM**2
        assert abs(a - b) <= 0.05 * a, (v, a, b)
    vol = next(c for c in load_volume_index(data_root / "ivd_t2"))
    slices = list(volume_seg_slices(vol))
    n = vol.n_slices
    assert [x.index for x in slices] == list(range((n % 4) // 2, n, 4))
    assert all(x.annotated == ["disc"] and set(np.unique(x.target)) <= {0, 1} for x in slices)
    assert any((x.target == 1).sum() > 100 for x in slices)


def test_group_dice_merges_classes_as_the_mask_does():
    from spinepath.segmentation.metrics import group_dice

    groups = label_groups(["vertebra", "disc", "spinal_canal"])
    target = np.zeros((4, 4), np.int64)
    target[:2] = 1  # vertebra
    target[2, :2] = 2  # disc
    pred = np.zeros((4, 4), np.int64)
    pred[0] = CLASSES.index("vertebral_body")
    pred[1] = CLASSES.index("posterior_elements")  # still the vertebra
    pred[2, :1] = CLASSES.index("disc")
    d = group_dice(pred, target, groups, ["vertebra", "disc", "spinal_canal"])
    assert d["vertebra"] == 1.0 and abs(d["disc"] - 2 / 3) < 1e-9 and d["spinal_canal"] is None
    body = group_dice(pred, (target == 1).astype(np.int64), label_groups(["vertebral_body"]), ["vertebral_body"])
    assert body["vertebral_body"] == 2 * 4 / (4 + 8)  # the posterior elements are not body


def test_a_short_training_run_writes_a_model_that_segments(data_root, tmp_path):
    """Real data, 2 cases per source, 1 epoch: the loop, the selection Dice, the fp16 model and the curves."""
    from spinepath.core.weights import float_state
    from spinepath.segmentation.network import SegNetConfig, build_segnet, predict_probabilities
    from spinepath.segmentation.training import load_slices, train_segmentation

    cfg = SegNetConfig(filters=(8, 16, 32, 64, 64), epochs=1, batch_size=4, patch=128)
    res = train_segmentation(data_root, tmp_path, cfg, step=8, max_cases=2, num_threads=2, progress=False)
    assert res["best_epoch"] == 1 and res["train_slices"] > 20
    assert set(res["best_selection_dice"]) >= {"vertebra", "disc", "spinal_canal", "vertebral_body"}
    assert (tmp_path / "curves.png").stat().st_size > 1000
    saved = torch.load(tmp_path / "segmentation.pt", weights_only=False)
    assert all(v.dtype == torch.float16 for v in saved["state"].values() if v.is_floating_point())
    model = build_segnet(SegNetConfig.from_dict(saved["cfg"]))
    model.load_state_dict(float_state(saved["state"]))
    # DynUNet registers its input block twice (among its skip layers): the file holds those tensors once
    st = saved["state"]
    assert st["input_block.conv1.conv.weight"].data_ptr() == st["skip_layers.downsample.conv1.conv.weight"].data_ptr()
    n_params = sum(p.numel() for p in model.parameters())
    assert (tmp_path / "segmentation.pt").stat().st_size < 1.5 * 2 * n_params  # fp16, each weight once
    s = load_slices(data_root, "selection", step=8, max_cases=1)[0]
    p = predict_probabilities(model, torch.from_numpy(s.image)[None, None])
    assert p.shape == (1, len(CLASSES), *s.image.shape) and torch.allclose(p.sum(1), torch.ones(1), atol=1e-4)


def test_training_from_a_slice_pack_with_workers_and_a_time_budget(data_root, tmp_path):
    """The pack a lent GPU trains from holds the same slices (8-bit images); loader workers and a time budget
    that fits fewer epochs than asked cut the cosine schedule there."""
    from spinepath.segmentation.data import load_slice_pack, save_slice_pack
    from spinepath.segmentation.network import SegNetConfig
    from spinepath.segmentation.training import load_slices, train_segmentation

    parts = {"train": load_slices(data_root, "train", step=8, max_cases=1),
             "selection": load_slices(data_root, "selection", step=8, max_cases=1)}
    save_slice_pack(tmp_path / "pack.npz.xz", parts)
    back = load_slice_pack(tmp_path / "pack.npz.xz")
    assert {p: len(v) for p, v in back.items()} == {p: len(v) for p, v in parts.items()}
    for a, b in zip(parts["train"] + parts["selection"], back["train"] + back["selection"]):
        assert (a.source, a.case, a.patient, a.index, a.annotated) == (b.source, b.case, b.patient, b.index,
                                                                       b.annotated)
        assert np.array_equal(a.target, b.target) and np.array_equal(a.groups, b.groups)
        assert np.abs(a.image - b.image).max() <= 0.5 / 255 + 1e-6
    cfg = SegNetConfig(filters=(8, 16, 32, 64, 64), epochs=50, batch_size=4, patch=96)
    res = train_segmentation(data_root, tmp_path / "run", cfg, num_threads=2, progress=False,
                             pack=tmp_path / "pack.npz.xz", workers=1, time_budget_min=0.01)
    assert res["train_slices"] == len(parts["train"]) and res["selection_slices"] == len(parts["selection"])
    assert len(res["history"]) == 2 == res["cfg"]["epochs"]  # 0.6 s fit no more than the two measured epochs
    assert cfg.epochs == 50  # the caller's configuration is left as it was
    assert (tmp_path / "run" / "segmentation.pt").is_file()


def test_level_instances_follow_the_named_chain():
    """Bodies matched to the named boxes, discs between consecutive named bodies, the canal as one structure."""
    from spinepath.segmentation.instances import level_instances

    cls = np.zeros((200, 120), np.int64)
    body, disc, canal = (CLASSES.index(c) for c in ("vertebral_body", "disc", "spinal_canal"))
    boxes = {}
    for i, lv in enumerate(("L3", "L4", "L5")):
        r0 = 20 + i * 50
        cls[r0:r0 + 35, 20:70] = body
        boxes[lv] = (r0 - 2, 18, r0 + 37, 72)
        if i < 2:
            cls[r0 + 37:r0 + 48, 22:68] = disc
    cls[0:200, 80:95] = canal
    cls[190:199, 20:60] = body  # an unnamed body below (S1 not in the chain): not matched
    inst = level_instances(cls, boxes)
    assert list(inst["bodies"]) == ["L3", "L4", "L5"] and list(inst["discs"]) == ["L3-L4", "L4-L5"]
    assert inst["bodies"]["L4"].sum() == 35 * 50 and inst["discs"]["L3-L4"].sum() == 11 * 46
    assert inst["canal"].sum() == 200 * 15
    del boxes["L4"]  # a level the chain does not name gives no body and no disc around it
    inst = level_instances(cls, boxes)
    assert list(inst["bodies"]) == ["L3", "L5"] and inst["discs"] == {}


def test_evaluate_segmentation_contract(data_root, tmp_path):
    """The contract's keys through the CLI, with a real (one-epoch) model; a class the folder lacks is null."""
    import json
    import subprocess
    import sys

    from spinepath.segmentation.network import SegNetConfig
    from spinepath.segmentation.training import train_segmentation

    train_segmentation(data_root, tmp_path, SegNetConfig(filters=(8, 16, 32, 64, 64), epochs=1, batch_size=4,
                                                         patch=128), step=8, max_cases=2, progress=False)
    for folder, annotated in (("spider_seg", {"vertebra", "disc", "spinal_canal"}), ("ivd_t2", {"disc"})):
        # one case of the folder, in its format (the images linked, not copied)
        small = tmp_path / folder
        small.mkdir()
        index = json.loads((data_root / folder / "index.json").read_text())
        first = sorted(index)[0]
        (small / "index.json").write_text(json.dumps({first: index[first]}))
        for entry in (data_root / folder).iterdir():
            if entry.name != "index.json":
                (small / entry.name).symlink_to(entry)
        r = subprocess.run([sys.executable, "-m", "spinepath", "-q", "evaluate", "segmentation", str(small),
                            "--split", "all", "--seg-model", str(tmp_path / "segmentation.pt")],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        res = json.loads(r.stdout)
        assert res["task"] == "segmentation" and res["n_cases"] == 1 and res["n_slices"] > 1
        assert set(res["dice"]) == {"vertebra", "vertebral_body", "disc", "spinal_canal"}
        assert {k for k, v in res["dice"].items() if v is not None} <= annotated
        assert set(res["measurements"]) == {"n_levels", "vertebral_body_height_mae_mm", "disc_height_mae_mm",
                                            "canal_ap_mae_mm"}
        assert res["dice"]["disc"] is not None
    r = subprocess.run([sys.executable, "-m", "spinepath", "-q", "evaluate", "segmentation",
                        str(data_root / "spark_midsag"), "--seg-model", str(tmp_path / "segmentation.pt")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "segmentation needs" in r.stderr


def test_measurement_pairs_take_the_canal_as_one_structure():
    """A speck labelled canal in front of a disc (annotation noise) is not where the canal is measured: the
    reference and the prediction, identical but for the speck, give the same AP diameter and disc height."""
    from spinepath.evaluation.segmentation import slice_measurement_pairs
    from spinepath.segmentation.data import GRID_MM, SegSlice

    target = np.zeros((200, 160), np.int64)  # groups: 1 vertebra, 2 disc, 3 spinal canal
    target[40:80, 30:90] = 1
    target[80:92, 30:90] = 2
    target[92:132, 30:90] = 1
    target[20:180, 95:110] = 3  # a 15-pixel (12 mm on the 0.8 mm grid) canal behind the bodies
    classes = np.select([target == 1, target == 2, target == 3], [1, 3, 4], 0)  # body, disc, canal
    target[84:90, 70:76] = 3  # the speck, inside the disc's rows
    s = SegSlice(image=np.zeros(target.shape, np.float32), target=target, groups=np.zeros((4, 5)),
                 annotated=["vertebra", "disc", "spinal_canal"], source="spider_seg", case="x", patient="x",
                 index=0, spacing_mm=(0.8, 0.8))
    pairs, n = slice_measurement_pairs(s, classes)
    assert n == 3 and len(pairs["canal"]) == 1
    ref, pred = pairs["canal"][0]
    assert ref == pytest.approx(pred, abs=0.1) and ref == pytest.approx(15 * GRID_MM, abs=0.2)


def test_a_body_is_measured_only_where_the_reference_canal_covers_it():
    """SPIDER's canal masks often stop above L5: the vertebra below the canal's end has no reference body (its
    front wall would be extrapolated, cutting it anywhere), so only the vertebra the canal covers is measured,
    and its heights agree with the prediction's."""
    from spinepath.evaluation.segmentation import slice_measurement_pairs
    from spinepath.segmentation.data import SegSlice

    target = np.zeros((200, 160), np.int64)  # groups: 1 vertebra, 2 disc, 3 spinal canal
    for top in (20, 110):  # two vertebrae: a 40-row body in front, posterior elements behind the canal
        target[top:top + 40, 30:90] = 1
        target[top:top + 60, 110:130] = 1
    target[60:72, 30:90] = 2
    target[10:100, 95:110] = 3  # the canal ends at row 100, above the lower vertebra
    classes = np.zeros_like(target)
    classes[(target == 1) & (np.arange(160)[None] < 95)] = 1  # the network's bodies
    classes[(target == 1) & (np.arange(160)[None] >= 95)] = 2  # posterior elements
    classes[target == 2] = 3
    classes[target == 3] = 4
    s = SegSlice(image=np.zeros(target.shape, np.float32), target=target, groups=np.zeros((4, 5)),
                 annotated=["vertebra", "disc", "spinal_canal"], source="spider_seg", case="x", patient="x",
                 index=0, spacing_mm=(0.8, 0.8))
    pairs, n = slice_measurement_pairs(s, classes)
    assert n == 2  # the upper body and the disc; the lower vertebra has no reference body
    assert len(pairs["body"]) == 3  # anterior, middle, posterior of the upper body
    for ref, pred in pairs["body"]:
        assert ref == pytest.approx(40 * 0.8, abs=2.5) and pred == pytest.approx(ref, abs=0.1)


def test_a_predicted_body_is_the_partner_of_one_reference_body():
    """Structures are paired one to one: a predicted component spanning two reference bodies (the disc between
    them missed) is measured against the nearer one only, not twice."""
    from spinepath.evaluation.segmentation import slice_measurement_pairs
    from spinepath.segmentation.data import SegSlice

    target = np.zeros((200, 160), np.int64)  # one group: vertebral body (chu_t2-like)
    target[60:75, 30:90] = 1  # two 15-row bodies with a 3-row gap
    target[78:93, 30:90] = 1
    classes = np.zeros_like(target)
    classes[60:93, 30:90] = 1  # one predicted component over both, its centroid within 10 mm of both
    s = SegSlice(image=np.zeros(target.shape, np.float32), target=target, groups=np.zeros((2, 5)),
                 annotated=["vertebral_body"], source="chu_t2", case="x", patient="x", index=0,
                 spacing_mm=(0.8, 0.8))
    pairs, n = slice_measurement_pairs(s, classes)
    assert n == 1 and len(pairs["body"]) == 3  # one body's anterior, middle and posterior heights


def test_class_offsets_belong_to_the_weights_they_were_chosen_for(tmp_path):
    """The committed weights get the offsets chosen for them on the selection split; other weights get none;
    an offset moves the arg-max where two classes are close."""
    import json

    from spinepath.core.config import config_file
    from spinepath.core.paths import resolve_segmentation_path
    from spinepath.segmentation.inference import OFFSETS_CONFIG, decide, load_offsets

    path = resolve_segmentation_path(None)
    chosen = json.loads(config_file(OFFSETS_CONFIG).read_text())["log_offsets"]
    assert load_offsets(path) == [chosen.get(c, 0.0) for c in CLASSES]
    other = tmp_path / "segmentation.pt"
    other.write_bytes(path.read_bytes() + b"\0")  # retrained weights: a different digest
    assert load_offsets(other) is None
    probs = torch.tensor([0.05, 0.30, 0.05, 0.35, 0.25]).view(1, 5, 1, 1)
    assert decide(probs).item() == CLASSES.index("disc")
    assert decide(probs, [0.0, 1.0, 0.0, -1.0, 0.0]).item() == CLASSES.index("vertebral_body")


def test_combined_networks_predict_the_mean_of_their_logits(data_root, tmp_path):
    """`train segmentation --combine`: one model file of two networks, scored on real selection slices; its
    logits are the members' mean, eager and exported; fine-tuning keeps both members; a combination is not a
    member, different layouts do not combine, and the CLI says so with a non-zero exit."""
    import shutil
    import subprocess
    import sys

    from spinepath.core.exported import file_digest
    from spinepath.segmentation.inference import export_segmenter, load_segmenter
    from spinepath.segmentation.network import MeanLogits, SegNetConfig, build_segnet
    from spinepath.segmentation.training import combine_segmenters, save_segmenter, train_segmentation

    cfg = SegNetConfig(filters=(8, 16, 32, 64, 64), epochs=1, batch_size=4, patch=128)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"m{seed}.pt")
        save_segmenter(build_segnet(cfg), cfg, paths[-1], epoch=1, selection_dice={})
    res = combine_segmenters(paths, tmp_path / "both", data_root, max_cases=1)
    again = combine_segmenters([shutil.copy(p, tmp_path / f"copy{i}.pt") for i, p in enumerate(paths)],
                               tmp_path / "again", data_root, max_cases=1)  # the same files elsewhere
    assert again["members"] == res["members"]
    assert file_digest(tmp_path / "again" / "segmentation.pt") == file_digest(tmp_path / "both" / "segmentation.pt")
    assert [m["sha256"] for m in res["members"]] == [file_digest(p) for p in paths]
    assert set(res["selection_dice"]) >= {"vertebra", "disc", "spinal_canal"}
    model = load_segmenter(tmp_path / "both" / "segmentation.pt", exported=False)
    assert isinstance(model, MeanLogits) and model.meta["cfg"]["members"] == 2
    members = [load_segmenter(p, exported=False) for p in paths]
    x = torch.rand(1, 1, 64, 48)
    with torch.no_grad():
        want = (members[0](x) + members[1](x)) / 2
        assert torch.allclose(model(x), want, atol=1e-5)
        export_segmenter(model, tmp_path / "both" / "segmentation.pt")
        exported = load_segmenter(tmp_path / "both" / "segmentation.pt")
        assert isinstance(exported, torch.jit.ScriptModule) and torch.allclose(exported(x), want, atol=1e-5)
    tuned = train_segmentation(data_root, tmp_path / "tuned", cfg, step=8, max_cases=1, progress=False,
                               init_from=tmp_path / "both" / "segmentation.pt")
    assert tuned["cfg"]["members"] == 2
    assert isinstance(load_segmenter(tmp_path / "tuned" / "segmentation.pt", exported=False), MeanLogits)
    with pytest.raises(ValueError, match="cannot be a member"):
        combine_segmenters([paths[0], tmp_path / "both" / "segmentation.pt"], tmp_path / "no", data_root)
    wide = replace(cfg, filters=(8, 16, 32, 64, 128))
    save_segmenter(build_segnet(wide), wide, tmp_path / "wide.pt", epoch=1, selection_dice={})
    with pytest.raises(ValueError, match="different network layouts"):
        combine_segmenters([paths[0], tmp_path / "wide.pt"], tmp_path / "no", data_root)
    r = subprocess.run([sys.executable, "-m", "spinepath", "train", "segmentation", "--combine", str(paths[0]),
                        "--out-dir", str(tmp_path / "no")], capture_output=True, text=True)
    assert r.returncode != 0 and "at least two" in r.stderr and not (tmp_path / "no").exists()


def test_an_interrupted_run_resumes_to_the_same_model(data_root, tmp_path, monkeypatch):
    """`train segmentation --resume`: a run cut during its second epoch continues from its last.pt to the same
    history and the same model file as an uninterrupted run (CPU, no loader workers); other settings are
    refused; a complete run leaves no last.pt."""
    from spinepath.core.exported import file_digest
    from spinepath.segmentation import training
    from spinepath.segmentation.network import SegNetConfig

    cfg = SegNetConfig(filters=(8, 16, 32, 64, 64), epochs=2, batch_size=4, patch=64)
    kw = {"step": 8, "max_cases": 1, "num_threads": 2, "progress": False}
    full = training.train_segmentation(data_root, tmp_path / "full", cfg, **kw)
    assert len(full["history"]) == 2 and not (tmp_path / "full" / "last.pt").exists()
    evaluate, calls = training.evaluate_slices, []

    def cut(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the session ends")  # during the second epoch's scoring
        return evaluate(*args)

    monkeypatch.setattr(training, "evaluate_slices", cut)
    with pytest.raises(RuntimeError, match="session ends"):
        training.train_segmentation(data_root, tmp_path / "cut", cfg, **kw)
    monkeypatch.setattr(training, "evaluate_slices", evaluate)
    assert (tmp_path / "cut" / "last.pt").is_file()
    with pytest.raises(ValueError, match="other settings"):
        training.train_segmentation(data_root, tmp_path / "cut", replace(cfg, lr=1e-3), resume=True, **kw)
    resumed = training.train_segmentation(data_root, tmp_path / "cut", cfg, resume=True, **kw)

    def without_time(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in e.items() if k != "seconds"} for e in history]

    assert without_time(resumed["history"]) == without_time(full["history"])
    assert file_digest(tmp_path / "cut" / "segmentation.pt") == file_digest(tmp_path / "full" / "segmentation.pt")
    assert not (tmp_path / "cut" / "last.pt").exists()


def test_paired_case_gain_resamples_cases_within_each_source():
    """The selection score is the mean over (source, class) of the mean over cases, so a source of one case
    weighs as much as one of many; the paired gain sees a real gain, none between a model and itself, and
    every draw keeps each source's number of cases."""
    from spinepath.evaluation.segmentation_selection import paired_case_gain, selection_score

    rng = np.random.default_rng(0)
    base = {("spider_seg", f"p{i}"): {"disc": float(d), "vertebra": 0.92} for i, d in enumerate(rng.uniform(.8, .9, 8))}
    base[("ivd_t2", "only")] = {"disc": 0.80}
    assert selection_score(base) == pytest.approx(np.mean([np.mean([v["disc"] for k, v in base.items()
                                                                      if k[0] == "spider_seg"]), 0.92, 0.80]))
    better = {k: {n: v + 0.01 for n, v in d.items()} for k, d in base.items()}
    r = paired_case_gain(base, better, n=200)
    assert r["gain"] == pytest.approx(0.01, abs=1e-4) and r["ci95"][0] > 0 and r["cases_better"] == 9
    mixed = {k: {n: v + (0.02 if k[1] in ("p0", "p1") else -0.01) for n, v in d.items()} for k, d in base.items()}
    r = paired_case_gain(base, mixed, n=200)
    assert r["gain"] < 0 and r["ci95"][0] < 0  # two cases up, seven down
    same = paired_case_gain(base, base, n=50)
    assert same["gain"] == 0 and same["ci95"] == [0, 0]
    with pytest.raises(ValueError, match="no scored case"):
        paired_case_gain(base, {("chu_t2", "x"): {"vertebral_body": 0.9}})
    # a class one model did not score on a case: the two scores would weigh different classes
    fewer = {k: {n: v for n, v in d.items() if not (k == ("spider_seg", "p3") and n == "vertebra")}
             for k, d in better.items()}
    with pytest.raises(ValueError, match=r"different classes on 1 case\(s\).*p3"):
        paired_case_gain(base, fewer, n=20)


def test_offset_search_scores_the_contract_dice(data_root):
    """Without offsets the search's score of a selection case is the contract's Dice of that case (the same
    slices, the same pixels); the grid is searched best first, and an offset changes the masks."""
    from spinepath.core.paths import resolve_segmentation_path
    from spinepath.data.split import split_cases
    from spinepath.evaluation.segmentation import evaluate_segmentation
    from spinepath.evaluation.segmentation_selection import search_offsets, selection_probabilities
    from spinepath.segmentation.inference import load_segmenter

    model = load_segmenter(resolve_segmentation_path(None), offsets=False)
    slices = selection_probabilities(model, data_root, progress=False, sources=("spider_seg",), max_cases=1)
    case = split_cases(data_root / "spider_seg", "selection")[0]
    assert {s.case for s, _ in slices} == {case} and len(slices) > 3
    results = search_offsets(slices, {"disc": (0.0, -2.0), "spinal_canal": (0.0, 2.25)}, progress=False)
    assert len(results) == 4 and results[0].score >= results[-1].score
    assert len({round(r.score, 6) for r in results}) > 1
    zero = next(r for r in results if not any(r.offsets.values()))
    contract = evaluate_segmentation(data_root / "spider_seg", model, [case], progress=False)["dice"]
    assert zero.per_source()["spider_seg"] == {k: v for k, v in contract.items() if v is not None}


def test_positions_named_from_the_bottom_keep_neighbours():
    """Bodies and discs of a slice are named in order from the bottom; a body missing between two discs leaves
    its name out, so the bodies around it are not taken for neighbours."""
    from spinepath.evaluation.measurement_agreement import name_from_bottom

    def band(r0: int, r1: int) -> np.ndarray:
        m = np.zeros((200, 40), bool)
        m[r0:r1, 10:30] = True
        return m

    # from the bottom: disc, body, disc, (no body), disc, body
    bodies = [band(150, 180), band(55, 85)]
    discs = [band(185, 195), band(135, 145), band(90, 100)]
    b, d = name_from_bottom(bodies, discs)
    assert {k: int(np.flatnonzero(v.any(1))[0]) for k, v in b.items()} == {"L5": 150, "L3": 55}
    assert {k: int(np.flatnonzero(v.any(1))[0]) for k, v in d.items()} == {"L5-S1": 185, "L4-L5": 135, "L3-L4": 90}


def test_the_reference_s1_is_named_and_not_measured():
    """Where the source labels the sacrum (spineweb_vb's lowest body is S1), the pairs name that body S1, so that,
    as in the product, its height loss is not measured and L5's is against L4 alone; the slip over it stays."""
    from spinepath.evaluation.measurement_agreement import slice_derived_pairs
    from spinepath.segmentation.data import SegSlice

    sp = (0.5, 0.5)
    target = np.zeros((400, 120), np.int64)
    tops = {}
    top = 10
    for lv, h in (("L3", 50), ("L4", 50), ("L5", 50), ("S1", 30)):  # S1 reads 40 % shorter than L5
        target[top:top + h, 20:100] = 1
        tops[lv] = top
        top += h + 16
    sacral = np.zeros(target.shape, bool)
    sacral[tops["S1"]:tops["S1"] + 30] = True
    s = SegSlice(np.zeros(target.shape, np.float32), target, label_groups(["vertebral_body"]), ["vertebral_body"],
                 "spineweb_vb", "x", "x", 0, sp)
    classes = np.where(target == 1, CLASSES.index("vertebral_body"), 0)
    as_l5 = slice_derived_pairs(s, classes, sp)  # positions only: the sacrum's body is taken for L5
    named = slice_derived_pairs(s, classes, sp, sacral)
    assert {lv for lv, _, _ in as_l5["height_loss"]} == {"L2", "L3", "L4", "L5"}
    assert dict((lv, r) for lv, r, _ in as_l5["height_loss"])["L5"] == pytest.approx(0.4, abs=0.02)
    assert {lv for lv, _, _ in named["height_loss"]} == {"L3", "L4", "L5"}  # L3 L4 L5 are now the real ones
    assert all(r == pytest.approx(0.0, abs=0.02) for _, r, _ in named["height_loss"])
    assert [lv for lv, _, _ in named["listhesis_mm"]][-1] == "L5-S1"


def test_derived_values_of_identical_masks_agree(data_root):
    """A prediction equal to a real spider_seg slice's reference (bodies = the vertebrae in front of the canal)
    gives every derived value exactly, at every position the reference gives it."""
    from spinepath.data.split import split_cases
    from spinepath.evaluation.measurement_agreement import DERIVED, slice_derived_pairs
    from spinepath.evaluation.segmentation import _front_cut, evaluation_slices
    from spinepath.segmentation.instances import components

    root = data_root / "spider_seg"
    slices = evaluation_slices(root, split_cases(root, "selection")[:1])
    s = slices[len(slices) // 2]
    s = replace(s, target=s.native, native=None)
    names = ["background", *s.annotated]
    canal = s.target == names.index("spinal_canal")
    vertebra = s.target == names.index("vertebra")
    cuts = [c for c in (_front_cut(v, canal) for v in components(vertebra, 30)) if c is not None]
    assert len(cuts) >= 4
    body = np.any(cuts, axis=0)
    classes = np.zeros(s.target.shape, np.int64)
    classes[vertebra] = CLASSES.index("posterior_elements")
    classes[vertebra & body] = CLASSES.index("vertebral_body")
    classes[s.target == names.index("disc")] = CLASSES.index("disc")
    classes[canal] = CLASSES.index("spinal_canal")
    pairs = slice_derived_pairs(s, classes, s.spacing_mm)
    assert set(pairs) == set(DERIVED)
    assert len(pairs["height_loss"]) >= 3 and len(pairs["narrowing_ratio"]) >= 3 and pairs["canal_ap_mm"]
    for k, v in pairs.items():
        assert all(r == p for _, r, p in v), k


def test_the_sacrum_of_sources_that_leave_it_unlabelled_is_unknown_not_background():
    """``--sacrum-unknown``: below the lowest vertebra / disc pixel of each column, a spider_seg or chu_t2 mask's
    unlabelled pixels leave the loss (-1) instead of teaching that S1 is no body; labels (the canal), the
    columns without spine, and sources that label S1 (spineweb_vb) stay as they were; the loss ignores them."""
    from spinepath.segmentation.data import SegSlice, sacrum_unknown

    target = np.zeros((60, 40), np.int64)
    target[5:20, 5:25] = 1  # L5 (vertebra)
    target[20:26, 5:25] = 2  # L5-S1 disc, the lowest labelled structure
    target[5:55, 28:32] = 3  # the canal runs on into the sacrum
    s = SegSlice(np.zeros(target.shape, np.float32), target, label_groups(["vertebra", "disc", "spinal_canal"]),
                 ["vertebra", "disc", "spinal_canal"], "spider_seg", "x", "x", 0, (0.8, 0.8))
    out = sacrum_unknown(s).target
    assert (out[26:, 5:25] == -1).all() and (out[:26] == target[:26]).all()  # the sacrum below the disc
    assert (out[:, 25:] == target[:, 25:]).all() and (out[:, :5] == 0).all()  # the canal; no spine in a column
    assert (sacrum_unknown(replace(s, source="spineweb_vb")).target == target).all()
    # whatever the network says on the sacrum no longer moves the loss; with the plain mask it did
    torch.manual_seed(0)
    logits = torch.randn(1, len(CLASSES), 60, 40)
    other = logits.clone()
    other[0, :, 26:, 5:25] = torch.randn(len(CLASSES), 34, 20) * 3
    groups = torch.from_numpy(s.groups).float()[None]
    unknown, plain = torch.from_numpy(out)[None], torch.from_numpy(target)[None]
    assert torch.isclose(partial_label_loss(other, unknown, groups), partial_label_loss(logits, unknown, groups))
    assert not torch.isclose(partial_label_loss(other, plain, groups), partial_label_loss(logits, plain, groups))
