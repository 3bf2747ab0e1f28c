"""benchmarks/squeeze_release.py's accuracy rule and its cross-validation folds: the selection never sees the test
split, the folds cut the same pool, and on one split the rule is ``fp.squeeze_release``'s own choice."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
pytest.importorskip("sklearn", reason="the digits data come from scikit-learn")
import squeeze_release as sr  # noqa: E402


def test_folds_cut_one_pool_and_keep_the_test_split():
    from sklearn.datasets import load_digits

    _, y = load_digits(return_X_y=True)
    fixed = sr.digits_indices(y, 3)
    folds = [sr.digits_indices(y, 3, folds=4, fold=k) for k in range(4)]
    pool = set(fixed["train"]) | set(fixed["val"])
    vals = [set(f["val"]) for f in folds]
    assert set().union(*vals) == pool and sum(map(len, vals)) == len(pool)  # the folds' validation parts cut the pool
    for f in folds:
        assert set(f["test"]) == set(fixed["test"])  # the same test images
        assert set(f["train"]) | set(f["val"]) == pool and not set(f["train"]) & set(f["val"])
        assert min(torch.bincount(torch.tensor(y[f["val"]]), minlength=10).tolist()) >= 8  # stratified
    data = sr.load("digits", 3, folds=4, fold=1)
    assert len(data["x_val"]) == len(folds[1]["val"]) and len(data["x_test"]) == len(fixed["test"])


def test_mnist1d_fold_split_matches_the_fixed_split():
    pytest.importorskip("mnist1d", reason="MNIST-1D's generator")
    fixed = sr.load("mnist1d", 0)
    first = sr.load("mnist1d", 0, folds=5, fold=0)  # five folds, the first for validation: the fixed split
    for k in fixed:
        assert torch.equal(fixed[k], first[k]), k


def cand(params: int, val: float, test: float = 0.0) -> dict:
    return dict(params=params, val=val, test=test, label="")


def test_select_takes_the_smallest_within_the_mean_budget():
    # one split: dense 0.95; candidates within 0.01 at 500 and 300 params, one below the budget at 100
    one = [cand(1000, 0.95), cand(500, 0.945), cand(100, 0.90), cand(300, 0.941)]
    assert sr.select([one], 0.01) == 3
    assert sr.select([one], 0.001) == 0  # none within: the dense model
    # two folds: candidate 2 fails on the mean (0.90 and 0.96 -> 0.93 < 0.94) though one fold alone passes
    other = [cand(1000, 0.95), cand(480, 0.95), cand(120, 0.96), cand(700, 0.95)]
    assert sr.select([one, other], 0.01) == 1  # candidate 3's mean params (500) are not below candidate 1's (490)
    assert sr.select([one, other], 0.06) == 2
    # the test accuracies never move the choice
    shuffled = [[dict(c, test=t) for c, t in zip(one, (0.1, 0.9, 0.99, 0.0))]]
    assert sr.select(shuffled, 0.01) == sr.select([one], 0.01)


def test_tuned_rows_reapply_the_rule_with_each_cycles_fine_tuned_model():
    # cycle 1 kept its minimized model (0.95 on validation); its fine-tuned one (0.93) is outside the budget, so with
    # the fine-tuned models kept the rule picks cycle 2 (its fine-tuned model was the one kept anyway)
    curve = [dict(cand(1000, 0.95, 0.97), label="dense"),
             dict(cand(100, 0.95, 0.90), label="cycle 1", minimized=[0.95, 0.90], tuned=[0.93, 0.96]),
             dict(cand(200, 0.945, 0.96), label="cycle 2", minimized=[0.90, 0.80], tuned=[0.945, 0.96])]
    run = dict(seed=0, params_dense=1000)
    groups = {("convnext", "digits", "squeeze-release"): [(run, dict(curves=[curve], picked="cycle 1"))]}
    [row] = sr.tuned_rows(groups)
    assert row["kept_compression"] == pytest.approx(10.0) and row["kept_drop"] == pytest.approx(7.0)
    assert row["tuned_compression"] == pytest.approx(5.0) and row["tuned_drop"] == pytest.approx(1.0)
    assert sr.tuned_curve(curve)[1]["val"] == 0.93 and curve[1]["val"] == 0.95  # a copy: the record is unchanged
    bad = {k: [(run, dict(curves=[curve], picked="cycle 2"))] for k in groups}
    with pytest.raises(ValueError, match="recorded pick"):
        sr.tuned_rows(bad)  # a file whose pick the rule does not reproduce (another tolerance) is refused
    assert sr.tuned_rows({k: [(run, dict(picked="cycle 1"))] for k in groups}) == []  # older files: no curves


def test_frontier_is_the_best_test_accuracy_at_the_target_over_every_recorded_candidate(tmp_path, capsys):
    import json

    # FC's target is 39x: of 1000 dense parameters, candidates of 25 or fewer count
    dense = dict(cand(1000, 0.60, 0.63), label="dense")
    curve = [dense, dict(cand(20, 0.50, 0.61), label="cycle 1", minimized=[0.50, 0.61], tuned=[0.49, 0.625]),
             dict(cand(30, 0.62, 0.63), label="cycle 2")]  # 33x: under the target, however accurate
    gradual = [dense, dict(cand(25, 0.55, 0.60), label="step 1")]
    run = dict(benchmark="squeeze_release", model="fc", dataset="mnist1d", seed=4, folds=1, params_dense=1000,
               methods={"squeeze-release": dict(curves=[curve]), "gradual": dict(curves=[gradual])})
    folded = dict(run, folds=4, methods={"gradual": dict(curves=[[dense, cand(10, 0.6, 0.64)]])})  # not fixed-split
    for i, r in enumerate((run, folded)):
        (tmp_path / f"r{i}.json").write_text("a table\n" + json.dumps(r) + "\n")
    out = sr.frontier([str(tmp_path / "r0.json"), str(tmp_path / "r1.json")])
    [row] = out["rows"]
    assert (row["seed"], row["runs"], row["at_target"]) == (4, 1, 3)  # cycle 1's minimized and tuned; step 1
    assert row["drop"] == pytest.approx(0.5) and row["compression"] == pytest.approx(50.0)  # cycle 1's fine-tuned
    assert "+0.50 | 50.0x" in capsys.readouterr().out


def tiny(distill: float = 0.0, schedule: str = "constant") -> tuple[sr.Trainer, torch.nn.Module]:
    """A ConvNeXt-style MNIST-1D model and a trainer on 16 random samples (two batches of 8 per epoch)."""
    torch.manual_seed(0)
    model, sample = sr.build("convnext", "mnist1d")
    data = {f"{k}_{s}": v for s in ("train", "val", "test") for k, v in
            (("x", torch.randn(16, 40)), ("y", torch.randint(0, 10, (16,))))}
    recipe = sr.Recipe(epochs=2, dense_epochs=1, lr=1e-3, batch=8, schedule=schedule, distill=distill)
    return sr.Trainer(data, sample, recipe, seed=0), model


def learning_rates(trainer: sr.Trainer, model: torch.nn.Module, **kw) -> list[float]:
    """The learning rate of every optimizer step of one ``train`` call."""
    seen, real_step = [], torch.optim.Adam.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    torch.optim.Adam.step = step
    try:
        trainer.train(model, **kw)
    finally:
        torch.optim.Adam.step = real_step
    return seen


def test_cosine_schedule_decays_within_a_call_and_never_for_the_dense_model():
    trainer, model = tiny(schedule="cosine")
    cosine = learning_rates(trainer, model)
    assert len(cosine) == 4 and cosine[0] == 1e-3 and cosine[-1] < 2e-4
    assert all(a > b for a, b in zip(cosine, cosine[1:]))
    assert set(learning_rates(trainer, model, schedule="constant")) == {1e-3}  # how run_split trains the dense model
    trainer, model = tiny(schedule="constant")
    assert set(learning_rates(trainer, model)) == {1e-3}


def test_fine_tuning_knobs_leave_the_dense_model_to_the_recipe():
    """--lr, --batch and --weight-decay are the fine-tuning calls' (AdamW with the decay); the dense model, the
    reference every drop is measured from, trains at the recipe's learning rate and batch with plain Adam."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    trainer, model = tiny()
    trainer.recipe = sr.dataclasses.replace(trainer.recipe, tune_lr=5e-3, tune_batch=16, weight_decay=0.01)
    seen = []
    handle = register_optimizer_step_pre_hook(  # (a global hook: no optimizer class is patched)
        lambda opt, args, kwargs: seen.append((type(opt).__name__, opt.param_groups[0]["lr"],
                                               opt.param_groups[0]["weight_decay"])))
    try:
        trainer.train(model)
        tuned = list(seen)
        seen.clear()
        trainer.train(model, 1, schedule="constant", dense=True)
    finally:
        handle.remove()
    assert tuned == [("AdamW", 5e-3, 0.01)] * 2  # 2 epochs of one batch of 16
    assert seen == [("Adam", 1e-3, 0)] * 2  # 1 epoch of two batches of 8


