"""The BERT objective (imagegpt.objectives): the loss against its definition, what the model can and cannot
see, the seeded masks, training, resume, evaluation, probes, fine-tuning, and the refusals."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from imagegpt import ImageGPT, ImageGPTClassifier, ImageGPTConfig
from imagegpt.checkpoint import BERT_SAFETENSORS_NAME
from imagegpt.cli import main
from imagegpt.errors import ArgumentError, CheckpointError, ConfigError
from imagegpt.evaluate import evaluate, image_nll, token_nll
from imagegpt.objectives import bert_micro_batches, ensemble_vote, evaluation_masks, training_masks
from imagegpt.palette import Palette
from imagegpt.processor import ImageProcessor
from imagegpt.sampling import complete, load_for_sampling, sample
from imagegpt.train import MaskedPixels, NextPixel, TrainOptions, pretraining_objective, resume_options, train
from imagegpt.trainer import find_checkpoint, read_metrics
from model_helpers import ids_for, randomised
from test_train import losses
from test_train import options as train_options

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def bert_config(**overrides) -> ImageGPTConfig:
    return ImageGPTConfig.from_preset(
        "igpt-nano", resolution=(4, 5), clusters=7, **{"objective": "bert", **overrides}
    )


def a_mask(config, batch=3, seed=1, prob=0.3):
    """A random mask in which every image has at least one masked position."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, config.n_positions, generator=generator) < prob
    mask[:, 0] = True
    return mask


def bert_loss_by_definition(model, ids, mask):
    """L_BERT from the paper and OpenAI's src/model.py, in float64 with none of imagegpt's modules:
    token embeddings zeroed at M, position embeddings added, GPT-2 blocks with attention over every position,
    the cross-entropy at M averaged per image, then over the batch."""
    c, w = model.config, {k: v.double() for k, v in model.state_dict().items()}
    B, T = ids.shape
    C, nh = c.n_embd, c.n_head

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.layer_norm_epsilon) * weight

    h = w["transformer.wte.weight"][ids] * (~mask)[..., None] + w["transformer.wpe.weight"][:T]
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        x = norm(h, w[p + "ln_1.weight"])
        q, k, v = (x @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]).split(C, dim=-1)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // nh), dim=-1) @ v  # no causal mask
        h = h + a.transpose(1, 2).reshape(B, T, C) @ w[p + "attn.c_proj.weight"].T + w[p + "attn.c_proj.bias"]
        z = norm(h, w[p + "ln_2.weight"]) @ w[p + "mlp.c_fc.weight"].T + w[p + "mlp.c_fc.bias"]
        h = h + (z * torch.sigmoid(1.702 * z)) @ w[p + "mlp.c_proj.weight"].T + w[p + "mlp.c_proj.bias"]
    logits = norm(h, w["transformer.ln_f.weight"]) @ w["lm_head.weight"].T
    log_p = torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None])[..., 0]  # (B, T)
    return torch.stack([-log_p[b][mask[b]].mean() for b in range(B)]).mean(), logits


# The loss and what the model sees


def test_bert_loss_equals_its_definition_on_random_weights():
    config = bert_config()
    model = randomised(ImageGPT(config), scale=0.2).eval()
    ids, mask = ids_for(config), a_mask(config)
    expected, expected_logits = bert_loss_by_definition(model, ids, mask)
    torch.testing.assert_close(model(ids, mask=mask).logits.double(), expected_logits, rtol=1e-4, atol=1e-5)
    for loss in (
        MaskedPixels(config, 0, None).loss(model, (ids, mask)),  # what training minimises
        model.image_loss(ids, mask),
        model.loss_per_image(ids, mask).mean(),
        model(ids, labels=ids, mask=mask).loss,
    ):
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_an_image_without_a_masked_position_adds_zero_to_the_batch_mean():
    config = bert_config()
    model = randomised(ImageGPT(config), scale=0.2).eval()
    ids, mask = ids_for(config), a_mask(config)
    mask[1] = False
    per_image = model.loss_per_image(ids, mask)
    assert per_image[1].item() == 0.0 and per_image[0] > 0 and per_image[2] > 0
    assert model.image_loss(ids, mask).item() == pytest.approx(per_image.sum().item() / 3)


