"""sppo eval: the statistics against hand values and an exact fit, a model against itself, reused responses,
rule:math accuracy, and the report built from the manifests."""

import json
import math

import numpy as np
import pytest
from conftest import finished_output, run_cli, write_jsonl
from datasets import Dataset

from sppo_cli import metrics
from sppo_cli.config import EvalConfig, GenerateConfig
from sppo_cli.data import load_stage
from sppo_cli.errors import SppoError
from sppo_cli.eval import evaluate
from sppo_cli.generate import generate

SAMPLING = dict(max_new_tokens=6, backend="transformers", batch_size=4, shard_size=2, seed=5)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ---- statistics -----------------------------------------------------------------------------------------------------


def test_mean_interval_is_the_normal_approximation_over_prompts():
    low, high = metrics.mean_interval(np.array([0.0, 1.0, 0.5, 0.5]))
    half = 1.959964 * math.sqrt(1 / 6) / 2  # sd (ddof=1) of the four values is sqrt(1/6)
    assert (low, high) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert metrics.mean_interval(np.array([0.7])) == (0.7, 0.7)
    assert metrics.mean_interval(np.array([1.0, 1.0, 0.9]))[1] == 1.0  # clipped to [0, 1]


def test_wilson_interval_against_its_formula():
    low, high = metrics.wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # the textbook value for 5 of 10
    low, high = metrics.wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)


def judged_by_length(difference: np.ndarray, theta: float, phi: float) -> np.ndarray:
    """A judge's soft labels that follow the fitted model exactly: its answer at zero difference is sigmoid(theta)."""
    return 1 / (1 + np.exp(-(theta + phi * np.tanh(difference / difference.std(ddof=1)))))


def test_length_controlled_win_rate_recovers_the_judge_s_preference_at_equal_length():
    rng = np.random.default_rng(0)
    baseline = rng.integers(50, 300, size=2000).astype(float)
    difference = rng.normal(0, 30, size=2000)
    judgements = judged_by_length(difference, 0.3, 2.0)
    lc = metrics.length_controlled_win_rate(judgements, baseline + difference, baseline)
    assert lc == pytest.approx(sigmoid(0.3), abs=2e-3)  # the maximum-likelihood answer, barely moved by the penalty
    longer = rng.normal(40, 30, size=2000)  # now the model is mostly longer, and the judge likes length
    judgements = judged_by_length(longer, 0.3, 2.0)
    lc = metrics.length_controlled_win_rate(judgements, baseline + longer, baseline)
    assert judgements.mean() > sigmoid(0.3) + 0.1 and lc == pytest.approx(sigmoid(0.3), abs=0.02)


def test_a_judge_that_ignores_length_keeps_its_win_rate_when_the_model_is_always_much_longer():
    rng = np.random.default_rng(1)
    baseline = rng.integers(50, 300, size=800).astype(float)
    for seed in range(5):  # tanh(d / sd) is 1 everywhere: the data cannot tell length from skill, the penalty decides
        judgements = np.random.default_rng(seed).binomial(1, 0.55, size=800).astype(float)
        lc = metrics.length_controlled_win_rate(judgements, baseline + rng.normal(300, 50, size=800), baseline)
        assert lc == pytest.approx(judgements.mean(), abs=0.01)


def test_length_controlled_win_rate_at_equal_lengths_is_the_win_rate_and_a_sweep_stays_finite():
    judgements = np.array([1.0, 0.0, 1.0, 0.5, 1.0])
    same = np.full(5, 100.0)
    assert metrics.length_controlled_win_rate(judgements, same, same) == pytest.approx(0.7, abs=1e-8)
    assert metrics.length_controlled_win_rate(np.ones(5), same + 1, same) == pytest.approx(1.0, abs=1e-6)


# ---- the stage ------------------------------------------------------------------------------------------------------


@pytest.fixture
def prompts(tmp_path):
    rows = [{"prompt": f"What is {a} plus {a}?", "answer": str(2 * a)} for a in range(5)]
    return write_jsonl(tmp_path / "heldout.jsonl", rows)


