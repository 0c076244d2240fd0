"""POST around the federated part: the student (kept layers, distillation, `fedprompt distill`) and the
transfer to the large model (the alpha rule, the loss, `fedprompt transfer`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedprompt import cli
from fedprompt.errors import ConfigError, DataError
from fedprompt.methods.post import PromptTransfer, SoftPromptTuner, TrainConfig, alpha_rule, save_prompt
from fedprompt.models import SoftPrompt, load_causal_lm, load_tokenizer
from fedprompt.models.distill import DistillConfig, build_student, check_layers, default_layers, distill
from tests.conftest import CORPUS, write_task
from tests.test_post_dp import EXAMPLES, SPEC


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir), "cpu", "float32"), load_tokenizer(str(tiny_model_dir))


def test_default_layers_and_bad_layers():
    assert default_layers(30) == [0, 1, 28, 29]
    assert default_layers(3) == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"distill.layers \[30\] out of range: the teacher has 30 layers"):
        check_layers([0, 1, 30], 30)
    with pytest.raises(ConfigError, match="increasing without repeats"):
        check_layers([1, 0], 30)
    with pytest.raises(ConfigError, match="is empty"):
        check_layers([], 30)


def test_the_student_copies_the_kept_layers_embeddings_and_head(teacher):
    model, tok = teacher
    same = build_student(model, [0, 1])  # every layer kept: the same network
    ids = tok(["a great movie with a wonderful cast"], return_tensors="pt").input_ids
    torch.testing.assert_close(same(ids).logits, model(ids).logits)
    small = build_student(model, [1])
    assert small.config.num_hidden_layers == 1
    torch.testing.assert_close(small.model.layers[0].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)
    torch.testing.assert_close(small.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert not torch.allclose(small(ids).logits, model(ids).logits)  # a layer is missing: outputs differ


def test_distillation_lowers_the_loss_and_keeps_the_embeddings(teacher):
    model, tok = teacher
    torch.manual_seed(0)
    student = build_student(model, [1])
    before = student.get_input_embeddings().weight.detach().clone()
    report = distill(model, student, tok, CORPUS, DistillConfig(steps=30, batch_size=4, lr=3e-3, autocast=False),
                     log_every=5)
    assert report.curve[-1]["loss"] < report.curve[0]["loss"]
    assert report.student_parameters < report.teacher_parameters and report.steps == 30 and report.tokens > 0
    torch.testing.assert_close(student.get_input_embeddings().weight, before)  # frozen: the large model's input space


@pytest.mark.parametrize("left_padded", [False, True])
def test_the_answer_term_is_the_kl_at_each_texts_last_token(left_padded):
    from types import SimpleNamespace

    from fedprompt.models.distill import DistillLossWeights, distill_loss

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    if left_padded:
        mask = mask.flip(1)
    last = [3, 1] if not left_padded else [3, 3]
    ids = torch.randint(0, 11, (2, 4))
    def out():
        return SimpleNamespace(logits=torch.randn(2, 4, 11), hidden_states=[torch.randn(2, 4, 5)])

    student, teacher = out(), out()
    plain, parts = distill_loss(student, teacher, ids, mask, DistillLossWeights())
    weighted, with_answer = distill_loss(student, teacher, ids, mask, DistillLossWeights(a_answer=3.0))
    by_hand = sum(torch.nn.functional.kl_div(torch.log_softmax(student.logits[r, t] / 2, -1),
                                             torch.softmax(teacher.logits[r, t] / 2, -1), reduction="sum")
                  for r, t in enumerate(last)) / 2 * 4
    assert "answer" not in parts and with_answer["answer"] == pytest.approx(float(by_hand), rel=1e-5)
    assert float(weighted - plain) == pytest.approx(3.0 * float(by_hand), rel=1e-5)


def test_alpha_rule():
    assert alpha_rule(zero_shot=0.8, student_prompt=0.9, chance=0.5) == pytest.approx(0.75)
    assert alpha_rule(zero_shot=0.95, student_prompt=0.9, chance=0.5) == 1.0  # the large model alone is better
    assert alpha_rule(zero_shot=0.4, student_prompt=0.9, chance=0.5) == 0.0
    assert alpha_rule(zero_shot=0.8, student_prompt=0.5, chance=0.5) == 1.0  # a chance-level student: differences only


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_transfer_fits_the_students_prompted_outputs(teacher, alpha):
    model, tok = teacher
    torch.manual_seed(0)
    student = SoftPromptTuner(build_student(model, [1]).eval().requires_grad_(False), tok, SPEC, TrainConfig())
    large = SoftPromptTuner(model, tok, SPEC, TrainConfig())
    student_prompt = SoftPrompt(4, 32, torch.randn(4, 32))
    transfer = PromptTransfer(student, large, steps=25, batch_size=8, lr=0.05)
    result = transfer.run(student_prompt, EXAMPLES, alpha, SoftPrompt(4, 32))
    assert result.losses[-1] < result.losses[0] and result.alpha == alpha and result.steps == 25
    assert result.fixed_tokens["student"] > 0 and result.fixed_tokens["large"] > 0 and result.tokens > 0


def split_rows(split: str) -> list[dict]:
    """CORPUS with a suffix per split: each split has its own sentences (the commands refuse shared content)."""
    suffix = {"train": "", "validation": " v", "test": " t"}[split]
    return [{"text": t + suffix, "label": i % 2} for i, t in enumerate(CORPUS)]


@pytest.fixture
def post_data(tmp_path):
    for name in ("toy", "other"):
        write_task(tmp_path, name, {s: split_rows(s) for s in ("train", "validation", "test")},
                   ["negative", "positive"])
    return tmp_path


def leak(data_dir, task: str, split: str) -> str:
    """Add toy's third test sentence, spaced and cased otherwise (still the same content), to ``task``'s ``split``."""
    sentence = split_rows("test")[2]["text"]
    rows = split_rows(split) + [{"text": "  " + sentence.upper(), "label": 0}]
    (data_dir / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return sentence


@pytest.fixture
def nothing_expensive(monkeypatch):
    monkeypatch.setattr("fedprompt.models.load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))


def tiny_args(data_dir, model_dir, tmp_path) -> list[str]:
    return [f"data_dir={data_dir}", "task=toy", f"model={model_dir}", "model.dtype=float32", "progress=false",
            f"output_dir={tmp_path / 'out'}"]


def test_fedprompt_distill_saves_a_loadable_student_and_a_report(capsys, post_data, tiny_model_dir, tmp_path):
    student_dir = tmp_path / "student"
    code = cli.main(["distill", *tiny_args(post_data, tiny_model_dir, tmp_path), "distill.layers=[1]",
                     "distill.steps=4", "distill.batch_size=4", "distill.data.tasks=[other]", "distill.eval_limit=4",
                     f"distill.output={student_dir}"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-2000:]
    record = json.loads(stdout.strip().splitlines()[-1])
    assert record["layers"] == [1] and record["student"] == str(student_dir) and record["steps"] == 4
    assert record["student_parameters"] < record["teacher_parameters"]
    assert 0 <= record["student_zero_shot_accuracy"] <= 1 and record["distill_s"] > 0
    assert (tmp_path / "out" / "loss_curve.png").stat().st_size > 0
    assert load_causal_lm(str(student_dir), "cpu", "float32").config.num_hidden_layers == 1
    report = json.loads((student_dir / "distill_report.json").read_text())
    assert report["curve"] and report["data_tasks"] == ["other"] and report["data_split"] == "train"
    assert report["data_sources"]["other"]["name"] == "other"  # how it was read: `fedprompt run` re-reads it so


def test_fedprompt_transfer_lifts_a_prompt_and_reports_the_last_step(capsys, post_data, tiny_model_dir, tmp_path):
    prompt_file = save_prompt(SoftPrompt(4, 32, torch.randn(4, 32) * 0.1), tmp_path / "p.safetensors", task="toy")
    code = cli.main(["transfer", *tiny_args(post_data, tiny_model_dir, tmp_path), f"transfer.prompt={prompt_file}",
                     f"transfer.student={tiny_model_dir}", "transfer.public_task=other", "transfer.public_size=8",
                     "transfer.steps=3", "transfer.batch_size=4", "transfer.alpha_limit=6"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-2000:]
    record = json.loads(stdout.strip().splitlines()[-1])
    assert record["steps"] == 3 and len(record["losses"]) == 3 and 0 <= record["alpha"] <= 1
    assert record["public_task"] == "other" and record["public_split"] == "train" and record["public_n"] == 8
    assert 0 <= record["accuracy"] <= 1 and record["n"] == len(CORPUS)
    assert {"zero_shot_accuracy", "student_prompt_accuracy", "chance", "alpha_capped_at_chance"} <= set(record)
    assert record["transfer"]["logits"] == "vocab"  # POST's: the KL over all next-token logits


@pytest.mark.parametrize("command, extra, message", [
    ("distill", ["distill.layers=[0,5]"], "distill.layers [5] out of range: the teacher has 2 layers"),
    ("distill", ["distill.data.tasks=[nosuch]"], "nosuch"),
    ("distill", ["+distill.warmup=3"], "unknown config key 'distill.warmup'"),
    ("distill", ["distill.loss.a_answer=5", "distill.data.format=raw"], "there is none: set format=task"),
    ("transfer", [], "transfer.prompt is required"),
    ("transfer", ["transfer.prompt=/no/such/file"], "does not exist"),
    ("transfer", ["transfer.public_task=toy", "transfer.public_split=train", "transfer.prompt=PROMPT"],
     "is the clients' private data"),
    ("transfer", ["transfer.prompt=WIDE"], "has width 7 but"),
])
def test_bad_input_is_one_line_before_any_model_loads(capsys, monkeypatch, post_data, tiny_model_dir, tmp_path,
                                                      command, extra, message):
    monkeypatch.setattr("fedprompt.models.load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    files = {"PROMPT": save_prompt(SoftPrompt(4, 32), tmp_path / "p.safetensors"),
             "WIDE": save_prompt(SoftPrompt(4, 7), tmp_path / "w.safetensors")}
    extra = [e.split("=")[0] + "=" + str(files.get(e.split("=")[1], e.split("=")[1])) for e in extra]
    code = cli.main([command, *tiny_args(post_data, tiny_model_dir, tmp_path), f"transfer.student={tiny_model_dir}",
                     *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


N = len(CORPUS) + 1  # rows of a split with the leaked sentence


@pytest.mark.parametrize("command, leaked, extra, message", [
    ("transfer", ("other", "train"), ["transfer.public_task=other"],  # public_size 256: all of other's train split
     f"the transfer's public set (other train): 1 of its {N} examples are also in the evaluation set (toy test, "),
    ("transfer", ("toy", "validation"), ["transfer.public_task=other"],  # alpha_split: validation (default)
     f"the alpha set (toy validation): 1 of its {N} examples are also in the evaluation set (toy test, "),
    ("distill", ("other", "train"), ["distill.data.tasks=[other]", "distill.eval_limit=4"],
     f"the distillation text (other train): 1 of its {N} examples are also in the evaluation set (toy test, 4 "),
])
def test_a_learning_set_sharing_a_test_sentence_is_refused_before_any_model_loads(
        capsys, post_data, tiny_model_dir, tmp_path, nothing_expensive, command, leaked, extra, message):
    leak(post_data, *leaked)
    prompt_file = save_prompt(SoftPrompt(4, 32), tmp_path / "p.safetensors", task="toy")
    code = cli.main([command, *tiny_args(post_data, tiny_model_dir, tmp_path), f"transfer.prompt={prompt_file}",
                     f"transfer.student={tiny_model_dir}", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_transfer_under_exclude_drops_the_shared_sentence_and_goes_on(post_data, tiny_model_dir, tmp_path, monkeypatch):
    from fedprompt.commands.post import public_examples
    from fedprompt.data.leakage import content_key
    from fedprompt.methods.post import TransferConfig

    sentence = leak(post_data, "other", "train")
    tcfg = TransferConfig.from_dict({"public_task": "other"})
    toy = cli.load_task_checked(cli.compose([f"data_dir={post_data}", "task=toy"]))
    keys = {content_key(e) for e in toy.split("test")}
    kept, _, _ = public_examples(tcfg, "toy", post_data, 0, keys)
    assert len(kept) == len(CORPUS) and sentence.upper() not in {e.text.strip() for e in kept}

    class Loaded(Exception):
        pass

    monkeypatch.setattr("fedprompt.models.load_causal_lm", lambda *a, **k: (_ for _ in ()).throw(Loaded()))
    prompt_file = save_prompt(SoftPrompt(4, 32), tmp_path / "p.safetensors", task="toy")
    with pytest.raises(Loaded):  # past every check: the model load is next
        cli.main(["transfer", *tiny_args(post_data, tiny_model_dir, tmp_path), f"transfer.prompt={prompt_file}",
                  f"transfer.student={tiny_model_dir}", "transfer.public_task=other",
                  "federation.eval_overlap=exclude"])


def test_a_run_refuses_a_student_distilled_on_its_evaluation_text(post_data, tmp_path):
    from fedprompt.errors import DataError
    from fedprompt.fl.post import check_student_text

    cfg = cli.compose([f"data_dir={post_data}", "task=toy"])  # the run evaluates on toy's test split
    student = tmp_path / "student"
    student.mkdir()
    check_student_text(cfg, str(student))  # no distill_report.json: a student from elsewhere, nothing to check
    report = {"data_tasks": ["other"], "data_split": "train", "data_sources": {"other": {"name": "other"}}}
    (student / "distill_report.json").write_text(json.dumps(report))
    check_student_text(cfg, str(student))  # other's train text is not toy's test text
    leak(post_data, "other", "train")
    with pytest.raises(DataError, match=rf"^the student's distillation text \(other train\): 1 of its {N} examples "
                                        rf"are also in the evaluation set \(test split, {len(CORPUS)} examples\)"):
        check_student_text(cfg, str(student))
    (student / "distill_report.json").write_text(json.dumps({**report, "data_tasks": ["nosuch"]}))
    with pytest.raises(DataError, match=r"distillation text \(nosuch train\), named in .* cannot be read"):
        check_student_text(cfg, str(student))


# --- issue 23: the transfer's KL over the whole next-token distribution (transfer.logits) -------------------------

T = 2.0


@pytest.fixture(scope="module")
def sharp(teacher):
    """The tiny model with its final norm scaled 30x (its random logits are otherwise nearly uniform, and every KL
    ~1e-5), its 1-layer student, and a student prompt: the (student, large) pair of a transfer."""
    import copy

    model = copy.deepcopy(teacher[0]).eval().requires_grad_(False)
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)
    torch.manual_seed(0)
    student = SoftPromptTuner(build_student(model, [1]).eval().requires_grad_(False), teacher[1], SPEC, TrainConfig())
    return student, SoftPromptTuner(model, teacher[1], SPEC, TrainConfig()), SoftPrompt(4, 32, torch.randn(4, 32))


def by_hand(model, tok, prompt, examples) -> torch.Tensor:
    """(N, V) next-token logits at each formatted example's last position, one example at a time (no padding,
    no SoftPrompt module, no logits_to_keep): an independent path to what the transfer reads."""
    rows = []
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([tok(SPEC.format(e), add_special_tokens=True)["input_ids"]])
            embeds = model.get_input_embeddings()(ids)
            if prompt is not None:
                embeds = torch.cat([prompt.weight.detach()[None], embeds], dim=1)
            rows.append(model(inputs_embeds=embeds).logits[0, -1].float())
    return torch.stack(rows)


def kl_by_hand(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over rows of sum_v p_v (log p_v - log q_v), p = softmax(p_logits / T), q = softmax(q_logits / T)."""
    p = torch.softmax(p_logits / T, -1)
    return float((p * (torch.log_softmax(p_logits / T, -1) - torch.log_softmax(q_logits / T, -1))).sum(-1).mean())


