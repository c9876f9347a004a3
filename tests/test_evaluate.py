"""`python -m kdface.evaluate`: a tiny trained run compared end to end, every number checked
against the trainer's own forward pass + kdface.metrics (or a NumPy loop), and bad inputs.

The run is a SphereFace-layout net at 16x16 trained for two steps (tests/test_training.py's
TINY options); the verification .bin holds 24x24 images so that the evaluator's resize is used.
"""
from __future__ import annotations

import json
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kdface import evaluate, evaluation, metrics
from kdface.data import (build_training_dataset, build_verification_dataset, encode_image,
                         lr_probe_pairs, make_verification_arrays, normalize_images,
                         write_landmarks_csv, write_lfw_pairs, write_recordio,
                         write_verification_bin)
from kdface.distill import build_recipe, build_student
from kdface.training import ArrayBatches, Checkpoints, VerificationSet, fit
from kdface.training._checkpoint import load_model_weights
from kdface.training._loop import _embed_fn

from _tolerance import assert_close, bound
from _train_helpers import CLASSES, HW, TINY, tiny_config
PAIRS = 40
BATCH = 64  # Embedder batch: every call below pads to one shape, so one compile
# The TINY SphereFace net's longest chain of reductions (case 4 of tests/_tolerance.py): the
# 3x3 convolutions 3x3x3 (stage 1 stride 2), 3x3x4 (stage 2 stride 2), 3x3x8 twice (its unit),
# 3x3x8 (stages 3 and 4), the residual add (1) and the FC over C4 x 1 x 1 = 8 features:
# 27 + 36 + 72 + 72 + 72 + 72 + 1 + 8 = 360 terms; float32 against float32 of another batch
# shape (both carry error): 2 x 360. Measured here: 1.2 eps x max|ref|, far inside.
NET_TERMS = 27 + 36 + 72 + 72 + 72 + 72 + 1 + 8


def _net_close(actual, desired, what=""):
    """Two float32 forwards of the TINY net on the same images (another batch shape / program):
    |error| <= eps32 x 2 x NET_TERMS x max|ref|."""
    assert_close(actual, desired, terms=2 * NET_TERMS, what=what)


def _faces(labels, size, seed):
    """uint8 images whose mean brightness depends on the label (something to learn)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    base = rng.random((labels.size, size, size, 3)) * 80 + 40
    return (base + 30 * labels[:, None, None, None]).clip(0, 255).astype(np.uint8)


def _pairs(seed=3):
    rng = np.random.default_rng(seed)
    first = rng.integers(0, CLASSES, PAIRS)
    issame = np.arange(PAIRS) % 2 == 0
    second = np.where(issame, first, (first + 1 + rng.integers(0, CLASSES - 1, PAIRS)) % CLASSES)
    labels = np.stack([first, second], axis=1).reshape(-1)
    return _faces(labels, 24, seed), issame


def _config(workdir, **changes):
    return tiny_config(workdir, **{"steps": 2, **changes})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A trained run, its .bin verification set, and the trainer's own validation accuracy."""
    tmp = tmp_path_factory.mktemp("evaluate")
    bin_path = str(tmp / "val.bin")
    images, issame = _pairs()
    write_verification_bin(bin_path, images, issame, format="png")  # lossless
    # The trainer validates on the same pairs resized to its input like the evaluator does.
    first, second, same, _ = make_verification_arrays(bin_path, image_size=HW)
    val = VerificationSet("val", np.stack([first, second], 1).reshape(-1, *HW, 3), same)
    labels = np.arange(32) % CLASSES
    summary = fit(_config(tmp / "run"), ArrayBatches(normalize_images(_faces(labels, 16, 0)),
                                                     labels, batch_size=8),
                  num_classes=CLASSES, val_sets=[val])
    return {"tmp": tmp, "run": str(tmp / "run"), "bin": bin_path, "images": images,
            "issame": issame, "summary": summary}


@pytest.fixture(scope="module")
def embedder(env):
    return evaluation.Embedder(env["run"], batch_size=BATCH)


@pytest.fixture(scope="module")
def direct(env):
    """The trainer's own eval forward (kdface.training._loop._embed_fn) on the restored weights,
    with the resize + normalization written out here."""
    with open(os.path.join(env["run"], "config.json")) as f:
        cfg = json.load(f)
    abstract = nnx.eval_shape(lambda: build_student(
        "sphereface_custom", num_classes=CLASSES, head=cfg["head_used"], rngs=nnx.Rngs(0),
        backbone_options=TINY, logit_scale=16.0))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    weights, _ = load_model_weights(env["run"], {"params": params, "rest": rest})
    embed = _embed_fn(graphdef)

    def forward(images):
        x = np.stack([cv2.resize(im, (16, 16), interpolation=cv2.INTER_AREA)
                      if im.shape[:2] != HW else im for im in images]).astype(np.float32)
        x = (x / 255.0 - 0.5) / 0.5
        n = len(x)
        pad = (-n) % 80  # one compiled shape
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
        out = [np.asarray(embed(weights["params"], weights["rest"], jnp.asarray(x[i:i + 80])))
               for i in range(0, len(x), 80)]
        return np.concatenate(out)[:n]
    forward.embed, forward.weights = embed, weights
    return forward


