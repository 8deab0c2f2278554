"""Classification fine-tuning (imagegpt.finetune): the joint model, augmentation, training and evaluation."""

import numpy as np
import pytest
import torch

from imagegpt import ImageGPT, ImageGPTConfig
from imagegpt.errors import ArgumentError
from imagegpt.finetune import (
    FinetuneModel,
    augment_pixels,
    confusion_matrix,
    default_pad,
    format_confusion,
    joint_loss,
    plot_confusion,
    predict,
)
from imagegpt.model import sos_inputs
from imagegpt.probe import extract_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pretrained_model(n_layer=3, seed=0, resolution=4, clusters=16):
    torch.manual_seed(seed)
    config = ImageGPTConfig.from_preset(
        "igpt-nano", resolution=resolution, clusters=clusters, n_layer=n_layer
    )
    model = ImageGPT(config).eval()
    with torch.no_grad():  # give the zero-initialised head and norms some size
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def random_ids(n, config, seed=1):
    return torch.randint(
        0, config.n_clusters, (n, config.n_positions), generator=torch.Generator().manual_seed(seed)
    )


# ------------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("layer", [None, 1, 2])
def test_classifier_starts_from_the_probe_feature_of_its_layer(layer):
    pretrained = pretrained_model(n_layer=3)
    model = FinetuneModel(pretrained, num_labels=4, layer=layer).eval()
    expected_layer = 3 if layer is None else layer
    assert model.classifier.config.n_layer == expected_layer
    assert model.classifier.config.num_labels == 4
    ids = random_ids(5, pretrained.config)
    probe = extract_features(pretrained, ids, layers=[expected_layer], dtype="float32")[expected_layer]
    with torch.no_grad():
        _, pooled = None, None
        x, _ = model.classifier.transformer(sos_inputs(ids, pretrained.config.sos_id))
        pooled = x.mean(dim=1).numpy()
    np.testing.assert_allclose(pooled, probe, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [None, 2])