def loss_by_hand(student, large, student_prompt, init, public, alpha, columns=None) -> float:
    """POST's mix_transfer loss: T^2 [alpha KL(diff) + (1 - alpha) KL(prompted)], over ``columns`` (None: all)."""
    tok = large.tokenizer
    s_p, s_0 = by_hand(student.model, tok, student_prompt, public), by_hand(student.model, tok, None, public)
    t_p, t_0 = by_hand(large.model, tok, init, public), by_hand(large.model, tok, None, public)
    if columns is not None:
        s_p, s_0, t_p, t_0 = (x[:, columns] for x in (s_p, s_0, t_p, t_0))
    return T**2 * (alpha * kl_by_hand(s_p - s_0, t_p - t_0) + (1 - alpha) * kl_by_hand(s_p, t_p))


@pytest.mark.parametrize("logits", ["vocab", "labels"])
def test_the_first_step_loss_is_posts_formula_by_hand(sharp, logits):
    student, large, student_prompt = sharp
    public = EXAMPLES[:6]  # six distinct texts of different lengths: the transfer's batch is left-padded
    init = SoftPrompt(4, 32, torch.randn(4, 32, generator=torch.Generator().manual_seed(1)) * 0.1)
    columns = None if logits == "vocab" else large.label_ids
    expected = loss_by_hand(student, large, student_prompt, init, public, 0.3, columns)
    # one step over the whole public set: the first loss is taken before the update, on the init prompt
    result = PromptTransfer(student, large, steps=1, batch_size=len(public), lr=0.05, logits=logits).run(
        student_prompt, public, 0.3, init)
    assert result.logits == logits
    assert result.losses[0] == pytest.approx(expected, rel=1e-4)
    other_columns = large.label_ids if columns is None else None
    other = loss_by_hand(student, large, student_prompt, init, public, 0.3, other_columns)
    assert abs(other - expected) > 0.1 * expected  # the two modes compare different distributions