def test_a_masked_tokens_id_changes_neither_the_logits_nor_the_loss():
    config = bert_config()
    model = randomised(ImageGPT(config), scale=0.2).eval()
    ids, mask = ids_for(config), a_mask(config)
    other = torch.where(mask, (ids + 3) % config.n_clusters, ids)  # every masked id changed
    assert not torch.equal(other, ids)
    with torch.no_grad():
        assert torch.equal(model(other, mask=mask).logits, model(ids, mask=mask).logits)
        assert torch.equal(model(other, labels=ids, mask=mask).loss, model(ids, labels=ids, mask=mask).loss)
        # Without the mask the changed ids are seen: the zeroing is what hides them.
        assert not torch.equal(model(other).logits, model(ids).logits)


@pytest.mark.parametrize("objective", ["bert", "ar"])
def test_an_unmasked_token_changes_the_logits_on_both_sides_only_for_bert(objective):
    config = bert_config(objective=objective)
    model = randomised(ImageGPT(config), scale=0.2).eval()
    ids = ids_for(config, batch=1)
    mask = torch.zeros_like(ids, dtype=torch.bool) if objective == "bert" else None
    j = config.n_positions // 2
    changed = ids.clone()
    changed[0, j] = (ids[0, j] + 1) % config.n_clusters
    with torch.no_grad():
        moved = (model(changed, mask=mask).logits - model(ids, mask=mask).logits).abs().amax(dim=-1)[0]
    assert (moved[j + 1 :] > 1e-6).all()  # every later position, in both models
    if objective == "bert":
        assert (moved[:j] > 1e-6).all()  # and every earlier one: no causal mask
    else:
        assert (moved[:j] == 0).all()


def test_a_bert_classifier_attends_both_ways_too():
    config = bert_config(num_labels=3)
    classifier = randomised(ImageGPTClassifier(config), scale=0.2).eval()
    ids = ids_for(config, batch=1)
    x, _ = classifier.transformer(ids)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % config.n_clusters
    y, _ = classifier.transformer(changed)
    assert ((x - y).abs().amax(dim=-1)[0, :-1] > 1e-6).all()