def _records(n=40, size=20, seed=5, landmarks=False):
    labels = np.arange(n) % 6
    images = _faces(labels, size, seed)
    rng = np.random.default_rng(seed)
    recs = []
    template = np.array([[7.0, 8.0], [13.0, 8.0], [10.0, 11.0], [8.0, 15.0], [12.0, 15.0]])
    for label, image in zip(labels, images):
        rec = {"image": encode_image(image, format="png"), "label": int(label)}
        if landmarks:
            rec["landmarks"] = (template * size / 20 + rng.normal(size=(5, 2))).astype(np.float32)
        recs.append(rec)
    return recs, images, labels


@pytest.fixture(scope="module")
def report(env, embedder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report"))
    recs, _, _ = _records()
    sets = evaluation.load_sets([env["bin"]])
    evaluators = [evaluation.Verification(sets, lr_sizes=[4, 8, 12]),
                  evaluation.Identification(recs, ranks=(1, 3), fpr_targets=(0.1, 0.01),
                                            probe_chunk=7, item_chunk=5),
                  evaluation.ModelFacts(latency_repeats=2)]
    rep = evaluation.compare({"tiny": embedder}, evaluators, out_dir=out)
    return rep, out


# --- the network: Embedder == the trainer's forward ------------------------------------------

def test_embedder_equals_trainer_forward_and_padding_is_invisible(env, embedder, direct):
    images = env["images"]
    _net_close(embedder(images), direct(images))
    _net_close(embedder(images[:5]), direct(images)[:5])
    assert embedder.input_size == HW and embedder.embedding_size == 8
    assert not embedder.has_landmarks


def test_flip_sums_image_and_mirror_embeddings(env, embedder, direct):
    images = env["images"]
    mirrored = images[:, :, ::-1]
    got = embedder.embed(images, flip=True)
    a, b = direct(images).astype(np.float64), direct(mirrored).astype(np.float64)
    want = (a + b) / np.linalg.norm(a + b, axis=1, keepdims=True)
    # the two forwards' error (2 x NET_TERMS) on unit rows, then the float64 sum and its
    # 8-term normalization (negligible); normalizing at most doubles a relative error: scale 2
    assert_close(got, want, terms=2 * NET_TERMS, scale=2.0)
    assert np.abs(got - metrics.l2_normalize(a)).max() > 1e-3  # the mirror changes something
    res = evaluation.verification_report(embedder, images, env["issame"], flip=True)
    # Exact: the report's accuracy is metrics.verification of the Embedder's own flip
    # embeddings (the same floats). Against `want` (another forward) it would be exact only
    # while no two pair scores lie within rounding of each other, and here some pairs' scores
    # are 1e-8 apart, as close as two forwards' rounding: a count may legitimately differ.
    ref = metrics.verification(got[0::2], got[1::2], env["issame"])
    assert res["accuracy"] == ref["accuracy"]


# --- compare(): files, markdown, and numbers -------------------------------------------------

def test_report_files_exist_and_parse(report):
    rep, out = report
    with open(os.path.join(out, "report.json")) as f:
        parsed = json.load(f)
    assert parsed["lr_sizes"] == [4, 8, 12]
    for name in ("roc_val.png", "lr_val.png"):
        image = cv2.imread(os.path.join(out, name))
        assert image is not None and image.shape == (600, 800, 3)
    with open(os.path.join(out, "report.md")) as f:
        md = f.read()
    assert "| tiny | val |" in md
    for s in (4, 8, 12):
        assert f"{s} px probe" in md
    # Rendering the parsed JSON (string keys) gives the same markdown as the live report.
    assert evaluation.markdown_table(parsed) == md


def test_report_accuracies_equal_metrics_on_independent_embeddings(env, report, embedder,
                                                                    direct):
    # The numbers are exact functions of the embeddings (counts, float64 NumPy); the
    # embeddings of independent forwards agree only up to rounding (_net_close). Pair scores
    # here come as close as 4e-9 (the LR probes of similar pairs), inside that rounding, so
    # each number is checked exactly against metrics on the very embeddings that produced it,
    # and those embeddings against the independent forward by the rule.
    rep, _ = report
    ver = rep["runs"]["tiny"]["verification"]["val"]
    emb = embedder(env["images"])
    _net_close(emb, direct(env["images"]))
    ref = metrics.verification(emb[0::2], emb[1::2], env["issame"])
    assert ver["hr"]["accuracy"] == ref["accuracy"]
    assert ver["hr"]["auc"] == ref["auc"]
    assert ver["hr"]["best_threshold_accuracy"] == ref["best_threshold_accuracy"]
    # ... and the trainer's own validation of the same checkpoint: its forward (chunks of 64,
    # unpadded) rerun on the restored weights gives its accuracy exactly, on embeddings
    # within rounding of the report's.
    first, second, same, _ = make_verification_arrays(env["bin"], image_size=HW)
    stacked = np.stack([first, second], 1).reshape(-1, *HW, 3)
    params, rest = direct.weights["params"], direct.weights["rest"]
    trained = np.concatenate([np.asarray(direct.embed(params, rest, jnp.asarray(
        normalize_images(stacked[i:i + 64])))) for i in range(0, len(stacked), 64)])
    _net_close(trained, emb, what="trainer's forward vs the Embedder: ")
    assert (metrics.verification(trained[0::2], trained[1::2], same)["accuracy"]
            == env["summary"]["val"]["val_accuracy"])
    for s in (4, 8, 12):
        probes = lr_probe_pairs(env["images"], s)
        lr = embedder(probes)
        _net_close(lr, direct(probes))
        ref = metrics.verification(lr[0::2], lr[1::2], env["issame"])
        assert ver["lr"][str(s)]["accuracy"] == ref["accuracy"]


def test_unsupported_fars_are_stated(report):
    rep, out = report
    hr = rep["runs"]["tiny"]["verification"]["val"]["hr"]
    # 20 negatives, 18 in each 9-fold training split: FAR 0.1 is supported, 0.01 is not.
    assert rep["sets"]["val"]["min_train_negatives"] == 18
    assert hr["tar_at_far_unsupported"] == [1e-2, 1e-3, 1e-4, 1e-5, 1e-6]
    assert hr["tar_at_far"][0.1] is not None and hr["tar_at_far"][1e-2] is None
    md = evaluation.markdown_table(rep)
    assert "n/s" in md and "not supported) at 1e-2, 1e-3, 1e-4, 1e-5, 1e-6" in md


def test_identification_from_dataset_equals_identify_on_direct_embeddings(report, embedder,
                                                                           direct):
    rep, _ = report
    _, images, labels = _records()
    emb = embedder(images)  # the report's own embeddings (exact below); vs direct by the rule
    _net_close(emb, direct(images))
    seen, gallery = set(), []
    for i, lab in enumerate(labels):  # first image of each identity is its gallery image
        gallery.append(lab not in seen)
        seen.add(lab)
    g = np.array(gallery)
    ref = metrics.identify(emb[~g], labels[~g], emb[g], labels[g], ranks=(1, 3),
                           fpr_targets=(0.1, 0.01))
    got = rep["runs"]["tiny"]["identification"]
    # exact: the same embeddings through the same function (other chunk sizes: the float32
    # blocks are the same dot products, tests/test_metrics_identification chunked == whole)
    assert got["rank_accuracy"] == ref["rank_accuracy"]
    assert got["tpr_at_fpr"] == ref["tpr_at_fpr"]
    assert (got["num_gallery"], got["num_probes"]) == (6, 34)
    # Wang et al. 2017 nearest neighbour, by a float64 loop over gallery + probes
    x = np.concatenate([emb[g], emb[~g]]).astype(np.float64)
    y = np.concatenate([labels[g], labels[~g]])
    hits, fragile = [], 0
    for i in range(len(x)):
        d = np.sum((x - x[i]) ** 2, axis=1)
        d[i] = np.inf
        hits.append(y[int(np.argmin(d))] == y[i])
        # A probe's hit is certain only if no item of the other outcome (label match or not)
        # lies within rounding of the nearest: kdface ranks |x|^2 - 2 q.x in float32, an 8-term
        # dot plus 1, each term bounded by |q|^2 + 2|q||x| + |x|^2 <= 4 max|row|^2; both
        # distances move, so a gap under 2 x eps32 x 9 x 4 max|row|^2 makes the hit fragile.
        match = y == y[i]
        other = match != match[int(np.argmin(d))]
        other[i] = False
        if other.any():
            gap = d[other].min() - d.min()
            fragile += gap <= 2 * bound(terms=8 + 1, scale=4 * np.max(np.sum(x * x, axis=1)))
    # A count, not rounding: equal up to the probes whose hit rounding can flip (1 of 40 here,
    # a gap of 5e-4 against a worst-case bound of 5e-3), each worth 1/40.
    assert abs(got["nn_top1"] - np.mean(hits)) <= fragile / len(x)
    assert fragile <= 2  # the tolerance stays below a real difference of several probes


def test_model_facts(report, env):
    facts = report[0]["runs"]["tiny"]["model"]
    with open(os.path.join(env["run"], "config.json")) as f:
        cfg = json.load(f)
    abstract = nnx.eval_shape(lambda: build_student(
        "sphereface_custom", num_classes=CLASSES, head=cfg["head_used"], rngs=nnx.Rngs(0),
        backbone_options=TINY))
    backbone = nnx.state(abstract.network.backbone, nnx.Param)
    assert facts["params"] == sum(int(np.prod(v.shape)) for v in jax.tree.leaves(backbone))
    assert facts["macs"] > 0 and facts["latency_ms"] > 0
    assert "MACs" in evaluation.markdown_table(report[0])


# --- exported embeddings ---------------------------------------------------------------------

def test_identification_from_npz_equals_identify(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"gallery_emb": rng.normal(size=(10, 8)), "gallery_labels": np.arange(10),
              "probe_emb": rng.normal(size=(30, 8)), "probe_labels": rng.integers(0, 12, 30)}
    arrays["probe_emb"][:10] += 2 * arrays["gallery_emb"]
    shared = rng.normal(size=(50, 8)).astype(np.float32)
    np.savez(tmp_path / "a.npz", **arrays)
    np.save(tmp_path / "distr.npy", shared)
    ident = evaluation.Identification(ranks=(1, 5), fpr_targets=(1e-1, 1e-2),
                                      distractors=str(tmp_path / "distr.npy"), item_chunk=7)
    rep = evaluation.compare({"a": str(tmp_path / "a.npz")}, [evaluation.Verification({}), ident])
    ref = metrics.identify(arrays["probe_emb"], arrays["probe_labels"], arrays["gallery_emb"],
                           arrays["gallery_labels"], distractor_emb=shared, ranks=(1, 5),
                           fpr_targets=(1e-1, 1e-2))
    got = rep["runs"]["a"]["identification"]
    assert got["num_distractors"] == 50
    # exact: the same arrays through the same function (the .npz keeps them bit for bit)
    assert got["rank_accuracy"] == ref["rank_accuracy"]
    assert got["tpr_at_fpr"] == ref["tpr_at_fpr"]
    assert got["dir_at_fpir"] == ref["dir_at_fpir"]
    assert "| a | 10 | 30 | 50 |" in evaluation.markdown_table(rep)


def test_cli_export_then_compare_with_the_checkpoint(env, direct, tmp_path, capsys):
    recs, images, labels = _records()
    rec_path = str(tmp_path / "ident.rec")
    write_recordio(rec_path, [(int(lab), im) for lab, im in zip(labels, images)],
                   image_format="png")
    npz = str(tmp_path / "tiny.npz")
    common = [f"--val_data={env['bin']}", "--lr_sizes=8", f"--batch_size={BATCH}"]
    assert evaluate.main(["prog", f"--runs=tiny={env['run']}", f"--export_embeddings={npz}",
                          f"--identification_data={rec_path}", *common]) == 0
    with np.load(npz) as z:
        _net_close(z["val/emb"], direct(env["images"]))
        assert z["val/issame"].tolist() == env["issame"].tolist() and not z["flip"]
        assert z["gallery_labels"].tolist() == list(range(6))
    out = str(tmp_path / "rep")
    assert evaluate.main(["prog", f"--runs=exported={npz},ckpt={env['run']}", f"--out={out}",
                          "--latency_repeats=1", "--ranks=1", f"--identification_data={rec_path}",
                          *common]) == 0
    with open(os.path.join(out, "report.json")) as f:
        runs = json.load(f)["runs"]
    a, b = runs["exported"]["verification"]["val"], runs["ckpt"]["verification"]["val"]
    # exact: the exported embeddings are the checkpoint's forward at the same batch size (a
    # deterministic rerun), and the numbers are the same function of them
    assert a["hr"]["accuracy"] == b["hr"]["accuracy"]
    assert a["lr"]["8"]["accuracy"] == b["lr"]["8"]["accuracy"]
    assert (runs["exported"]["identification"]["rank_accuracy"]
            == runs["ckpt"]["identification"]["rank_accuracy"])
    assert runs["ckpt"]["identification"]["num_gallery"] == 6
    assert runs["exported"]["kind"] == "embeddings" and "model" in runs["ckpt"]
    assert "| exported | val |" in capsys.readouterr().out


# --- alignment (Wang et al. 2017) ------------------------------------------------------------

def _alignment_run(workdir, teacher_dir):
    """A transfer/alignment run as the trainer lays it out (config.json + an orbax checkpoint
    through kdface.training.Checkpoints), with random weights."""
    cfg = _config(workdir, recipe="transfer", transfer_task="alignment", head="softmax",
                  teacher="sphereface_custom", teacher_options=TINY,
                  teacher_checkpoint=teacher_dir)
    recipe = build_recipe(cfg.recipe, cfg.as_dict())

    def make():
        teacher = build_student("sphereface_custom", num_classes=CLASSES, head="cosface",
                                rngs=nnx.Rngs(1), backbone_options=TINY).network.backbone
        return build_student("sphereface_custom", num_classes=CLASSES, head=recipe.head,
                             rngs=nnx.Rngs(0), backbone_options=TINY, logit_scale=16.0,
                             landmark_head=True, adapt_to=teacher, input_hw=HW)
    graphdef, shapes, stats = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    # Random weights from NumPy: compiling the initializers costs ~40 s on a loaded CPU.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda v: jnp.asarray(0.3 * rng.normal(size=v.shape), v.dtype),
                          shapes)
    rest = jax.tree_util.tree_map_with_path(  # BatchNorm statistics: mean 0, variance 1
        lambda path, v: jnp.full(v.shape, "var" in jax.tree_util.keystr(path), v.dtype), stats)
    state = {"params": params, "rest": rest,
             "opt_state": optax.sgd(0.1, momentum=0.9).init(params), "step": jnp.int32(1)}
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({**cfg.as_dict(), "head_used": recipe.head, "num_classes": CLASSES}, f,
                  default=list)
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), keep_best=0, async_save=False)
    ckpt.save(1, state, {"data": {}, "step": 1}, force=True)
    ckpt.close()
    return graphdef, params, rest