def test_answer_logits_are_the_full_row_and_label_logits_its_columns(sharp):
    student, large, student_prompt = sharp
    ids, mask = large.pad(large.encode(EXAMPLES[:6]))
    full = large.answer_logits(student_prompt, ids, mask)
    assert full.shape == (6, large.model.config.vocab_size) and full.dtype == torch.float32
    torch.testing.assert_close(full, by_hand(large.model, large.tokenizer, student_prompt, EXAMPLES[:6]),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(large.label_logits(student_prompt, ids, mask), full[:, large.label_ids])


def test_labels_mode_is_the_transfer_of_before_issue_23(sharp):
    """The pre-issue-23 loop, written out: label-word logits only, targets fixed first, then the seeded batches."""
    student, large, student_prompt = sharp
    public, steps, batch, lr, alpha, seed = EXAMPLES, 5, 8, 0.05, 0.4, 3
    start = torch.randn(4, 32, generator=torch.Generator().manual_seed(2)) * 0.1
    result = PromptTransfer(student, large, steps=steps, batch_size=batch, lr=lr, logits="labels").run(
        student_prompt, public, alpha, SoftPrompt(4, 32, start), seed=seed)

    encoded = large.encode(public)

    def fixed(tuner, prompt):
        with torch.no_grad():
            return torch.cat([tuner.label_logits(prompt, *tuner.pad(encoded[i : i + batch]))
                              for i in range(0, len(encoded), batch)])

    s_p, s_0, t_0 = fixed(student, student_prompt), fixed(student, None), fixed(large, None)
    prompt = SoftPrompt(4, 32, start)
    optimizer = torch.optim.Adam(prompt.parameters(), lr=lr)
    generator, order, losses = torch.Generator().manual_seed(seed), [], []
    for _ in range(steps):
        if len(order) < batch:
            order += torch.randperm(len(encoded), generator=generator).tolist()
        idx, order = order[:batch], order[batch:]
        out = large.label_logits(prompt, *large.pad([encoded[i] for i in idx]))
        kd = torch.nn.functional.kl_div(torch.log_softmax(out / T, -1), torch.softmax(s_p[idx] / T, -1),
                                        reduction="batchmean")
        diff = torch.nn.functional.kl_div(torch.log_softmax((out - t_0[idx]) / T, -1),
                                          torch.softmax((s_p[idx] - s_0[idx]) / T, -1), reduction="batchmean")
        loss = T**2 * ((1 - alpha) * kd + alpha * diff)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert result.losses == pytest.approx(losses, rel=1e-6, abs=1e-9)
    torch.testing.assert_close(result.prompt.weight, prompt.weight)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_vocab_mode_moves_the_large_prompt_toward_the_students_distribution(sharp, alpha):
    student, large, student_prompt = sharp
    public, tok = EXAMPLES[:6], large.tokenizer
    init = SoftPrompt(4, 32, torch.randn(4, 32, generator=torch.Generator().manual_seed(4)) * 0.1)
    s_p, s_0 = by_hand(student.model, tok, student_prompt, public), by_hand(student.model, tok, None, public)
    t_0 = by_hand(large.model, tok, None, public)
    # POST's objective on the whole public set, by hand: at alpha = 0 the KL from the student's prompted
    # distribution, at alpha = 1 the KL from its prompt's logit shift (the two compete in between)
    def distance(t):
        return alpha * kl_by_hand(s_p - s_0, t - t_0) + (1 - alpha) * kl_by_hand(s_p, t)

    before = distance(by_hand(large.model, tok, init, public))
    result = PromptTransfer(student, large, steps=20, batch_size=8, lr=0.05).run(student_prompt, public, alpha, init)
    after = distance(by_hand(large.model, tok, result.prompt, public))
    assert result.logits == "vocab" and result.losses[-1] < result.losses[0]
    assert after < 0.8 * before, (before, after)


def test_transfer_logits_is_validated_and_defaults_to_vocab():
    from fedprompt.methods.post import TransferConfig

    assert TransferConfig().logits == "vocab" and TransferConfig.from_dict({"logits": "labels"}).logits == "labels"
    assert cli.compose([]).transfer.logits == "vocab"  # conf/transfer/default.yaml
    with pytest.raises(ConfigError, match=r"^transfer.logits='full' is not one of \['vocab', 'labels'\]"):
        TransferConfig.from_dict({"logits": "full"})


def test_the_transfer_refuses_mismatched_models_and_prompts_before_any_step(sharp, monkeypatch):
    import copy

    student, large, student_prompt = sharp
    with pytest.raises(ConfigError, match=r"^transfer.logits='full' is not one of"):
        PromptTransfer(student, large, steps=1, batch_size=4, lr=0.1, logits="full")
    wider = copy.deepcopy(student.model)
    wider.resize_token_embeddings(wider.config.vocab_size + 8)  # same tokenizer and label ids, 8 more logits
    other = SoftPromptTuner(wider, student.tokenizer, SPEC, TrainConfig())
    with pytest.raises(ConfigError, match=r"^the student's output logits span \d+ tokens but the large model's span "
                                          r"\d+: a student must be distilled from the large model"):
        PromptTransfer(other, large, steps=1, batch_size=4, lr=0.1)
    transfer = PromptTransfer(student, large, steps=1, batch_size=4, lr=0.1)
    monkeypatch.setattr(transfer, "_fixed_logits", lambda *a: pytest.fail("a model ran before the checks"))
    with pytest.raises(ConfigError, match=r"^the large model's prompt has width 16 but the large model has hidden "
                                          r"size 32"):
        transfer.run(student_prompt, EXAMPLES, 0.5, SoftPrompt(4, 16))
    with pytest.raises(ConfigError, match=r"^a soft prompt of 600 tokens plus the longest input \(\d+ tokens\) exceeds "
                                          r"the model's context of 512 positions"):
        transfer.run(student_prompt, EXAMPLES, 0.5, SoftPrompt(600, 32))
    with pytest.raises(DataError, match="the public transfer set is empty"):
        transfer.run(student_prompt, [], 0.5, SoftPrompt(4, 32))


def test_a_student_at_chance_gets_alpha_one_and_a_note(sharp, monkeypatch, capsys):
    from types import SimpleNamespace

    from fedprompt.commands.post import transfer_prompt
    from fedprompt.methods.post import TransferConfig

    student, large, student_prompt = sharp

    class Scores:  # the student's prompt scores 0.4 on the alpha set (chance 0.5), the large model 0.7
        def __init__(self, model, *args):
            self.accuracy = 0.7 if model is large.model else 0.4

        def evaluate(self, examples, soft_prompt=None):
            return SimpleNamespace(accuracy=self.accuracy)

    monkeypatch.setattr("fedprompt.models.PromptedClassifier", Scores)
    tcfg = TransferConfig(steps=2, batch_size=4)
    info = transfer_prompt(student, large, student_prompt, SoftPrompt(4, 32), EXAMPLES[:6], tcfg, EXAMPLES[:4],
                           chance=0.5, batch_size=4)
    assert info["result"].alpha == 1.0 and info["alpha_capped_at_chance"] is True
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no better than chance (0.500): alpha = 1 (POST's rule at its cap)" in err[0]
    monkeypatch.setattr(Scores, "__init__",  # now the student's prompt scores 0.9: alpha = (0.7 - 0.5) / (0.9 - 0.5)
                        lambda self, model, *a: setattr(self, "accuracy", 0.7 if model is large.model else 0.9))
    info = transfer_prompt(student, large, student_prompt, SoftPrompt(4, 32), EXAMPLES[:6], tcfg, EXAMPLES[:4],
                           chance=0.5, batch_size=4)
    assert info["result"].alpha == pytest.approx(0.5) and info["alpha_capped_at_chance"] is False
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def other_vocab_dir(tmp_path_factory):
    """A tiny model like tiny_model_dir but with a smaller vocabulary (another tokenizer)."""
    from tests.conftest import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-280"), vocab_size=280)


@pytest.fixture
def shuffled_tokenizer_dir(tiny_model_dir, tmp_path):
    """tiny_model_dir with two tokens' ids swapped in its tokenizer: the same vocabulary size, another tokenizer."""
    import shutil

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "shuffled"))
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder


