import math

import numpy as np
import pytest
from datasets import Dataset

from sppo_cli.config import RankConfig
from sppo_cli.errors import SppoError
from sppo_cli.rank import rank_all, ranking_row
from sppo_cli.rankers import preference_matrix, win_rates

P = [{"role": "user", "content": "p"}]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_scores_give_the_published_probabilities_and_pair():
    scores = [0.3, -1.2, 2.0, 0.3]
    row = ranking_row(P, ["a", "b", "c", "d"], scores)
    expected = [[0.5 if i == j else sigmoid(si - sj) for j, sj in enumerate(scores)] for i, si in enumerate(scores)]
    np.testing.assert_allclose(row["probability"], expected, rtol=0, atol=1e-15)
    # winner = argmax score (c, index 2), loser = argmin score (b, index 1)
    assert row["chosen"] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    assert row["rejected"] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "b"}]
    assert row["chosen_probs"] == pytest.approx(sigmoid(2.0 - (-1.2)), abs=1e-15)
    # the row means include the 1/2 diagonal
    assert row["chosen_probs_win"] == pytest.approx(sum(expected[2]) / 4, abs=1e-15)
    assert row["chosen_probs_lose"] == pytest.approx(sum(expected[1]) / 4, abs=1e-15)
    assert row["scores"] == scores


def test_hand_computed_two_responses():
    row = ranking_row(P, ["x", "y"], [0.0, math.log(3.0)])  # sigmoid(log 3) = 3/4
    assert row["chosen_probs"] == pytest.approx(0.75)
    assert row["chosen_probs_win"] == pytest.approx((0.5 + 0.75) / 2)
    assert row["chosen_probs_lose"] == pytest.approx((0.25 + 0.5) / 2)


def test_an_intransitive_matrix_keeps_its_win_rates():
    # rock-paper-scissors plus a response that loses to everything
    p = np.array(
        [
            [0.5, 0.9, 0.1, 0.8],
            [0.1, 0.5, 0.9, 0.8],
            [0.9, 0.1, 0.5, 0.8],
            [0.2, 0.2, 0.2, 0.5],
        ]
    )
    row = ranking_row(P, ["rock", "paper", "scissors", "nothing"], p)
    np.testing.assert_allclose(row["probability"], p)
    assert row["chosen"][-1]["content"] == "rock"  # first of the three equal win rates, like np.argmax
    assert row["rejected"][-1]["content"] == "nothing"
    assert row["chosen_probs"] == pytest.approx(0.8)
    assert row["chosen_probs_win"] == pytest.approx(2.3 / 4)
    assert row["chosen_probs_lose"] == pytest.approx(1.1 / 4)
    assert row["scores"] == pytest.approx(win_rates(p).tolist())


def test_matrix_diagonal_is_one_half_whatever_the_ranker_says():
    matrix, scores = preference_matrix([[1.0, 0.7], [0.3, 0.0]], 2)
    assert scores is None
    assert matrix.tolist() == [[0.5, 0.7], [0.3, 0.5]]


def test_all_tied_responses_yield_no_pair():
    assert ranking_row(P, ["a", "b", "c"], [1.0, 1.0, 1.0]) is None
    assert ranking_row(P, ["a", "b"], [[0.5, 0.5], [0.5, 0.5]]) is None