def test_alignment_nrmse_in_network_input_pixels(env, embedder, tmp_path):
    workdir = str(tmp_path / "align")
    graphdef, params, rest = _alignment_run(workdir, env["run"])
    recs, images, _ = _records(n=12, size=20, landmarks=True)
    rep = evaluation.compare({"align": workdir, "plain": embedder}, [evaluation.Alignment(recs)],
                             out_dir=str(tmp_path / "out"))

    def landmarks(p, r, x):
        student = nnx.merge(graphdef, p, r)
        student.eval()
        return student.network(x)["landmarks"]
    x = np.stack([cv2.resize(im, (16, 16), interpolation=cv2.INTER_AREA) for im in images])
    pred = np.asarray(jax.jit(landmarks)(params, rest, normalize_images(x)), np.float64)
    truth = np.stack([r["landmarks"] for r in recs]).astype(np.float64) * (16 / 20)
    errors = []
    for p, t in zip(pred, truth):  # Wang et al. 2017 NRMSE, inter-ocular (points 0 and 1)
        d = np.hypot(*(t[0] - t[1]))
        errors.append(np.mean([np.hypot(*(p[k] - t[k])) for k in range(5)]) / d)
    got = rep["runs"]["align"]["alignment"]
    # two float32 forwards (batch 12 here, 16 padded in the Embedder): the landmark head's
    # chain is the net's convolutions (NET_TERMS, less the FC), a mean over <= 8 x 8 positions
    # and a linear layer over <= 8 features: 2 x (NET_TERMS + 64 + 8) terms on coordinates of
    # magnitude max|pred|; a point error moves by <= sqrt(2) x that, divided by d >= min d
    d_min = min(np.hypot(*(t[0] - t[1])) for t in truth)
    assert_close(got["nrmse"], np.mean(errors), terms=2 * (NET_TERMS + 64 + 8),
                 scale=np.sqrt(2) * np.abs(pred).max() / d_min)
    assert got["num_images"] == 12
    assert "alignment" not in rep["runs"]["plain"]
    assert "no landmark head" in " ".join(rep["runs"]["plain"]["notes"])
    assert os.path.isfile(tmp_path / "out" / "ced_alignment.png")
    assert "## Alignment" in evaluation.markdown_table(rep)