def test_generative_loss_is_the_pretrained_models_and_the_joint_loss_adds_it(layer):
    pretrained = pretrained_model(n_layer=3)
    model = FinetuneModel(pretrained, num_labels=3, layer=layer).eval()
    ids = random_ids(4, pretrained.config)
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        logits, clf_loss, gen_loss = model(ids, labels, gen_weight=0.5)
        expected_logits = model.classifier(sos_inputs(ids, pretrained.config.sos_id)).logits
        torch.testing.assert_close(gen_loss, pretrained.image_loss(ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clf_loss, torch.nn.functional.cross_entropy(expected_logits, labels))
    torch.testing.assert_close(joint_loss(clf_loss, gen_loss, 0.5), clf_loss + 0.5 * gen_loss)
    assert joint_loss(clf_loss, None, 0.0) is clf_loss
    _, _, none = model(ids, labels, gen_weight=0.0)
    assert none is None


def test_generative_parts_are_not_kept_without_a_generative_loss():
    pretrained = pretrained_model(n_layer=3)
    model = FinetuneModel(pretrained, num_labels=3, layer=1, generative=False)
    assert model.gen_blocks is None and model.lm_head is None
    assert all(name.startswith("classifier.") for name, _ in model.named_parameters())
    with pytest.raises(ArgumentError, match="generative=False"):
        model(random_ids(2, pretrained.config), gen_weight=1.0)


def test_finetune_model_does_not_share_weights_with_the_pretrained_model():
    pretrained = pretrained_model(n_layer=2)
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    model = FinetuneModel(pretrained, num_labels=2)
    ids = random_ids(3, pretrained.config)
    _, clf_loss, gen_loss = model(ids, torch.tensor([0, 1, 0]), gen_weight=1.0)
    (clf_loss + gen_loss).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(p.grad)
    for k, v in pretrained.state_dict().items():
        torch.testing.assert_close(v, before[k])


@pytest.mark.parametrize("layer", [0, 4, -1])
def test_layer_out_of_range_is_an_error(layer):
    with pytest.raises(ArgumentError, match="out of range"):
        FinetuneModel(pretrained_model(n_layer=3), num_labels=2, layer=layer)


def test_a_single_class_is_an_error():
    with pytest.raises(ArgumentError, match="at least 2 classes"):
        FinetuneModel(pretrained_model(n_layer=1), num_labels=1)


# -------------------------------------------------------------------------------------------- augmentation


def test_augmentation_crops_from_reflect_padding_and_flips():
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, size=(64, 8, 8, 3)).astype(np.float32)
    out = augment_pixels(pixels, np.random.default_rng(1), pad=2)
    assert out.shape == pixels.shape and out.dtype == pixels.dtype
    padded = np.pad(pixels, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    flipped = 0
    for i in range(len(pixels)):
        candidates = [
            (dy, dx, f)
            for dy in range(5)
            for dx in range(5)
            for f in (False, True)
            if np.array_equal(
                out[i], (lambda c, f=f: c[:, ::-1] if f else c)(padded[i, dy : dy + 8, dx : dx + 8])
            )
        ]
        assert candidates, "every output is a (possibly flipped) crop of the reflect-padded image"
        flipped += candidates[0][2]
    assert 10 < flipped < 54  # about half flipped
    assert not np.array_equal(out, pixels)
    np.testing.assert_array_equal(out, augment_pixels(pixels, np.random.default_rng(1), pad=2))  # seeded


def test_augmentation_without_padding_or_flip_is_the_identity():
    pixels = np.random.default_rng(0).uniform(-1, 1, size=(4, 6, 6, 3))
    np.testing.assert_array_equal(augment_pixels(pixels, np.random.default_rng(0), pad=0, flip=False), pixels)
    with pytest.raises(ArgumentError, match="padding"):
        augment_pixels(pixels, np.random.default_rng(0), pad=6)


def test_default_pad_is_four_pixels_at_32():
    assert default_pad(32) == 4 and default_pad(16) == 2 and default_pad(8) == 1 and default_pad(64) == 8


# -------------------------------------------------------------------------------------------- evaluation


def test_predict_feeds_sos_and_batches():
    model = FinetuneModel(pretrained_model(n_layer=2), num_labels=3).classifier
    with torch.no_grad():
        model.score.weight.normal_()
    ids = random_ids(5, model.config)
    logits = predict(model, ids, batch_size=2, dtype="float32")
    with torch.no_grad():
        expected = model(sos_inputs(ids, model.config.sos_id)).logits.numpy()
    assert logits.dtype == np.float32 and logits.shape == (5, 3)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predict(model, ids.numpy(), dtype="float32"), expected, rtol=1e-5, atol=1e-5)


def test_confusion_matrix_and_its_renderings(tmp_path):
    matrix = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    text = format_confusion(matrix, ["cat", "dog", "bird"])
    assert text.splitlines()[3].split() == ["bird", "1", "0", "2"]
    plot_confusion(matrix, ["cat", "dog", "bird"], tmp_path / "c.png", title="t")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------- fine-tuning runs


def save_pretrained_dir(directory, n_layer=2, clusters=8, resolution=8, seed=0):
    """A small model directory with a palette fitted on digits, as `imagegpt train` writes one."""
    from imagegpt.data import load_dataset
    from imagegpt.palette import Palette
    from imagegpt.processor import ImageProcessor

    digits = load_dataset("digits", split="train")
    palette = Palette.fit(digits.images, clusters=clusters, seed=seed)
    model = pretrained_model(n_layer=n_layer, seed=seed, resolution=resolution, clusters=clusters)
    model.save_pretrained(directory, processor=ImageProcessor(palette, resolution))
    return directory


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    return save_pretrained_dir(tmp_path_factory.mktemp("pretrained"))


def accuracy_of(classifier_dir, split="val"):
    from imagegpt.finetune import classify

    return classify(
        classifier_dir, "digits", split=split, dtype="float32", out=classifier_dir.parent / "eval"
    )