def test_bfloat16_autocast_bert_model_is_close_to_float32(cpu_bf16):
    config = bert_config()
    model = randomised(ImageGPT(config), scale=0.2).eval()
    ids, mask = ids_for(config), a_mask(config)
    reference = model.image_loss(ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.image_loss(ids, mask)
    assert loss.item() == pytest.approx(reference.item(), rel=2e-2)


# The masks


def test_training_masks_are_seeded_per_step_and_each_process_takes_its_rows():
    config = bert_config()
    whole = training_masks(config, seed=3, step=5, global_batch=8)
    assert whole.shape == (8, 20) and whole.dtype == torch.bool
    assert torch.equal(whole, training_masks(config, 3, 5, 8))
    assert torch.equal(training_masks(config, 3, 5, 8, slice(4, 8)), whole[4:])
    assert not torch.equal(training_masks(config, 3, 6, 8), whole)  # another step
    assert not torch.equal(training_masks(config, 4, 5, 8), whole)  # another seed
    many = training_masks(config.replace(bert_mask_prob=0.25), 0, 0, 4000)
    assert many.float().mean().item() == pytest.approx(0.25, abs=0.01)


def test_evaluation_masks_belong_to_an_image_whatever_its_batch():
    config = bert_config()
    masks = evaluation_masks(config, range(10))
    assert torch.equal(evaluation_masks(config, [7, 2]), masks[[7, 2]])
    assert not torch.equal(evaluation_masks(config, range(10), draw=1), masks)
    assert evaluation_masks(config, []).shape == (0, 20)


def test_micro_batches_split_the_steps_masks_by_process_and_accumulation():
    config = bert_config()
    ids = ids_for(config, batch=4)
    batches = bert_micro_batches(config, 2, 9, ids, rank=1, world_size=2, chunks=2)
    assert len(batches) == 2 and torch.equal(torch.cat([b[0] for b in batches]), ids)
    masks = torch.cat([b[1] for b in batches])
    assert torch.equal(masks, training_masks(config, 2, 9, 8)[4:])


def test_the_ensemble_takes_the_mode_and_breaks_ties_at_random_with_a_seed():
    votes = np.array([[0, 1, 2, 1], [0, 1, 3, 2], [4, 0, 2, 1]])
    assert ensemble_vote(votes)[[0, 1, 2, 3]].tolist() == [0, 1, 2, 1]
    ties = np.array([[0] * 200, [1] * 200])  # every column a tie between 0 and 1
    chosen = ensemble_vote(ties, seed=5)
    assert set(chosen.tolist()) == {0, 1}  # at random...
    assert np.array_equal(chosen, ensemble_vote(ties, seed=5))  # ...with a seed


# Configs and checkpoints


def test_bad_objectives_and_mask_probabilities_are_config_errors():
    with pytest.raises(ConfigError, match="objective"):
        bert_config(objective="mlm")
    for prob in (0.0, 1.0, -0.1, True):
        with pytest.raises(ConfigError, match="bert_mask_prob"):
            bert_config(bert_mask_prob=prob)


def test_a_bert_directory_records_its_objective_and_reloads(tmp_path):
    config = bert_config(bert_mask_prob=0.2)
    model = randomised(ImageGPT(config), scale=0.2).eval()
    model.save_pretrained(tmp_path / "bert")
    values = json.loads((tmp_path / "bert" / "config.json").read_text())
    assert values["model_type"] == "imagegpt_bert" and values["objective"] == "bert"
    assert values["bert_mask_prob"] == 0.2
    assert sorted(p.name for p in (tmp_path / "bert").iterdir()) == ["config.json", BERT_SAFETENSORS_NAME]
    loaded = ImageGPT.from_pretrained(tmp_path / "bert")
    assert loaded.config.objective == "bert" and loaded.config.bert_mask_prob == 0.2
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
    # A next-pixel model written over it leaves no BERT weights behind, and its config.json is as before.
    ImageGPT(config.replace(objective="ar")).save_pretrained(tmp_path / "bert")
    assert sorted(p.name for p in (tmp_path / "bert").iterdir()) == ["config.json", "model.safetensors"]
    values = json.loads((tmp_path / "bert" / "config.json").read_text())
    assert values["model_type"] == "imagegpt" and "objective" not in values
    assert ImageGPT.from_pretrained(tmp_path / "bert").config.objective == "ar"


@pytest.mark.parametrize(("model_type", "objective"), [("imagegpt", "bert"), ("imagegpt_bert", "ar")])
def test_a_hand_edited_objective_that_contradicts_model_type_is_refused(tmp_path, model_type, objective):
    ImageGPT(bert_config()).save_pretrained(tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps(values | dict(model_type=model_type, objective=objective))
    )
    with pytest.raises(CheckpointError, match="edited by hand"):
        ImageGPT.from_pretrained(tmp_path)


def test_transformers_refuses_a_bert_directory_rather_than_read_it_as_causal(tmp_path):
    """transformers has no BERT ImageGPT: every way of loading the directory raises."""
    transformers = pytest.importorskip("transformers")
    model, classifier = ImageGPT(bert_config()), ImageGPTClassifier(bert_config(num_labels=3))
    model.save_pretrained(tmp_path / "lm")
    classifier.save_pretrained(tmp_path / "clf")
    unknown_type, no_weights = "imagegpt_bert.*does not recognize", "no file named model.safetensors"
    attempts = [
        (lambda: transformers.AutoConfig.from_pretrained(tmp_path / "lm"), unknown_type),
        (lambda: transformers.AutoModel.from_pretrained(tmp_path / "lm"), unknown_type),
        (lambda: transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "lm"), no_weights),
        (lambda: transformers.ImageGPTModel.from_pretrained(tmp_path / "lm"), no_weights),
        (lambda: transformers.ImageGPTForImageClassification.from_pretrained(tmp_path / "clf"), no_weights),
    ]
    for attempt, message in attempts:
        with pytest.raises((OSError, ValueError), match=message):
            attempt()