def test_a_model_judged_against_itself_with_the_same_seed_scores_exactly_one_half(tmp_path, tiny_model, tiny_pairrm,
                                                                                  prompts):  # fmt: skip
    config = EvalConfig(num_samples=2, ranker=str(tiny_pairrm), **SAMPLING)
    manifest, done = evaluate(str(tiny_model), str(tiny_model), str(prompts), tmp_path / "e", config)
    m = manifest["metrics"]
    assert not done and m["win_rate"] == 0.5 and m["win_rate_ci"] == [0.5, 0.5] and m["lc_win_rate"] == 0.5
    assert m["ties"] == 10 and manifest["comparisons"] == 10
    evaluated = load_stage(tmp_path / "e")[0]
    assert evaluated["responses"] == evaluated["baseline_responses"]
    assert m["mean_length"] == m["baseline_mean_length"] == np.mean(evaluated["response_tokens"])


def test_judgements_are_the_ranker_s_probabilities_of_the_i_th_pairs_on_reused_responses(
        tmp_path, tiny_model, other_tiny_model, prompts):  # fmt: skip
    baseline = tmp_path / "baseline"
    generate(str(other_tiny_model), str(prompts), baseline, GenerateConfig(num_samples=3, **SAMPLING))
    config = EvalConfig(num_samples=2, ranker="python:plugin_rankers:by_length", **SAMPLING)
    manifest, _ = evaluate(str(tiny_model), str(baseline), None, tmp_path / "e", config)  # prompts from the baseline
    evaluated = load_stage(tmp_path / "e")[0]
    sampled = load_stage(baseline)[0]
    assert evaluated["baseline_responses"] == [row[:2] for row in sampled["responses"]]  # reused, not resampled
    expected = [[sigmoid(len(m) - len(b)) for m, b in zip(mine, theirs)]
                for mine, theirs in zip(evaluated["responses"], evaluated["baseline_responses"])]  # fmt: skip
    assert np.allclose(evaluated["judgements"], expected, atol=1e-12)
    assert manifest["metrics"]["win_rate"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert manifest["identity"]["inputs"]["baseline"].startswith("sha256:")


def test_rule_math_accuracy_and_its_wilson_interval_over_prompts(tmp_path):
    def side(name, responses):
        rows = [{"prompt": f"q{i}", "answer": str(i), "prompt_text": f"Q{i}", "responses": r,
                 "response_tokens": [len(x) for x in r]} for i, r in enumerate(responses)]  # fmt: skip
        # no `conversation` column: outputs made before conversations are read as one user turn per prompt
        return finished_output(Dataset.from_list(rows), tmp_path / name, "generate")

    model = side("model", [["\\boxed{0}", "\\boxed{0}"], ["\\boxed{1}", "\\boxed{9}"], ["\\boxed{9}", "\\boxed{9}"]])
    baseline = side("base", [["\\boxed{5}", "\\boxed{0}"], ["\\boxed{9}", "\\boxed{9}"], ["\\boxed{9}", "\\boxed{2}"]])
    config = EvalConfig(num_samples=2, ranker="rule:math")
    manifest, _ = evaluate(str(model), str(baseline), None, tmp_path / "e", config)
    m = manifest["metrics"]
    assert m["accuracy"] == pytest.approx(3 / 6) and m["baseline_accuracy"] == pytest.approx(2 / 6)
    assert m["accuracy_ci"] == pytest.approx(list(metrics.wilson_interval(1 + 0.5 + 0, 3)))
    # pairs: (right, wrong)=1, (right, right)=1/2, (right, wrong)=1, (wrong, wrong)=1/2, (wrong, wrong)=1/2,
    # (wrong, right)=0
    assert load_stage(tmp_path / "e")[0]["judgements"] == [[1.0, 0.5], [1.0, 0.5], [0.5, 0.0]]
    assert m["win_rate"] == pytest.approx(3.5 / 6) and m["ties"] == 3


def test_an_iteration_is_compared_with_the_one_before_without_sampling_again(tmp_path, tiny_model, other_tiny_model,
                                                                            prompts, monkeypatch):  # fmt: skip
    from sppo_cli import generate as gen

    config = EvalConfig(num_samples=2, ranker="python:plugin_rankers:by_length", **SAMPLING)
    evaluate(str(tiny_model), str(tiny_model), str(prompts), tmp_path / "iter0", config)
    evaluate(str(other_tiny_model), str(tmp_path / "iter0"), None, tmp_path / "iter1", config)
    monkeypatch.setattr(gen, "make_backend", lambda *args: pytest.fail("sampled again"))
    manifest, _ = evaluate(str(tmp_path / "iter1"), str(tmp_path / "iter0"), None, tmp_path / "previous", config)
    first, previous = load_stage(tmp_path / "iter1")[0], load_stage(tmp_path / "previous")[0]
    assert previous["responses"] == first["responses"] and previous["judgements"] == first["judgements"]


def test_sides_that_answered_other_prompts_are_refused(tmp_path, tiny_model, prompts):
    config = EvalConfig(num_samples=1, ranker="python:plugin_rankers:by_length", **SAMPLING)
    evaluate(str(tiny_model), str(tiny_model), str(prompts), tmp_path / "e", config)
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "something else"}])
    with pytest.raises(SppoError, match="answer other conversations than --prompts"):
        evaluate(str(tiny_model), str(tmp_path / "e"), str(other), tmp_path / "x", config)
    with pytest.raises(SppoError, match="--prompts is needed when both --model and --baseline are models"):
        evaluate(str(tiny_model), str(tiny_model), None, tmp_path / "y", config)
    with pytest.raises(SppoError, match="has 1 response\\(s\\) for some prompt; --num-samples 2 needs 2"):
        evaluate(str(tiny_model), str(tmp_path / "e"), None, tmp_path / "z", EvalConfig(num_samples=2, **SAMPLING))