# --- sources ---------------------------------------------------------------------------------

def test_pairs_txt_and_built_set_read_like_the_bin(env, tmp_path):
    images, issame = env["images"], env["issame"]
    pairs = []
    for i in range(PAIRS):  # pair i: person a{i} image 1 (and 2 when same), or b{i} image 1
        a, b = images[2 * i], images[2 * i + 1]
        os.makedirs(tmp_path / "img" / f"a{i}")
        cv2.imwrite(str(tmp_path / "img" / f"a{i}" / f"a{i}_0001.png"), a[..., ::-1])
        other = f"a{i}" if issame[i] else f"b{i}"
        os.makedirs(tmp_path / "img" / other, exist_ok=True)
        n = 2 if issame[i] else 1
        cv2.imwrite(str(tmp_path / "img" / other / f"{other}_{n:04d}.png"), b[..., ::-1])
        pairs.append((f"a{i}", 1, 2) if issame[i] else (f"a{i}", 1, f"b{i}", 1))
    write_lfw_pairs(tmp_path / "pairs.txt", pairs, num_folds=10)
    build_verification_dataset(env["bin"], str(tmp_path / "tfds"), name="built")
    sets = evaluation.load_sets([f"{tmp_path / 'pairs.txt'}={tmp_path / 'img'}", env["bin"],
                               "built"], pairs_ext="png", data_dir=str(tmp_path / "tfds"))
    assert list(sets) == [tmp_path.name, "val", "built"]
    for name in sets:
        np.testing.assert_array_equal(sets[name][0], images)
        np.testing.assert_array_equal(sets[name][1], issame)
    with pytest.raises(FileNotFoundError, match="neither a file nor a verification set"):
        evaluation.load_sets(["nosuchset"], data_dir=str(tmp_path / "tfds"))