# Refusals where a causal model is required


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    config = ImageGPTConfig.from_preset("igpt-nano", resolution=4, clusters=8, objective="bert")
    processor = ImageProcessor(Palette(np.random.default_rng(0).uniform(-1, 1, (8, 3))), 4)
    directory = tmp_path_factory.mktemp("bert")
    ImageGPT(config).save_pretrained(directory, processor=processor)
    return directory


def test_sampling_and_completion_refuse_a_bert_model(bert_dir):
    model = ImageGPT.from_pretrained(bert_dir)
    with pytest.raises(ConfigError, match="BERT model"):
        sample(model, 1)
    with pytest.raises(ConfigError, match="BERT model"):
        complete(model, torch.zeros(1, 16, dtype=torch.long), keep=0.5)
    with pytest.raises(ConfigError, match="--objective ar"):
        load_for_sampling(bert_dir)


@pytest.mark.parametrize("command", ["sample", "complete"])
def test_the_cli_refuses_a_bert_model_in_one_line(bert_dir, tmp_path, capsys, command):
    args = [command, "--model", str(bert_dir), "--out", str(tmp_path / "x.png"), "--device", "cpu"]
    if command == "complete":
        image = tmp_path / "in.png"
        from PIL import Image

        Image.new("RGB", (4, 4)).save(image)
        args.append(str(image))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "BERT model" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


# Training


def options(out, **changes) -> TrainOptions:
    """test_train's tiny digits run, as a BERT model, a few steps."""
    bert = {"steps": 6, "eval_every": 3, "save_every": 3, "objective": "bert"}
    return train_options(out, **(bert | changes))


def test_a_bert_run_learns_records_its_objective_and_resumes_exactly(tmp_path):
    """SIGTERM after step 2, then --resume: the same losses and weights bit for bit (dropout on, so the RNG
    state matters as well as the step's masks)."""
    changes = dict(dropout=0.1, mask_prob=0.2)
    whole = train(options(tmp_path / "whole", **changes))
    records = [r for r in read_metrics(tmp_path / "whole" / "metrics.jsonl") if r["split"] == "train"]
    assert records[0]["loss"] == pytest.approx(math.log(8), rel=1e-4)  # zero head: uniform on masked tokens
    assert records[-1]["loss"] < records[0]["loss"] - 0.05
    assert whole.objective == "bert" and whole.val_loss is not None
    model = ImageGPT.from_pretrained(whole.model_dir)
    assert model.config.objective == "bert" and model.config.bert_mask_prob == 0.2
    assert (find_checkpoint(tmp_path / "whole" / "checkpoints") / BERT_SAFETENSORS_NAME).is_file()

    def terminate_after_2(step, record, model):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(options(tmp_path / "split", **changes), on_step=terminate_after_2)
    assert first.stopped and first.step == 2
    torch.manual_seed(99)
    second = train(resume_options(tmp_path / "split", progress=False), resume=True)
    assert second.step == 6 and not second.stopped
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert losses(tmp_path / "split", "val") == losses(tmp_path / "whole", "val")
    torch.testing.assert_close(
        ImageGPT.from_pretrained(second.model_dir).state_dict(), model.state_dict(), rtol=0, atol=0
    )


def test_bert_accumulation_draws_the_masks_of_the_global_batch(tmp_path):
    one = train(options(tmp_path / "one", steps=3, eval_every=0, save_every=0))
    four = train(options(tmp_path / "four", steps=3, eval_every=0, save_every=0, accumulate=4))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "four")
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-5)
    assert four.val_loss == pytest.approx(one.val_loss, rel=1e-5)