def test_distillation_pulls_towards_the_teacher_logits():
    # a teacher that disagrees with the labels: trained on it alone (distill=1), the model ends closer to it than
    # trained on the labels alone (distill=0); no group lasso is attached
    def kl_to_teacher(distill: float) -> float:
        trainer, model = tiny(distill=distill)
        trainer.teacher = torch.randn(16, 10, generator=torch.Generator().manual_seed(1)) * 3
        trainer.train(model, epochs=30)
        with torch.no_grad():
            out = model.eval()(trainer.inputs("train"))
        return float(torch.nn.functional.kl_div(out.log_softmax(-1), trainer.teacher.log_softmax(-1), log_target=True,
                                                reduction="batchmean"))

    assert kl_to_teacher(1.0) < 0.5 * kl_to_teacher(0.0)


def test_the_benchmark_holds_no_regularizer_or_parameter_list_of_its_own():
    """The structure comes from fp.squeeze_release's group lasso: the script keeps only the user's side of a recipe."""
    import inspect

    src = inspect.getsource(sr)
    for gone in ("class GroupLasso", "def stream_slices", "def zero_small_scales", "scale_tau", "penalty()"):
        assert gone not in src, gone
    assert "lasso=trainer.recipe.lasso" in src  # the cycle gets the recipe's strength (the library default)
    assert sr.Recipe(epochs=1, dense_epochs=1, lr=1e-3).lasso == sr.fp.interop.lasso.DEFAULT_STRENGTH