@pytest.mark.slow
def test_finetuning_improves_accuracy_and_keeps_the_best_classifier(pretrained_dir, tmp_path):
    from imagegpt.finetune import finetune
    from imagegpt.trainer import read_metrics

    out = tmp_path / "run"
    summary = finetune(
        pretrained_dir,
        "digits",
        out,
        steps=60,
        eval_every=20,
        batch_size=32,
        lr=5e-3,
        warmup=5,
        dtype="float32",
        gen_weight=0.1,
        patience=None,
    )
    assert summary["status"] == "finished" and summary["step"] == 60
    assert summary["augment"] is False  # the default for digits
    val = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "val"]
    assert [r["step"] for r in val] == [20, 40, 60]
    assert summary["best_val_accuracy"] == max(r["accuracy"] for r in val)
    # Chance is 0.1, where the zero-initialised head starts (every logit equal); 60 steps of a nano model
    # reach about 0.29 here, so twice chance is a margin that still fails when fine-tuning learns nothing.
    assert summary["best_val_accuracy"] > 0.2
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert all("gen_loss" in r and "clf_loss" in r for r in train)
    assert np.mean([r["clf_loss"] for r in train[-10:]]) < np.mean([r["clf_loss"] for r in train[:5]]) - 0.3
    # OUT/model is the classifier of the best validation, not the last one.
    assert accuracy_of(out / "model")["accuracy"] == pytest.approx(summary["best_val_accuracy"])
    assert (out / "loss.png").is_file() and (out / "summary.json").is_file()