def test_a_run_cannot_resume_with_another_objective(tmp_path):
    train(options(tmp_path / "run", steps=1, eval_every=0, save_every=0))
    with pytest.raises(ArgumentError, match="--objective"):
        resume_options(tmp_path / "run", objective="ar")
    with pytest.raises(ArgumentError, match="objective"):
        train(options(tmp_path / "run", steps=1, objective="ar"), resume=True)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(objective="mlm"), "--objective"),
        (dict(mask_prob=1.5), "--mask-prob"),
        (dict(objective="ar", mask_prob=0.3), "--mask-prob is the BERT objective's"),
    ],
)
def test_bad_objective_options_are_user_errors(tmp_path, changes, message):
    with pytest.raises(ArgumentError, match=message):
        train(options(tmp_path / "run", **changes))
    assert not (tmp_path / "run").exists()


# Evaluation, probes and fine-tuning


def test_evaluation_scores_the_masked_tokens_of_fixed_masks_whatever_the_batch():
    config = bert_config()
    model = randomised(ImageGPT(config), scale=0.2).eval()
    ids = ids_for(config, batch=7)
    total, count = token_nll(model, ids, batch_size=3)
    mask = evaluation_masks(config, range(7))
    with torch.no_grad():
        log_p = torch.log_softmax(model(ids, mask=mask).logits.double(), -1).gather(-1, ids[..., None])[
            ..., 0
        ]
    assert count == int(mask.sum()) and total == pytest.approx(-log_p[mask].sum().item(), rel=1e-5)
    assert token_nll(model, ids, batch_size=7) == pytest.approx((total, count), rel=1e-6)
    # The images' own masks: a slice evaluated with its indices scores what it scores in the whole.
    part, part_count = image_nll(model, ids[4:], indices=[4, 5, 6])
    assert part_count == int(mask[4:].sum())
    assert image_nll(model, ids[4:])[1] == int(mask[:3].sum())  # without them: images 0..2's masks
    two, two_count = token_nll(model, ids, masks=2)
    both = mask.sum() + evaluation_masks(config, range(7), draw=1).sum()
    assert two_count == int(both)


def test_eval_reports_a_bert_model_as_not_comparable(bert_dir, tmp_path, capsys):
    result = evaluate(bert_dir, "digits", "val", device="cpu", masks=2)
    assert result.objective == "bert" and result.masks == 2
    assert result.tokens < result.images * 16 * 2  # only masked tokens are scored
    assert "NOT comparable" in result.summary()
    json_path = tmp_path / "e.json"
    assert main(["eval", "--model", str(bert_dir), "--data", "digits", "--split", "val", "--device", "cpu",
                 "--json", str(json_path)]) == 0  # fmt: skip
    assert "masked tokens of 1 fixed BERT mask(s) per image" in capsys.readouterr().out
    assert json.loads(json_path.read_text())["objective"] == "bert"


def test_probe_reads_bert_images_masked_and_reports_the_ensemble(tmp_path):
    from imagegpt.probe import extract_features, format_report, run_probe

    config = bert_config(bert_mask_prob=0.3)
    model = randomised(ImageGPT(config), scale=0.2).eval()
    ids = ids_for(config, batch=5)
    features = extract_features(model, ids, [config.n_layer])[config.n_layer]
    mask = evaluation_masks(config, range(5))
    with torch.no_grad():
        expected = model.transformer(ids, mask=mask)[0].mean(dim=1)  # ln_f's output, pooled
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-6)
    other = extract_features(model, ids, [config.n_layer], draw=1)[config.n_layer]
    assert not np.allclose(other, features)

    rng = np.random.default_rng(0)
    splits = [(ids_for(config, 24, seed=s), rng.integers(0, 2, 24)) for s in range(3)]
    report = run_probe(model, None, *splits, layers="0,2", baseline=False, cache_dir=tmp_path)
    assert report["objective"] == "bert" and report["ensemble_masks"] == 5
    assert all(0 <= row["test_accuracy_ensemble"] <= 1 for row in report["rows"])
    text = format_report(report)
    assert "BERT objective (p=0.3)" in text and "5-mask vote" in text
    ar = run_probe(
        randomised(ImageGPT(config.replace(objective="ar")), scale=0.2).eval(),
        None,
        *splits,
        layers="0",
        baseline=False,
    )
    assert ar["objective"] == "ar" and ar["ensemble_masks"] is None
    assert "next-pixel (ar) objective" in format_report(ar) and "vote" not in format_report(ar)