@pytest.mark.parametrize("student, message", [
    ("OTHER", "has vocab_size 280 but"),
    ("SHUFFLED", "has another tokenizer than"),
])
def test_a_student_with_another_vocabulary_is_one_line_before_any_model_loads(
        capsys, post_data, tiny_model_dir, tmp_path, nothing_expensive, other_vocab_dir, shuffled_tokenizer_dir,
        student, message):
    folder = {"OTHER": other_vocab_dir, "SHUFFLED": shuffled_tokenizer_dir}[student]
    prompt_file = save_prompt(SoftPrompt(4, 32), tmp_path / "p.safetensors", task="toy")
    code = cli.main(["transfer", *tiny_args(post_data, tiny_model_dir, tmp_path), f"transfer.prompt={prompt_file}",
                     f"transfer.student={folder}", "transfer.public_task=other"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "a student must be distilled from the large model" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    (["transfer.logits=full"], "transfer.logits='full' is not one of ['vocab', 'labels']"),
    (["transfer.prompt=LONG"], "a soft prompt of 600 tokens plus the longest input"),
    # an empty split file is refused when read ("no rows"); a set can still be emptied by eval_overlap=exclude
    (["transfer.public_task=other", "federation.eval_overlap=exclude", "COPY=other/train"],
     "the public transfer set (other train) is empty"),
    (["transfer.public_task=other", "federation.eval_overlap=exclude", "COPY=toy/validation"],
     "the alpha set (toy validation) is empty"),
])
def test_more_bad_transfer_input_is_one_line_before_any_model_loads(capsys, post_data, tiny_model_dir, tmp_path,
                                                                   nothing_expensive, extra, message):
    for e in [e for e in extra if e.startswith("COPY=")]:  # that split becomes toy's test split: all excluded
        (post_data / f"{e[5:]}.jsonl").write_text((post_data / "toy" / "test.jsonl").read_text())
    extra = [e for e in extra if not e.startswith("COPY=")]
    files = {"PROMPT": save_prompt(SoftPrompt(4, 32), tmp_path / "p.safetensors"),
             "LONG": save_prompt(SoftPrompt(600, 32), tmp_path / "long.safetensors")}
    extra = [e.split("=")[0] + "=" + str(files.get(e.split("=")[1], e.split("=")[1])) for e in extra]
    base = [f"transfer.prompt={files['PROMPT']}", f"transfer.student={tiny_model_dir}"]
    base = [b for b in base if b.split("=")[0] not in {e.split("=")[0] for e in extra}]
    code = cli.main(["transfer", *tiny_args(post_data, tiny_model_dir, tmp_path), *base, *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
