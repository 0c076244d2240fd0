"""Offline distillation (the teacher's top-k outputs cached on disk), distillation checkpoints and resume, and the
refusals of distillation text from the tuned task (`fedprompt distill`, `fedprompt run method=post`)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fedprompt import cli
from fedprompt.errors import ConfigError, DataError
from fedprompt.models import load_causal_lm, load_tokenizer
from fedprompt.models.distill import (
    CHECKPOINT_DIR,
    DistillCheckpoint,
    DistillConfig,
    DistillLossWeights,
    TeacherCacheConfig,
    _softened_kl,
    build_student,
    distill,
    distill_loss,
    distill_settings,
    loss_positions,
)
from fedprompt.models.teacher_cache import build_teacher_cache, cache_key, topk_kl
from fedprompt.typed_config import from_node
from tests.conftest import CORPUS
from tests.fl_support import write_secret_task
from tests.test_post_distill_transfer import post_data, tiny_args  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir), "cpu", "float32"), load_tokenizer(str(tiny_model_dir))


def test_topk_kl_is_the_full_kl_at_the_vocabulary_and_the_k_plus_tail_kl_below_it():
    torch.manual_seed(0)
    s, t = torch.randn(5, 11) * 3, torch.randn(5, 11) * 3
    temp = 2.0
    logp = torch.log_softmax(t / temp, -1)
    full = _softened_kl(s, t, temp)
    values, ids = logp.topk(11, -1)
    no_tail = torch.full((5,), float("-inf"))
    torch.testing.assert_close(topk_kl(s, values, ids, no_tail, temp), full, rtol=1e-6, atol=1e-6)
    # k = 3: the KL between the two distributions over {the teacher's 3 ids, any other id}, by hand.
    values, ids = logp.topk(3, -1)
    tail = torch.log1p(-values.exp().sum(-1))
    got = topk_kl(s, values, ids, tail, temp)
    q = torch.softmax(s / temp, -1)
    q3 = q.gather(-1, ids)
    p3 = values.exp()
    p = torch.cat([p3, 1 - p3.sum(-1, keepdim=True)], -1)
    qq = torch.cat([q3, 1 - q3.sum(-1, keepdim=True)], -1)
    by_hand = (p * (p.log() - qq.log())).sum(-1).mean() * temp**2
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-6)
    assert 0 < float(got) < float(full)
    # Gradients stay finite with an empty tail (k = vocabulary).
    s.requires_grad_(True)
    values, ids = logp.topk(11, -1)
    topk_kl(s, values, ids, no_tail, temp).backward()
    assert torch.isfinite(s.grad).all()


def _key(tok_name, texts, **over):
    args = dict(teacher_name=tok_name, teacher_dtype="float32", texts=texts, max_length=64, top_k=8, temperature=2.0,
                hidden=True, hidden_dtype="float32")
    return cache_key(**{**args, **over})


def test_cached_distillation_at_the_vocabulary_equals_online_on_the_first_step(teacher, tiny_model_dir, tmp_path):
    model, tok = teacher
    vocab = model.get_output_embeddings().weight.shape[0]
    config = DistillConfig(steps=1, batch_size=4, lr=3e-3, autocast=False,
                           loss=DistillLossWeights(a_answer=1.0))  # every term, the answer position's KL included
    cache, info = build_teacher_cache(model, tok, CORPUS, tmp_path / "cache",
                                      _key(str(tiny_model_dir), CORPUS, top_k=vocab), batch_size=3)
    assert info["reused"] is False and info["bytes"] > 0
    online, cached = build_student(model, [1]), build_student(model, [1])
    a = distill(model, online, tok, CORPUS, config, log_every=1)
    b = distill(None, cached, tok, CORPUS, config, log_every=1, cache=cache)  # the teacher is not needed
    for part in ("loss", "kl", "lm", "cos", "answer"):
        assert b.curve[0][part] == pytest.approx(a.curve[0][part], rel=1e-5, abs=1e-6), part
    for (name, p), q in zip(online.named_parameters(), cached.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)
    # A top-k below the vocabulary is another (smaller) KL; float16 hidden states change the cosine only slightly.
    small, _ = build_teacher_cache(model, tok, CORPUS, tmp_path / "cache",
                                   _key(str(tiny_model_dir), CORPUS, top_k=5, hidden_dtype="float16"), batch_size=3)
    c = distill(None, build_student(model, [1]), tok, CORPUS, config, log_every=1, cache=small)
    assert c.curve[0]["kl"] < a.curve[0]["kl"]
    assert c.curve[0]["cos"] == pytest.approx(a.curve[0]["cos"], rel=1e-2, abs=1e-4)
    # The cache holds probabilities at its temperature: another loss temperature is refused.
    with pytest.raises(ConfigError, match="at T=2.0, the loss uses T=1.0"):
        distill(None, build_student(model, [1]), tok, CORPUS,
                DistillConfig(steps=1, loss=DistillLossWeights(temperature=1.0)), cache=cache)


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_loss_at_drawn_positions_is_the_loss_of_those_positions(teacher, tiny_model_dir, tmp_path, side,
                                                                   monkeypatch):
    model, tok = teacher
    monkeypatch.setattr(tok, "padding_side", side)  # the fixture's tokenizer is shared by the module
    texts = CORPUS[:4]
    vocab = model.get_output_embeddings().weight.shape[0]
    weights = DistillLossWeights(a_answer=1.0)
    cache, _ = build_teacher_cache(model, tok, texts, tmp_path / "cache", _key(str(tiny_model_dir), texts, top_k=vocab),
                                   batch_size=4)
    enc = tok(texts, return_tensors="pt", padding=True)
    mask, length = enc.attention_mask, enc.attention_mask.shape[1]
    keep = loss_positions(mask, 0.3, torch.Generator().manual_seed(0))
    last = [int(row.nonzero().max()) for row in mask]
    assert set(last) <= set(keep.tolist()) and len(keep) < length and keep.tolist() == sorted(set(keep.tolist()))
    assert loss_positions(mask, 1.0, torch.Generator()) is None
    student = build_student(model, [1])
    args = dict(input_ids=enc.input_ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        full_s, full_t = student(**args), model(**args)
        part_s, part_t = student(**args, logits_to_keep=keep), model(**args, logits_to_keep=keep)
    torch.testing.assert_close(part_s.logits, full_s.logits[:, keep])
    targets = cache.targets(texts, mask.sum(1).tolist(), "cpu")
    # Every position kept is the loss without keep, online and cached.
    every = torch.arange(length)
    for cached, t_out in ((None, full_t), (targets, None)):
        assert distill_loss(full_s, t_out, enc.input_ids, mask, weights, cached, every)[1] == \
               pytest.approx(distill_loss(full_s, t_out, enc.input_ids, mask, weights, cached)[1])
    # The drawn positions' KL and LM, by hand from the full logits; the cached (top-k = vocabulary) loss agrees.
    kept = mask.bool()[:, keep]
    _, online = distill_loss(part_s, part_t, enc.input_ids, mask, weights, None, keep)
    _, offline = distill_loss(part_s, None, enc.input_ids, mask, weights, targets, keep)
    kl = _softened_kl(full_s.logits[:, keep][kept], full_t.logits[:, keep][kept], 2.0)
    nxt = keep[keep + 1 < length]
    pairs = mask.bool()[:, nxt] & mask.bool()[:, nxt + 1]
    lm = torch.nn.functional.cross_entropy(full_s.logits[:, nxt][pairs], enc.input_ids[:, nxt + 1][pairs])
    rows = torch.tensor(last)
    answer = _softened_kl(full_s.logits[torch.arange(4), rows], full_t.logits[torch.arange(4), rows], 2.0)
    assert online["kl"] == pytest.approx(float(kl), rel=1e-5) and online["lm"] == pytest.approx(float(lm), rel=1e-5)
    assert online["answer"] == pytest.approx(float(answer), rel=1e-5)
    for part in ("kl", "lm", "cos", "answer"):
        assert offline[part] == pytest.approx(online[part], rel=1e-4, abs=1e-6), part


def test_the_cache_is_reused_for_the_same_settings_and_recomputed_for_another(teacher, tiny_model_dir, tmp_path):
    model, tok = teacher
    root = tmp_path / "cache"
    key = _key(str(tiny_model_dir), CORPUS)
    first, info = build_teacher_cache(model, tok, CORPUS, root, key, batch_size=4)
    again, info2 = build_teacher_cache(model, tok, list(reversed(CORPUS)), root,  # another order: the same set
                                       _key(str(tiny_model_dir), list(reversed(CORPUS))), batch_size=4)
    assert info["reused"] is False and info2["reused"] is True and again.folder == first.folder
    changed = {"top_k": dict(top_k=4), "max_length": dict(max_length=80), "texts": dict(texts=CORPUS[:-1]),
               "temperature": dict(temperature=1.0), "hidden": dict(hidden=False), "teacher": dict(teacher_name="other")}
    folders = {first.folder}
    for name, over in changed.items():
        texts = over.pop("texts", CORPUS)
        cache, facts = build_teacher_cache(model, tok, texts, root, _key(str(tiny_model_dir), texts, **over),
                                           batch_size=4)
        assert facts["reused"] is False and cache.folder not in folders, name
        folders.add(cache.folder)
    no_hidden = build_teacher_cache(model, tok, CORPUS, root, _key(str(tiny_model_dir), CORPUS, hidden=False), 4)[0]
    assert no_hidden.hidden is None and not (no_hidden.folder / "hidden.npy").exists()
    assert not list(root.glob("*.partial"))  # complete caches only


@pytest.mark.parametrize("fraction", [1.0, 0.3])
def test_resume_from_a_checkpoint_gives_the_uninterrupted_result(teacher, tmp_path, fraction):
    model, tok = teacher
    # 11 texts, 3 a batch: the 8th step draws a new permutation after the resume (the generator's state is restored;
    # with fraction < 1 it draws the loss positions too).
    config = DistillConfig(steps=8, batch_size=3, lr=3e-3, autocast=False, loss_positions=fraction)
    settings = distill_settings(config, CORPUS, teacher="tiny", layers=[1])
    whole = build_student(model, [1])
    full = distill(model, whole, tok, CORPUS, config, log_every=1)

    class Stop(Exception):
        pass

    def stop_at_5(step, row):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        distill(model, build_student(model, [1]), tok, CORPUS, config, log_every=1, progress=stop_at_5,
                checkpoint=DistillCheckpoint(tmp_path, 2, settings))
    checkpoint = DistillCheckpoint(tmp_path, 2, settings)
    assert checkpoint.check() == 4  # the last checkpoint before the stop
    resumed = build_student(model, [1])
    report = distill(model, resumed, tok, CORPUS, config, log_every=1, checkpoint=checkpoint)
    assert report.resumed_from == 4 and report.steps == 8
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in report.curve] == \
           [{k: v for k, v in r.items() if k != "seconds"} for r in full.curve]
    # Another setting is refused in one line that says what differs and how to start over.
    other = DistillCheckpoint(tmp_path, 2, distill_settings(DistillConfig(steps=8, batch_size=3, lr=1e-3, autocast=False,
                                                                          loss_positions=fraction),
                                                            CORPUS, teacher="tiny", layers=[1]))
    with pytest.raises(ConfigError, match=r"made with other settings \(lr 0.003 -> 0.001\).*delete .*distill_checkpoint"):
        other.check()
    # Output and evaluation keys are not settings: changing them still resumes.
    same = distill_settings(DistillConfig(steps=8, batch_size=3, lr=3e-3, autocast=False, eval_limit=7, output="x",
                                          loss_positions=fraction,
                                          checkpoint_every=3, teacher_cache=TeacherCacheConfig(dir="/elsewhere")),
                            CORPUS, teacher="tiny", layers=[1])
    assert DistillCheckpoint(tmp_path, 3, same).check() == 6  # the resumed run checkpointed step 6 too


@pytest.mark.parametrize("node, message", [
    ({"teacher_cache": {"top_k": 0}}, "distill.teacher_cache.top_k must be >= 1"),
    ({"teacher_cache": {"hidden_dtype": "int8"}}, "hidden_dtype='int8' is not one of"),
    ({"teacher_cache": {"topk": 3}}, "unknown config key 'distill.teacher_cache.topk'.*did you mean 'distill.teacher_cache.top_k'"),
    ({"checkpoint_every": -1}, "distill.checkpoint_every must be >= 0"),
    ({"loss_positions": 0}, "distill.loss_positions must be in (0, 1]"),
    ({"loss_positions": 1.5}, "distill.loss_positions must be in (0, 1]"),
])
def test_the_cache_and_checkpoint_settings_are_checked(node, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        from_node(DistillConfig, node, "distill")


def test_fedprompt_distill_caches_the_teacher_resumes_and_records_its_text(capsys, post_data, tiny_model_dir,  # noqa: F811
                                                                             tmp_path):
    student_dir = tmp_path / "student"
    args = ["distill", *tiny_args(post_data, tiny_model_dir, tmp_path), "distill.layers=[1]", "distill.steps=4",
            "distill.batch_size=4", "distill.data.tasks=[other]", "distill.eval_limit=4", f"distill.output={student_dir}",
            "distill.checkpoint_every=2", "distill.teacher_cache.top_k=16"]
    assert cli.main(args) == 0, capsys.readouterr().err[-2000:]
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cache = record["teacher_cache"]
    assert cache["reused"] is False and cache["top_k"] == 16
    assert cache["folder"].startswith(str(tmp_path / "student.teacher_cache"))  # next to the student, not in it
    assert not (student_dir / CHECKPOINT_DIR).exists()  # removed once the student is saved
    meta = json.loads((student_dir / "config.json").read_text())["fedprompt_student"]
    assert meta["distill_data"] == {"tasks": ["other"], "split": "train"}
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["teacher_cache"]["reused"] is True


def test_fedprompt_distill_refuses_the_tuned_task_and_another_checkpoint_before_any_model_loads(
        capsys, monkeypatch, post_data, tiny_model_dir, tmp_path):  # noqa: F811
    monkeypatch.setattr("fedprompt.models.load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    base = ["distill", *tiny_args(post_data, tiny_model_dir, tmp_path), "distill.layers=[1]", "distill.eval_limit=4",
            f"distill.output={tmp_path / 'student'}"]
    assert cli.main([*base, "distill.data.tasks=[toy,other]"]) == 2
    err = capsys.readouterr().err
    assert ("distill.data.tasks ['toy', 'other'] includes toy, the task this student is for (task=toy): its train "
            "text is the clients' private data; list other tasks, e.g. distill.data.tasks=[other]") in err, err
    assert len(err.strip().splitlines()) == 1
    # A checkpoint of another distillation (here: other steps) in the output folder is refused, not overwritten.
    folder = tmp_path / "student" / CHECKPOINT_DIR
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"")
    settings = {"steps": 999}
    (folder / "settings.json").write_text(json.dumps({"step": 2, "settings": settings}))
    assert cli.main([*base, "distill.data.tasks=[other]"]) == 2
    err = capsys.readouterr().err
    assert "holds a distillation checkpoint (step 2) made with other settings (" in err and "steps 999 -> 150" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_post_run_refuses_a_student_distilled_on_its_tasks_train_split(capsys, tmp_path, tiny_model_dir,
                                                                        nothing_expensive):
    from fedprompt.methods.post.student import check_student_not_distilled_on
    from tests.test_post_fl import post_overrides

    student = tmp_path / "student"
    shutil.copytree(tiny_model_dir, student)
    config = json.loads((student / "config.json").read_text())

    def distilled_on(tasks, split, where="config"):
        (student / "distill_report.json").unlink(missing_ok=True)
        meta = {k: v for k, v in config.items() if k != "fedprompt_student"}
        if where == "config":
            meta["fedprompt_student"] = {"layers": [1], "distill_data": {"tasks": tasks, "split": split}}
        else:  # a student from before the config recorded it: its report says
            (student / "distill_report.json").write_text(json.dumps({"data_tasks": tasks, "data_split": split}))
        (student / "config.json").write_text(json.dumps(meta))

    distilled_on(["rte", "secret"], "train")
    code = cli.main(["run", *post_overrides(write_secret_task(tmp_path / "data"), student,
                                            f"output_dir={tmp_path / 'run'}")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"the student at {student} was distilled on secret's train split, the clients' training text" in err
    assert "fedprompt distill task=secret distill.data.tasks=[rte] distill.output=<folder>" in err
    distilled_on(["secret"], "train", where="report")
    with pytest.raises(DataError, match="distilled on secret's train split.*distill_report.json"):
        check_student_not_distilled_on("secret", str(student))
    distilled_on(["secret"], "validation")  # not the clients' text (its evaluation overlap is checked by content)
    check_student_not_distilled_on("secret", str(student))
    distilled_on(["rte", "trec"], "train")
    check_student_not_distilled_on("secret", str(student))
    check_student_not_distilled_on("secret", str(tiny_model_dir))  # no record: a model from elsewhere