@pytest.mark.parametrize(
    "judgement, message",
    [
        ([1.0, 2.0], "shape (2,) for 3 responses"),
        ([[0.5] * 3] * 2, "shape (2, 3) for 3 responses"),
        ([1.0, float("nan"), 0.0], "non-finite"),
        ([[0.5, 1.5, 0.0], [0.0, 0.5, 0.0], [1.0, 1.0, 0.5]], "outside [0, 1]"),
    ],
)
def test_bad_judgements_are_named(judgement, message):
    with pytest.raises(SppoError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ranking_row(P, ["a", "b", "c"], judgement)


def rank(generations: Dataset, directory, **settings):
    return rank_all(generations, RankConfig(**{"ranker": "python:plugin_rankers:by_length", **settings}), directory)


def test_the_sampled_token_ids_follow_the_pair_and_drop_truncated_never_picks_a_cut_off_response(tmp_path):
    generations = Dataset.from_list([
        {"prompt": "a", "prompt_text": "A", "responses": ["x", "xxx", "xxxxx"], "response_token_ids": [[1], [2], [3]],
         "finish_reasons": ["stop", "stop", "length"]},
        {"prompt": "b", "prompt_text": "B", "responses": ["y", "yy", "yyy"], "response_token_ids": [[4], [5], [6]],
         "finish_reasons": ["length", "stop", "length"]},
    ])  # fmt: skip
    rankings, stats = rank(generations, tmp_path / "all")  # by_length: the longest wins
    assert [r[-1]["content"] for r in rankings["chosen"]] == ["xxxxx", "yyy"]
    assert rankings["chosen_token_ids"] == [[3], [6]] and rankings["rejected_token_ids"] == [[1], [4]]
    assert rankings["chosen_index"] == [2, 2] and rankings["rejected_index"] == [0, 0]
    assert stats["pairs_with_truncated"] == 2 and stats["dropped_truncated_prompts"] == 0
    rankings, stats = rank(generations, tmp_path / "finished", drop_truncated=True)
    assert rankings["prompt"] == ["a"]
    assert rankings["chosen_token_ids"] == [[2]] and rankings["rejected_token_ids"] == [[1]]
    assert rankings[0]["chosen_probs_win"] == pytest.approx((0.5 + sigmoid(2) + sigmoid(-2)) / 3)  # against all K
    assert stats == {"prompts": 2, "pairs": 1, "tied_prompts": 0, "dropped_truncated_prompts": 1,
                     "pairs_with_truncated": 0}  # fmt: skip


def test_rank_keeps_columns_counts_ties_and_handles_any_k(tmp_path):
    generations = Dataset.from_list(
        [
            {"prompt": "a", "prompt_text": "A", "responses": ["x", "xxx"], "answer": "1"},
            {"prompt": "b", "prompt_text": "B", "responses": ["yy", "yy", "yy"], "answer": "2"},
            {"prompt": "c", "prompt_text": "C", "responses": ["z", "zzzz", "zz", "zzz", "zzzzz"], "answer": "3"},
        ]
    )
    rankings, stats = rank(generations, tmp_path)
    assert stats == {"prompts": 3, "pairs": 2, "tied_prompts": 1, "dropped_truncated_prompts": 0,
                     "pairs_with_truncated": 0}  # fmt: skip
    assert rankings["prompt"] == ["a", "c"]
    assert rankings["answer"] == ["1", "3"] and rankings["prompt_text"] == ["A", "C"]
    assert [len(p) for p in rankings["probability"]] == [2, 5]
    assert rankings[1]["chosen"][-1]["content"] == "zzzzz"
    assert rankings[1]["rejected"][-1]["content"] == "z"


def test_rank_refuses_when_everything_ties(tmp_path):
    generations = Dataset.from_list([{"prompt": "a", "prompt_text": "A", "responses": ["x", "x"]}])
    with pytest.raises(SppoError, match="all 1 prompts had tied responses"):
        rank(generations, tmp_path)


MATH = Dataset.from_list(
    [{"prompt": f"p{i}", "prompt_text": "", "responses": ["\\boxed{1}", "\\boxed{2}", "x" * i], "answer": str(i % 3)}
     for i in range(7)]
)


def test_shards_and_data_parallel_workers_merge_rows_in_prompt_order_and_sum_counts(tmp_path, simulated_processes):
    single, single_stats = rank(MATH, tmp_path / "one", ranker="rule:math")
    parallel, stats = rank(MATH, tmp_path / "three", ranker="rule:math", shard_size=2, data_parallel_size=3)
    assert [[shard.index for shard in p.args[1]] for p in simulated_processes] == [[0, 3], [1], [2]]
    assert parallel.to_list() == single.to_list()
    assert stats == single_stats and stats["correct_responses"] == 4  # counts are summed over shards and workers
    assert len(list((tmp_path / "three").glob("[0-9]*.json"))) == 4  # one file per finished shard


def test_a_rerun_judges_only_the_unfinished_shards(tmp_path, monkeypatch):
    from sppo_cli import rank as stage

    reference, _ = rank(MATH, tmp_path / "reference", ranker="rule:math", shard_size=2)
    real, judged = stage.judge, []

    def judge_then_crash(ranker, part):
        judged.append(len(part))
        if len(judged) == 3:
            raise KeyboardInterrupt
        return real(ranker, part)

    monkeypatch.setattr(stage, "judge", judge_then_crash)
    with pytest.raises(KeyboardInterrupt):
        rank(MATH, tmp_path / "shards", ranker="rule:math", shard_size=2)
    judged.clear()
    resumed, _ = rank(MATH, tmp_path / "shards", ranker="rule:math", shard_size=2)
    assert judged == [2, 1]  # the two finished shards were not judged again
    assert resumed.to_list() == reference.to_list()


def test_every_column_of_the_generations_is_kept_as_it_is(tmp_path):
    import datetime

    from datasets import Features, Value

    rows = [{"prompt": p, "prompt_text": p.upper(), "responses": ["x", "xxx"],
             "when": datetime.datetime(2026, 1, i + 1), "weight": 0.25 * i} for i, p in enumerate(["a", "b"])]  # fmt: skip
    features = Features({"prompt": Value("string"), "prompt_text": Value("string"), "responses": [Value("string")],
                         "when": Value("timestamp[s]"), "weight": Value("float32")})  # fmt: skip
    rankings, _ = rank(Dataset.from_list(rows, features=features), tmp_path)
    assert rankings.features["when"] == Value("timestamp[s]") and rankings.features["weight"] == Value("float32")
    assert rankings["when"] == [r["when"] for r in rows] and rankings["weight"] == [0.0, 0.25]