def test_labelled_datasets_read_alike_from_rec_folders_and_built_sets(tmp_path):
    recs, images, labels = _records(n=8, size=12, landmarks=True)
    points = np.stack([r["landmarks"] for r in recs])
    write_recordio(tmp_path / "d.rec", [(int(y), im) for y, im in zip(labels, images)],
                   image_format="png")
    write_landmarks_csv(tmp_path / "d.csv", [str(i) for i in range(8)], points)
    for i, (y, im) in enumerate(zip(labels, images)):
        os.makedirs(tmp_path / "folders" / f"id{y}", exist_ok=True)
        cv2.imwrite(str(tmp_path / "folders" / f"id{y}" / f"{i:02d}.png"), im[..., ::-1])
    build_training_dataset(str(tmp_path / "d.rec"), str(tmp_path / "tfds"), name="train_lm",
                           landmarks=str(tmp_path / "d.csv"))
    rec = evaluation.open_face_records(str(tmp_path / "d.rec"), landmarks=str(tmp_path / "d.csv"))
    built = evaluation.open_face_records("train_lm", data_dir=str(tmp_path / "tfds"))
    listed = evaluation.open_face_records(recs)
    for source in (rec, built, listed):
        assert len(source) == 8
        read = [source.read(i) for i in range(8)]
        if source is built:  # tfds stores a training set in its own (hashed, fixed) order
            order = [next(j for j in range(8) if np.array_equal(im, images[j]))
                     for _, im, _ in read]
            assert sorted(order) == list(range(8))
            read = [read[order.index(j)] for j in range(8)]
        for i, (label, image, lm) in enumerate(read):
            assert label == labels[i]
            np.testing.assert_array_equal(image, images[i])
            # not rounding of a computation: the CSV prints 3 decimals, so +-5e-4 by definition
            np.testing.assert_allclose(lm, points[i], atol=5e-4)
    folders = evaluation.open_face_records(str(tmp_path / "folders"))
    got = sorted((folders.read(i)[0], folders.read(i)[1].tobytes()) for i in range(8))
    assert got == sorted((int(y), im.tobytes()) for y, im in zip(labels, images))
    gallery, probes = evaluation.split_gallery_probe(labels)
    assert gallery.tolist() == [0, 1, 2, 3, 4, 5] and probes.tolist() == [6, 7]
    with pytest.raises(FileNotFoundError, match="neither a path nor a training set"):
        evaluation.open_face_records("nosuchset", data_dir=str(tmp_path / "tfds"))