def test_the_cli_prints_the_metrics_and_a_rerun_is_done(capsys, tmp_path, tiny_model, prompts):
    args = ["eval", "--model", tiny_model, "--baseline", tiny_model, "--prompts", prompts, "--output", tmp_path / "e",
            "--ranker", "rule:math", "--max-new-tokens", "4", "--backend", "transformers"]  # fmt: skip
    code, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "win rate 0.500 [0.500, 0.500], LC 0.500, accuracy" in " ".join(err.split())
    code, err = run_cli(capsys, *args)
    assert code == 0 and "already done" in err


# ---- the report -----------------------------------------------------------------------------------------------------


def fake_run(directory, accuracies):
    """A pipeline run's manifests, as pipeline.sh leaves them."""

    def manifest(path, **content):
        path.mkdir(parents=True)
        (path / "manifest.json").write_text(json.dumps({"complete": True, "seconds": 2.0, **content}))

    for t, accuracy in enumerate(accuracies):
        evaluation = {"win_rate": 0.5 + 0.05 * t, "win_rate_ci": [0.45 + 0.05 * t, 0.55 + 0.05 * t],
                      "lc_win_rate": 0.5 + 0.04 * t, "mean_length": 10.0 + t, "baseline_mean_length": 10.0}
        if accuracy is not None:  # with rule:math
            evaluation |= {"accuracy": accuracy, "accuracy_ci": [accuracy - 0.04, accuracy + 0.04]}
        manifest(directory / f"iter{t}" / "eval", metrics=evaluation)
        if t:
            manifest(directory / f"iter{t}" / "generations")
            manifest(directory / f"iter{t}" / "rankings")
            manifest(directory / f"iter{t}" / "model", final_loss=0.2 - 0.01 * t,
                     final_progress={"logratios/toward_target": 0.5 + 0.125 * t})  # fmt: skip
            (directory / f"iter{t}" / "model" / "log_history.json").write_text(
                json.dumps([{"loss": 0.3, "step": 1}, {"loss": 0.2, "step": 2}, {"train_runtime": 1.0}]))
        if t > 1:
            manifest(directory / f"iter{t}" / "eval-previous", metrics={**evaluation, "win_rate": 0.55,
                                                                        "win_rate_ci": [0.52, 0.58]})  # fmt: skip