def test_bert_fine_tuning_uses_l_bert_on_the_same_masked_pass():
    from imagegpt.finetune import FinetuneModel, predict

    config = bert_config()
    pretrained = randomised(ImageGPT(config), scale=0.2).eval()
    model = FinetuneModel(pretrained, num_labels=3).eval()
    ids, mask = ids_for(config), a_mask(config)
    with torch.no_grad():
        logits, clf_loss, gen_loss = model(ids, torch.tensor([0, 1, 2]), gen_weight=1.0, mask=mask)
        torch.testing.assert_close(gen_loss, pretrained.image_loss(ids, mask), rtol=1e-5, atol=1e-6)
        classifier_logits = model.classifier(ids, mask=mask).logits
    torch.testing.assert_close(logits, classifier_logits)
    assert model.classifier.config.objective == "bert"
    with pytest.raises(ArgumentError, match="mask"):
        model(ids)
    predicted = predict(model.classifier, ids, batch_size=2)
    with torch.no_grad():
        direct = model.classifier(ids, mask=evaluation_masks(config, range(3))).logits
    np.testing.assert_allclose(predicted, direct.numpy(), rtol=1e-5, atol=1e-6)


def test_finetune_and_classify_a_bert_run_end_to_end(tmp_path):
    from imagegpt.finetune import classify, finetune

    pretrained = train(options(tmp_path / "pre", steps=2, eval_every=0, save_every=0))
    summary = finetune(pretrained.model_dir, "digits", tmp_path / "ft", steps=4, batch_size=16, device="cpu",
                       dtype="float32")  # fmt: skip
    assert summary["objective"] == "bert"
    assert (
        json.loads((tmp_path / "ft" / "model" / "config.json").read_text())["model_type"] == "imagegpt_bert"
    )
    report = classify(tmp_path / "ft", "digits", device="cpu")
    assert report["objective"] == "bert" and report["ensemble_masks"] == 5
    assert 0 <= report["accuracy_ensemble"] <= 1


def test_pretraining_objective_picks_by_config():
    assert type(pretraining_objective(bert_config(), None, 0, 8)) is MaskedPixels
    assert type(pretraining_objective(bert_config(objective="ar"), None, 0, 8)) is NextPixel
    with pytest.raises(ArgumentError, match="masks"):
        token_nll(ImageGPT(bert_config()), ids_for(bert_config()), masks=0)


def test_a_study_labels_a_bert_run_and_never_mixes_it_with_next_pixel_runs(tmp_path):
    from imagegpt.study import StudyOptions, format_study, run_study

    for objective in ("bert", "ar"):
        kept = options(tmp_path / objective, objective=objective, steps=2, eval_every=0, save_every=0)
        train(TrainOptions(**{**kept.__dict__, "keep_checkpoints": 2}))
    study = dict(data="digits", data_options={}, Cs=(1.0,), device="cpu", dtype="float32", progress=False)
    with pytest.raises(ArgumentError, match="mix objectives"):
        run_study(
            StudyOptions(
                out=str(tmp_path / "s"), runs=[str(tmp_path / "bert"), str(tmp_path / "ar")], **study
            )
        )
    result = run_study(StudyOptions(out=str(tmp_path / "s"), runs=[str(tmp_path / "bert")], **study))
    assert result["runs"][0]["objective"] == "bert" and "a BERT run" in format_study(result)