def test_generations_parent_resolves_to_the_last_generation(tmp_path):
    for k in (1, 2, 10):
        os.makedirs(tmp_path / f"gen_{k}")
        (tmp_path / f"gen_{k}" / "config.json").write_text("{}")
    from kdface.evaluation import resolve_workdir
    assert resolve_workdir(str(tmp_path)) == str(tmp_path / "gen_10")


# --- bad inputs ------------------------------------------------------------------------------

def test_bad_pair_inputs_raise_clear_errors(env, embedder, tmp_path):
    images, issame = env["images"], env["issame"]
    with pytest.raises(ValueError, match="odd number of images"):
        evaluation.verification_report(embedder, images[:-1], issame[:-1])
    with pytest.raises(ValueError, match="40 pairs of images but 39 issame"):
        evaluation.verification_report(embedder, images, issame[:-1])
    with pytest.raises(ValueError, match="positive ints"):
        evaluation.lr_report(embedder, images, issame, [0])
    with pytest.raises(ValueError, match="smaller than the set's images"):
        evaluation.lr_report(embedder, images, issame, [8, 24])
    val = [evaluation.Verification({"val": (None, issame)})]
    np.savez(tmp_path / "odd.npz", emb=np.zeros((5, 8)), issame=np.ones(2, bool))
    with pytest.raises(ValueError, match="odd number of rows"):
        evaluation.compare({"x": str(tmp_path / "odd.npz")}, val)
    np.savez(tmp_path / "flipped.npz", emb=np.zeros((80, 8)), issame=~issame)
    with pytest.raises(ValueError, match="differ from set 'val'"):
        evaluation.compare({"x": str(tmp_path / "flipped.npz")}, val)
    np.savez(tmp_path / "short.npz", emb=np.zeros((78, 8)))
    with pytest.raises(ValueError, match="39 pairs but set 'val' has 40"):
        evaluation.compare({"x": str(tmp_path / "short.npz")}, val)
    np.savez(tmp_path / "ident.npz", gallery_emb=np.zeros((4, 8)), gallery_labels=np.arange(3),
             probe_emb=np.zeros((2, 8)), probe_labels=np.arange(2))
    with pytest.raises(ValueError, match="one label per row"):
        evaluation.compare({"x": str(tmp_path / "ident.npz")}, [evaluation.Identification()])