def test_the_report_has_a_row_per_iteration_and_a_picture(capsys, tmp_path):
    fake_run(tmp_path / "sppo", [0.3, 0.4, 0.5])
    fake_run(tmp_path / "dpo", [0.3, 0.35, 0.38])
    code, err = run_cli(capsys, "report", tmp_path / "sppo", tmp_path / "dpo")
    assert code == 0, err
    text = (tmp_path / "sppo" / "report.md").read_text()
    assert "### sppo" in text and "### dpo" in text  # two runs side by side
    assert "| 0 (base) | 0.500 (itself) |" in text
    assert ("| 2 | 0.600 [0.550, 0.650] | 0.580 | 0.550 [0.520, 0.580] | 0.500 [0.460, 0.540] | 12.0 | 0.18 | 75% | "
            "2 / 2 / 2 / 4 |") in text
    assert "| 1 | 0.550 [0.500, 0.600] | 0.540 | 0.550 [0.500, 0.600] |" in text  # iteration 1's previous is the base
    assert (tmp_path / "sppo" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fake_run(tmp_path / "a" / "run", [0.3, 0.4])
    fake_run(tmp_path / "b" / "run", [None, None])  # the same name, and no accuracy (another ranker)
    code, err = run_cli(capsys, "report", tmp_path / "a" / "run", tmp_path / "b" / "run", "--output", tmp_path / "r")
    assert code == 0, err
    text = (tmp_path / "r" / "report.md").read_text()
    assert f"### {tmp_path / 'a' / 'run'}" in text and f"### {tmp_path / 'b' / 'run'}" in text
    (tmp_path / "empty" / "iter1.bak").mkdir(parents=True)  # not an iteration
    code, err = run_cli(capsys, "report", tmp_path / "empty")
    assert code == 1 and "holds no finished iteration" in err


def test_reused_responses_must_have_been_drawn_as_this_evaluation_draws(tmp_path, tiny_model, prompts):
    baseline = tmp_path / "baseline"
    generate(str(tiny_model), str(prompts), baseline, GenerateConfig(num_samples=2, temperature=1.3, **SAMPLING))
    with pytest.raises(SppoError, match="was sampled with temperature 1.3: evaluate with the settings"):
        evaluate(str(tiny_model), str(baseline), None, tmp_path / "e", EvalConfig(**SAMPLING))
    plain = tmp_path / "plain"
    generate(str(tiny_model), str(prompts), plain, GenerateConfig(num_samples=2, **SAMPLING))
    with pytest.raises(SppoError, match="was sampled with system_prompt None: evaluate with the settings"):
        evaluate(str(tiny_model), str(plain), None, tmp_path / "s", EvalConfig(system_prompt="Be rude.", **SAMPLING))
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(SppoError, match="was sampled with chat_template None: evaluate with the settings"):
        evaluate(str(tiny_model), str(plain), None, tmp_path / "t", EvalConfig(chat_template=str(template), **SAMPLING))
    missing = EvalConfig(chat_template=str(tmp_path / "nope.jinja"), **SAMPLING)
    with pytest.raises(SppoError, match="chat_template names no file: .*nope.jinja"):  # not a hub lookup
        evaluate(str(tiny_model), str(plain), None, tmp_path / "n", missing)
    rude = tmp_path / "rude"
    generate(str(tiny_model), str(prompts), rude, GenerateConfig(num_samples=2, system_prompt="Be rude.", **SAMPLING))
    with pytest.raises(SppoError, match="rude was sampled with system_prompt 'Be rude.'"):
        evaluate(str(rude), str(plain), None, tmp_path / "r", EvalConfig(num_samples=2, **SAMPLING))


def test_prompts_one_side_skipped_are_left_out_and_the_rest_stay_paired(tmp_path, tiny_model, other_tiny_model):
    rows = [{"prompt": "Short one?", "answer": "1"}, {"prompt": "long " * 60, "answer": "2"},
            {"prompt": "Another short one?", "answer": "3"}]  # fmt: skip
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    baseline = tmp_path / "baseline"
    generate(str(other_tiny_model), str(prompts), baseline, GenerateConfig(num_samples=1, **SAMPLING))
    config = EvalConfig(num_samples=1, max_model_len=40, ranker="python:plugin_rankers:by_length", **SAMPLING)
    manifest, _ = evaluate(str(tiny_model), str(baseline), None, tmp_path / "e", config)
    evaluated, sampled = load_stage(tmp_path / "e")[0], load_stage(baseline)[0]
    assert evaluated["answer"] == ["1", "3"] and manifest["rows"] == 2  # the model could not answer the long one
    assert evaluated["baseline_responses"] == [sampled["responses"][0], sampled["responses"][2]]