@pytest.mark.slow
def test_finetuned_directory_loads_in_transformers_with_equal_logits(pretrained_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    from imagegpt import ImageGPTClassifier
    from imagegpt.finetune import finetune

    out = tmp_path / "run"
    finetune(pretrained_dir, "digits", out, steps=4, eval_every=2, batch_size=16, dtype="float32", layer=1)
    model_dir = out / "model"
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    theirs, info = transformers.ImageGPTForImageClassification.from_pretrained(
        model_dir, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    assert theirs.config.num_labels == 10 and theirs.config.n_layer == 1  # the head sits after block 1
    assert theirs.config.id2label[3] == "3"
    ours = ImageGPTClassifier.from_pretrained(model_dir)
    ids = torch.randint(0, 8, (3, 64))
    inputs = sos_inputs(ids, ours.config.sos_id)
    with torch.no_grad():
        expected = ours(inputs).logits
        assert expected.abs().max() > 0  # the head was trained, not the zero initialisation
        torch.testing.assert_close(theirs.eval()(inputs).logits, expected, rtol=1e-4, atol=1e-4)
    processor = transformers.ImageGPTImageProcessor.from_pretrained(model_dir)
    assert processor.size == {"height": 8, "width": 8}


@pytest.mark.slow
def test_an_interrupted_run_resumes_exactly(pretrained_dir, tmp_path, cpu_bf16):
    """Bit for bit, on either side of the bfloat16 detection: the resumed session takes the run's dtype from
    args.json (float32 here), not the default, which means bfloat16 training on a CPU with bfloat16 units."""
    from imagegpt.finetune import finetune
    from imagegpt.trainer import load_args, read_metrics

    common = dict(steps=12, eval_every=4, batch_size=16, dtype="float32", augment=True, patience=None)
    finetune(pretrained_dir, "digits", tmp_path / "whole", **common)
    stopped = finetune(pretrained_dir, "digits", tmp_path / "parts", stop_after=6, **common)
    assert stopped["step"] == 6 and "--resume" in stopped["status"]
    assert load_args(tmp_path / "parts")["dtype"] == "float32"
    resumed = finetune(None, None, tmp_path / "parts", resume=True)
    assert resumed["step"] == 12 and resumed["status"] == "finished"

    def losses(run):
        return [
            (r["step"], r["split"], r.get("loss", r.get("accuracy")))
            for r in read_metrics(run / "metrics.jsonl")
        ]

    whole, parts = losses(tmp_path / "whole"), losses(tmp_path / "parts")
    assert [r[:2] for r in parts] == [r[:2] for r in whole]
    assert [r[2] for r in parts] == [r[2] for r in whole]
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("whole", "parts"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    with pytest.raises(ArgumentError, match="already finished"):
        finetune(None, None, tmp_path / "parts", resume=True)


def test_early_stopping_after_patience_validations_without_improvement(pretrained_dir, tmp_path):
    from imagegpt.finetune import finetune

    summary = finetune(
        pretrained_dir,
        "digits",
        tmp_path / "run",
        steps=50,
        eval_every=1,
        patience=2,
        lr=1e-12,
        warmup=0,
        batch_size=16,
        dtype="float32",
    )
    from imagegpt.trainer import read_metrics

    # A learning rate of 1e-12 barely moves the head: validation accuracy soon stops improving.
    accuracies = [
        r["accuracy"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "val"
    ]
    best, since_best, expected_stop = -1.0, 0, None
    for step, accuracy in enumerate(accuracies, start=1):
        best, since_best = (accuracy, 0) if accuracy > best else (best, since_best + 1)
        if since_best == 2:
            expected_stop = step
            break
    assert summary["status"].startswith("stopped early") and summary["step"] == expected_stop < 50
    assert len(accuracies) == expected_stop
    assert summary["best_val_accuracy"] == max(accuracies)
    assert summary["best_step"] == accuracies.index(max(accuracies)) + 1


def test_finetune_errors(pretrained_dir, tmp_path):
    from imagegpt.errors import DataError
    from imagegpt.finetune import finetune

    unlabelled = tmp_path / "images.npy"
    np.save(unlabelled, np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="no labels"):
        finetune(pretrained_dir, unlabelled, tmp_path / "a", steps=1)
    with pytest.raises(ArgumentError, match="out of range"):
        finetune(pretrained_dir, "digits", tmp_path / "b", steps=1, layer=3)
    with pytest.raises(ArgumentError, match="--steps or --epochs"):
        finetune(pretrained_dir, "digits", tmp_path / "c", steps=1, epochs=1)
    with pytest.raises(ArgumentError, match="no run to resume"):
        finetune(None, None, tmp_path / "nothing", resume=True)


def test_a_non_finite_loss_stops_with_a_clear_message(pretrained_dir, tmp_path):
    from imagegpt.finetune import finetune
    from imagegpt.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="Fine-tuning stopped"):
        finetune(
            pretrained_dir,
            "digits",
            tmp_path / "run",
            steps=20,
            lr=1e30,
            warmup=0,
            batch_size=16,
            dtype="float32",
        )


def test_classify_reports_accuracy_and_confusion_and_refuses_other_class_counts(pretrained_dir, tmp_path):
    from imagegpt.errors import DataError
    from imagegpt.finetune import classify, finetune

    out = tmp_path / "run"
    finetune(pretrained_dir, "digits", out, steps=2, eval_every=2, batch_size=16, dtype="float32")
    report = classify(out, "digits", split="test", dtype="float32")  # a run directory resolves to its model/
    matrix = np.array(report["confusion"])
    assert matrix.shape == (10, 10) and matrix.sum() == report["images"]
    assert report["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert (out / "classify-test.json").is_file() and (out / "confusion-test.png").is_file()
    with pytest.raises(DataError, match="10 classes but shapes has 6"):
        classify(out, "shapes", data_options={"n": 60})


def test_the_same_arguments_give_the_same_run_with_dropout(tmp_path):
    """The seed seeds dropout too: two fresh runs of a model trained with dropout give identical losses."""
    import json

    from imagegpt.finetune import finetune
    from imagegpt.trainer import read_metrics

    directory = save_pretrained_dir(tmp_path / "pretrained", n_layer=1)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"resid_pdrop": 0.3, "embd_pdrop": 0.3}))
    common = dict(steps=3, eval_every=3, batch_size=8, dtype="float32", augment=False, patience=None)
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(len(runs))  # a different global RNG state before each run
        finetune(directory, "digits", tmp_path / name, **common)
        runs.append([r.get("loss") for r in read_metrics(tmp_path / name / "metrics.jsonl")])
    assert runs[0] == runs[1]