def test_workdir_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a kdface training workdir"):
        evaluation.Embedder(str(tmp_path))


@pytest.mark.parametrize("args,needle", [
    (["--nosuchflag=1"], "nosuchflag"),
    (["--runs=a"], "not name=PATH"),
    (["--runs=a=x", "--lr_sizes=8,abc"], "'abc' is not an integer"),
    (["--runs=a=x", "--flip=maybe"], "flip"),
    (["--runs=a=x", "--far_targets=2"], "must lie in (0, 1]"),
    (["--runs=a=x", "--protocol=lfw"], "protocol"),
    (["--runs=a=x", "--ijb=LFW:/data/lfw"], "--ijb: an IJB entry is NAME:ROOT"),
    ([], "--runs is required"),
])
def test_cli_usage_errors(args, needle, capsys):
    assert evaluate.main(["prog", *args]) == 2
    assert needle in capsys.readouterr().err


def test_cli_missing_run_is_an_input_error(env, tmp_path, capsys):
    code = evaluate.main(["prog", f"--runs=a={tmp_path}", f"--val_data={env['bin']}",
                          f"--out={tmp_path / 'o'}"])
    assert code == 1
    assert "not a kdface training workdir" in capsys.readouterr().err


def test_cli_missing_teacher_file_is_an_input_error(env, tmp_path, capsys):
    code = evaluate.main(["prog", f"--runs=t=pth:{tmp_path}/backbone.pth",
                          f"--val_data={env['bin']}", f"--out={tmp_path / 'o'}"])
    assert code == 1
    assert f"PyTorch file {tmp_path}/backbone.pth not found" in capsys.readouterr().err


def test_cli_help_lists_the_flags(capsys):
    assert evaluate.main(["prog", "--help"]) == 0
    text = capsys.readouterr().out
    for needle in ("--runs", "--val_data", "--lr_sizes", "--identification_data",
                   "--export_embeddings", "gallery_emb", "Wang et al. 2019", "--protocol",
                   "--ijb", "pth:[ARCH:]FILE"):
        assert needle in text


# --- insightface's protocol, third-party teachers, IJB ---------------------------------------

def test_insightface_protocol_report_equals_insightface_numbers(env, embedder, tmp_path):
    """--protocol=insightface: flip on by default, the unnormalized image + mirror sums fed to
    insightface's evaluate() (re-implemented in test_metrics_verification); the report says so."""
    from test_metrics_verification import _insightface_evaluate
    sets = evaluation.load_sets([env["bin"]])
    rep = evaluation.compare({"tiny": embedder},
                             [evaluation.Verification(sets, protocol="insightface")],
                             out_dir=str(tmp_path))
    images, issame = sets["val"]
    raw = (np.asarray(embedder(images), np.float64) +
           np.asarray(embedder(np.ascontiguousarray(images[:, :, ::-1])), np.float64))
    acc, std, _, vals = _insightface_evaluate(raw[0::2], raw[1::2], issame, 10, (1e-3, 1e-1))
    hr = rep["runs"]["tiny"]["verification"]["val"]["hr"]
    assert (hr["accuracy"], hr["accuracy_std"]) == (acc, std)
    assert hr["tar_at_far"][1e-3] == vals[1e-3][0] and hr["tar_at_far"][1e-1] == vals[1e-1][0]
    assert rep["protocol"]["verification"] == "insightface" and rep["protocol"]["flip"] is True
    md = open(os.path.join(str(tmp_path), "report.md")).read()
    assert "Verification protocol: **insightface**" in md and "n/s" not in md
    exact = evaluation.compare({"tiny": embedder}, [evaluation.Verification(sets)])
    assert exact["protocol"]["verification"] == "exact" and exact["protocol"]["flip"] is False
    assert "Verification protocol: **exact**" in evaluation.markdown_table(exact)


