"""DeiT distillation: the loss against a hand computation (hard and soft), the frozen teacher (no gradient, eval mode,
renormalised input, absent from the student's checkpoint), the two-head inference average, the MAE-encoder start of
the distillation token, the teacher sources, and a CNN teacher trained by finetune/classify.py teaching a ViT student
end to end (export reloaded in timm). Tiny data/encoder helpers from test_linprobe.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from conftest import N_TEST, TINY_ENC
from safetensors.torch import load_file, save_file

FT = ["run.trackers=none", "run.progress=false", "data.num_workers=0", "data.global_batch=8", "data.eval_batch=4",
      "run.log_every=2", "optim.warmup_steps=1", "run.eval_every=0"]

# a hand-worked example: N = 2 images, C = 3 classes
CLS = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
DIST = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
TEACHER = [[0.0, 3.0, 0.0], [1.0, 0.0, 2.0]]  # argmax: classes 1 and 2
LABELS = [0, 1]


def _log_softmax(row: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(v) for v in row))
    return [v - lse for v in row]


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_hard_distillation_loss_by_hand():
    from finetune.distill import distillation_loss

    total, base, distill = distillation_loss(_t(CLS), _t(DIST), torch.tensor(LABELS), _t(TEACHER), kind="hard",
                                             tau=1.0, alpha=0.25, base_criterion=nn.CrossEntropyLoss())
    # CE of the dist head on the teacher's argmax: -log softmax(DIST[0])[1] = log(e + 2), -log softmax(DIST[1])[2]
    # = log(e^2 + 2); the CLS head on the labels: log(1 + e^-2 + e^-3) and log(2 + e^-0.5)
    hand_distill = (math.log(math.e + 2) + math.log(math.e ** 2 + 2)) / 2
    hand_base = (math.log(1 + math.exp(-2) + math.exp(-3)) + math.log(2 + math.exp(-0.5))) / 2
    assert distill.item() == pytest.approx(hand_distill, abs=1e-12) and hand_distill == pytest.approx(1.89549, abs=1e-5)
    assert base.item() == pytest.approx(hand_base, abs=1e-12)
    assert total.item() == pytest.approx(0.75 * hand_base + 0.25 * hand_distill, abs=1e-12)


def test_soft_distillation_loss_by_hand():
    """tau^2 * KL(teacher || student) at temperature tau, summed over classes, mean over images (batchmean)."""
    from finetune.distill import distillation_loss

    tau = 2.0
    kl = []
    for s_row, t_row in zip(DIST, TEACHER):
        log_s, log_t = _log_softmax([v / tau for v in s_row]), _log_softmax([v / tau for v in t_row])
        kl.append(sum(math.exp(lt) * (lt - ls) for ls, lt in zip(log_s, log_t)))
    hand = tau ** 2 * sum(kl) / len(kl)
    total, base, distill = distillation_loss(_t(CLS), _t(DIST), torch.tensor(LABELS), _t(TEACHER), kind="soft",
                                             tau=tau, alpha=0.5, base_criterion=nn.CrossEntropyLoss())
    assert distill.item() == pytest.approx(hand, abs=1e-12) and hand > 0
    assert total.item() == pytest.approx(0.5 * base.item() + 0.5 * hand, abs=1e-12)
    # the DeiT code's convention (sum over images and classes / (N * C)) is this value divided by C
    deit = torch.nn.functional.kl_div((_t(DIST) / tau).log_softmax(1), (_t(TEACHER) / tau).log_softmax(1),
                                      reduction="sum", log_target=True) * tau ** 2 / _t(DIST).numel()
    assert deit.item() == pytest.approx(hand / 3, abs=1e-12)
    # a student that matches the teacher has no distillation loss
    _, _, zero = distillation_loss(_t(CLS), _t(TEACHER), torch.tensor(LABELS), _t(TEACHER), kind="soft", tau=tau,
                                   alpha=0.5, base_criterion=nn.CrossEntropyLoss())
    assert abs(zero.item()) < 1e-12


def test_teacher_is_frozen_gets_no_gradient_and_renormalises():
    import timm

    from finetune.distill import Teacher, distillation_loss
    from models.classifier import create_classifier

    torch.manual_seed(0)
    cnn = timm.create_model("test_resnet", num_classes=3)
    teacher = Teacher(cnn, student_mean=(0.5,) * 3, student_std=(0.25,) * 3, mean=(0.4,) * 3, std=(0.2,) * 3)
    teacher.train()  # stays in eval mode: BatchNorm statistics never move
    assert not teacher.training and not cnn.training and teacher.renormalise
    bn_before = {k: v.clone() for k, v in cnn.state_dict().items()}
    student = create_classifier(TINY_ENC, 3, distilled=True)
    student.set_distilled_training(True)
    student.train()
    x = torch.randn(4, 3, 32, 32)
    cls_logits, dist_logits = student(x)
    loss, _, _ = distillation_loss(cls_logits, dist_logits, torch.tensor([0, 1, 2, 0]), teacher(x), kind="soft",
                                   tau=2.0, alpha=0.5, base_criterion=nn.CrossEntropyLoss())
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in cnn.parameters())
    assert student.dist_token.grad is not None and student.head_dist.weight.grad.abs().sum() > 0
    assert all(torch.equal(v, bn_before[k]) for k, v in cnn.state_dict().items())
    # the teacher sees (x * 0.25 + 0.5 - 0.4) / 0.2: the student's normalisation undone, its own applied
    seen = []
    probe = Teacher(nn.Identity(), student_mean=(0.5,) * 3, student_std=(0.25,) * 3, mean=(0.4,) * 3, std=(0.2,) * 3,
                    img_size=48)
    probe.model.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = torch.rand(2, 3, 48, 48)
    probe(x)
    torch.testing.assert_close(seen[0], (x * 0.25 + 0.5 - 0.4) / 0.2)
    assert probe(torch.rand(2, 3, 32, 32)).shape == (2, 3, 48, 48)  # resized to the teacher's resolution


def test_two_heads_train_separately_and_average_at_inference():
    from models.classifier import create_classifier

    torch.manual_seed(0)
    model = create_classifier(TINY_ENC, 3, distilled=True)
    for head in (model.head, model.head_dist):  # distinct heads, not the tiny initialisation
        nn.init.normal_(head.weight, std=0.5)
        nn.init.normal_(head.bias, std=0.5)
    model.set_distilled_training(True)
    x = torch.randn(3, 3, 32, 32)
    model.train()
    cls_logits, dist_logits = model(x)
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(x)  # [N, 2 + L, D]: CLS, distillation token, patches
        by_hand = (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
        out = model(x)
    torch.testing.assert_close(out, by_hand)
    torch.testing.assert_close(out, (cls_logits + dist_logits).detach() / 2)  # no dropout/drop path: same tokens
    assert not torch.allclose(cls_logits, dist_logits)


def test_mae_encoder_starts_the_distillation_token_from_cls(tiny):
    from models.classifier import create_classifier, load_encoder_into
    from models.convert import load_state_dict

    sd = load_state_dict(str(tiny["encoder"]))
    model = create_classifier(TINY_ENC, 3, distilled=True)
    report = load_encoder_into(model, sd)
    assert report["dist_token"] == "copied from cls_token"
    torch.testing.assert_close(model.dist_token, sd["cls_token"])
    torch.testing.assert_close(model.pos_embed[:, :2], sd["pos_embed"][:, :1].expand(-1, 2, -1))
    torch.testing.assert_close(model.pos_embed[:, 2:], sd["pos_embed"][:, 1:])
    bigger = create_classifier(TINY_ENC, 3, distilled=True, img_size=48)  # grid 4x4 -> 6x6, two prefix tokens kept
    report = load_encoder_into(bigger, sd)
    assert report["resized"] == {"pos_embed": ([4, 4], [6, 6])} and bigger.pos_embed.shape == (1, 2 + 36, 32)
    torch.testing.assert_close(bigger.pos_embed[:, 1], sd["pos_embed"][:, 0])


def test_distilled_checkpoint_probes_and_fine_tunes_as_a_plain_vit(tiny, tmp_path):
    """A distilled classifier's weights (two prefix tokens, two heads) go to a model without a distillation token:
    the encoder is recognised (its grid is 4x4 + CLS + dist), and loading keeps CLS and the patch positions exactly."""
    from launch.weights import read_weights
    from models.classifier import create_classifier, load_encoder_into
    from models.convert import load_state_dict

    distilled = create_classifier(TINY_ENC, 3, distilled=True)
    load_encoder_into(distilled, load_state_dict(str(tiny["encoder"])))
    with torch.no_grad():
        distilled.dist_token.add_(1.0)  # a learned token, unlike CLS
    sd = {k: v.contiguous() for k, v in distilled.state_dict().items()}
    save_file(sd, str(tmp_path / "distilled.safetensors"))

    source = read_weights(str(tmp_path / "distilled.safetensors"), num_heads=TINY_ENC["num_heads"])
    assert {k: source.encoder_cfg[k] for k in ("img_size", "patch_size", "depth")} == {
        k: TINY_ENC[k] for k in ("img_size", "patch_size", "depth")}
    assert not any(k.startswith(("head.", "head_dist.")) for k in source.state_dict)

    plain = create_classifier(TINY_ENC, 3)
    report = load_encoder_into(plain, source.state_dict)
    assert report["dist_token"] == "dropped (the model has none)" and report["resized"] is None
    torch.testing.assert_close(plain.cls_token, sd["cls_token"])
    torch.testing.assert_close(plain.pos_embed[:, :1], sd["pos_embed"][:, :1])
    torch.testing.assert_close(plain.pos_embed[:, 1:], sd["pos_embed"][:, 2:])  # the dist slot is gone
    torch.testing.assert_close(plain.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    again = create_classifier(TINY_ENC, 3, distilled=True)  # distilling again keeps the learned token
    assert load_encoder_into(again, source.state_dict)["dist_token"] is None
    torch.testing.assert_close(again.dist_token, sd["dist_token"])


def test_teacher_sources_and_their_errors(tiny, tmp_path):
    import timm

    from core.errors import UserError as ConfigError  # config and weights problems alike
    from finetune.distill import load_teacher
    from finetune.export import save_classifier
    from models.classifier import create_classifier

    torch.manual_seed(0)
    cnn = timm.create_model("test_resnet", num_classes=3).eval()
    weights = tmp_path / "resnet.safetensors"
    save_file(cnn.state_dict(), str(weights))
    common = dict(num_classes=3, class_names=None, student_mean=(0.5, 0.5, 0.5), student_std=(0.5, 0.5, 0.5))
    teacher, info = load_teacher("timm:test_resnet", weights=str(weights), **common)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher(x), cnn(x))  # test_resnet's timm mean/std are 0.5: no renormalisation
    assert info["renormalised"] is False and info["img_size"] is None
    with pytest.raises(ConfigError, match="cannot load timm:test_resnet"):
        load_teacher("timm:test_resnet", weights=str(weights), **{**common, "num_classes": 5})
    with pytest.raises(ConfigError, match="not found|no such file"):
        load_teacher("timm:test_resnet", weights=str(tmp_path / "missing.pth"), **common)
    with pytest.raises(ConfigError, match="no model"):
        load_teacher("timm:no_such_net", weights=str(weights), **common)

    vit = create_classifier(TINY_ENC, 3)
    meta = {"kind": "vit", "encoder_cfg": TINY_ENC, "num_classes": 3, "global_pool": "token", "img_size": 32,
            "mean": [0.4] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "class_names": ["a", "b", "c"]}
    save_classifier(vit.state_dict(), tmp_path / "vit" / "classifier_best.safetensors", meta)
    teacher, info = load_teacher(str(tmp_path / "vit"), weights=None, **{**common, "class_names": ["a", "b", "c"]})
    assert info["renormalised"] and info["kind"] == "vit" and info["img_size"] == 32
    with pytest.raises(ConfigError, match="label order"):
        load_teacher(str(tmp_path / "vit"), weights=None, **{**common, "class_names": ["b", "a", "c"]})
    with pytest.raises(ConfigError, match="has 3 classes, the data 4"):
        load_teacher(str(tmp_path / "vit"), weights=None, **{**common, "num_classes": 4})


def test_cnn_teacher_from_the_pipeline_teaches_a_vit_student(tiny, capsys):
    """classify.py trains a CNN (arch=timm:test_resnet); a student from the MAE encoder learns from it (soft, mixup
    on). The teacher's accuracy is printed first; the student's checkpoint and export hold the student alone; the
    export reloads in timm with identical outputs (the two heads' mean)."""
    import timm
    from conftest import load_classifier

    from finetune.classify import main

    data, base = tiny["data"], tiny["base"]
    t_run, s_run = base / "cnn_teacher", base / "student"
    main([f"data.train={data}", "encoder=random", "arch=timm:test_resnet", "model.img_size=32",
          f"run.output_dir={t_run}", "run.steps=2", "run.save_every=0", "optim.blr=0.05", *FT])
    t_eval = json.loads((t_run / "eval.json").read_text())
    assert json.loads((t_run / "classifier.json").read_text())["kind"] == "cnn"
    capsys.readouterr()
    main([f"data.train={data}", f"encoder={tiny['encoder']}", f"run.output_dir={s_run}", "run.steps=4",
          "run.save_every=4", "distill.kind=soft", f"distill.teacher={t_run}", "distill.tau=2.0", *FT])
    out = capsys.readouterr().out
    assert f"teacher {t_run} (test_resnet): top1 {t_eval['top1']:.2f}" in out  # the teacher as classify.py saved it
    assert out.index("[finetune] teacher") < out.index("step 2/4")  # before training starts
    ev = json.loads((s_run / "eval.json").read_text())
    assert ev["distill"]["top1"] == t_eval["top1"] and ev["distill"]["n_images"] == N_TEST
    assert ev["distill"]["kind"] == "soft" and ev["n_images"] == N_TEST
    logged = [json.loads(line) for line in (s_run / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_cls" in r and "loss_distill" in r for r in logged if "loss" in r)

    student, meta = load_classifier(s_run / "classifier_last.safetensors")
    assert meta["kind"] == "distilled" and type(student).__name__ == "VisionTransformerDistilled"
    ckpt = load_file(str(s_run / "checkpoints" / "step_000004" / "model.safetensors"))
    assert set(ckpt) == set(student.state_dict())  # the student's tensors and nothing of the teacher's
    optim_state = torch.load(s_run / "checkpoints" / "step_000004" / "optimizer.bin", weights_only=False)
    n_params = sum(len(g["params"]) for g in optim_state["param_groups"])
    assert n_params == sum(1 for p in student.parameters())
    exported = load_file(str(s_run / "classifier_last.safetensors"))
    assert {"dist_token", "head_dist.weight"} <= set(exported) and set(exported) == set(ckpt)

    t = meta["timm"]
    path = str(s_run / "classifier_last.safetensors")
    reloaded = timm.create_model(t["name"], pretrained=True, **t["kwargs"],
                                 pretrained_cfg_overlay=dict(file=path, num_classes=meta["num_classes"])).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), student(x))
        tokens = student.forward_features(x)
        torch.testing.assert_close(student(x), (student.head(tokens[:, 0]) + student.head_dist(tokens[:, 1])) / 2)

    # the distilled export is an encoder like any other: a linear probe reads its CLS and patch tokens
    from conftest import DOWNSTREAM

    from finetune.linprobe import main as probe

    probe([f"data.train={data}", f"encoder={path}", f"run.output_dir={base / 'probe_distilled'}", "run.steps=2",
           *DOWNSTREAM])
    assert json.loads((base / "probe_distilled" / "eval.json").read_text())["n_images"] == N_TEST


def _bad(tiny, *extra):
    from core.errors import UserError
    from finetune.classify import main

    with pytest.raises((UserError, SystemExit)) as info:
        main([f"data.train={tiny['data']}", f"encoder={tiny['encoder']}", f"run.output_dir={tiny['base'] / 'bad'}",
              "run.steps=1", *FT, *extra])
    return info


def test_bad_distillation_settings_fail_before_training(tiny, capsys):
    assert _bad(tiny, "distill.kind=hard").value.code == 2
    assert "needs distill.teacher=" in capsys.readouterr().err
    assert _bad(tiny, "distill.kind=soft", "distill.teacher=x", "model.pool=avg").value.code == 2
    assert "model.pool=token" in capsys.readouterr().err
    assert _bad(tiny, "distill.kind=soft", "distill.teacher=timm:test_resnet").value.code == 2
    assert "teacher_weights" in capsys.readouterr().err
    msg = str(_bad(tiny, "distill.kind=hard", f"distill.teacher={tiny['base'] / 'nowhere'}").value)
    assert "no such file or directory" in msg
    assert not (tiny["base"] / "bad" / "checkpoints").exists()