def test_cli_evaluates_pth_and_onnx_teachers_and_ijb(env, tmp_path, capsys):
    """``--runs=teacher=pth:backbone.pth`` on a .bin and an IJB-C layout, and an ``onnx:`` run:
    the teacher embeds as the PyTorch net does on the evaluator's resized, normalized images,
    so its accuracy and IJB TARs are the PyTorch net's."""
    torch = pytest.importorskip("torch", reason="the teacher is written by PyTorch")
    from test_interop_torch import UNITS18, _torch_embed, _torch_iresnet
    from test_metrics_ijb import FARS, _write_ijbc
    net = _torch_iresnet(UNITS18, embedding=16, final_hw=(1, 1), seed=5)  # 16x16 input

    def torch_model(images):  # the evaluator's resize + normalization, then PyTorch
        small = np.stack([cv2.resize(im, (16, 16), interpolation=cv2.INTER_AREA)
                          for im in images]).astype(np.float32)
        return _torch_embed(net, (small / 255.0 - 0.5) / 0.5)

    pth, onnx_path = str(tmp_path / "backbone.pth"), str(tmp_path / "model.onnx")
    torch.save(net.state_dict(), pth)
    ijb_root = str(tmp_path / "IJBC")
    _write_ijbc(ijb_root, max_medias=2, max_frames=2)
    out = str(tmp_path / "out")
    code = evaluate.main(["prog", f"--runs=teacher=pth:{pth}", f"--val_data={env['bin']}",
                          "--lr_sizes=", "--model_facts=false", f"--ijb=IJBC:{ijb_root}",
                          f"--ijb_far_targets={','.join(str(f) for f in FARS)}",
                          "--batch_size=32", f"--out={out}"])  # one compiled shape
    assert code == 0, capsys.readouterr().err
    rep = json.load(open(os.path.join(out, "report.json")))
    entry = rep["runs"]["teacher"]
    assert entry["kind"] == "imported teacher" and entry["arch"] == "iresnet18"
    emb = torch_model(env["images"])
    ref = metrics.verification(emb[0::2], emb[1::2], env["issame"])
    hr = entry["verification"]["val"]["hr"]
    # A cross-framework forward (JAX vs PyTorch float32): the accuracy is a count, equal while
    # no pair's score lies within the two frameworks' rounding of a threshold; left as it was
    # (abs 1e-12: exact up to float64 noise). AUC: 20 x 20 pairs, one swapped pair moves it by
    # 1/400 = 2.5e-3, so abs 1e-3 says "no pair swapped"; it is not a rounding tolerance.
    assert hr["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert hr["auc"] == pytest.approx(ref["auc"], abs=1e-3)
    meta = evaluation.IjbMeta(ijb_root, "IJBC")
    crops = evaluation.aligned_crops(meta, 0, len(meta))
    feats = metrics.ijb_image_features(torch_model(crops), torch_model(crops[:, :, ::-1]),
                                       meta.face_scores)
    want = metrics.ijb_verification(feats, meta.templates, meta.medias, meta.template1,
                                    meta.template2, meta.labels, far_targets=FARS)
    assert entry["ijb"]["IJBC"]["tar_at_far"] == {f"{f:g}": v
                                                  for f, v in want["tar_at_far"].items()}
    # as above: an AUC over 66 template pairs (steps >= 1/(pos x neg) >> 1e-6): "no pair
    # swapped" between the JAX and PyTorch forwards, not a rounding tolerance
    assert entry["ijb"]["IJBC"]["auc"] == pytest.approx(want["auc"], abs=1e-6)
    md = open(os.path.join(out, "report.md")).read()
    assert "## IJB 1:1 template verification" in md and "| teacher | IJBC | 12 | 66 |" in md
    # onnx:ARCH:FILE, exported as the TorchScript exporter writes it
    pytest.importorskip("onnx", reason="reading .onnx files needs the onnx package")
    torch.onnx.export(net, torch.zeros(1, 3, 16, 16), onnx_path, dynamo=False,
                      input_names=["data"])
    onnx_sets = evaluation.load_sets([env["bin"]])
    onnx_rep = evaluation.compare({"onnx": f"onnx:iresnet18:{onnx_path}"},
                                  [evaluation.Verification(onnx_sets)], batch_size=32)
    onnx_hr = onnx_rep["runs"]["onnx"]["verification"]["val"]["hr"]
    assert onnx_hr["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert onnx_rep["runs"]["onnx"]["source"] == f"onnx:iresnet18:{onnx_path}"
