import numpy as np
import pytest
from datasets import Dataset

from sppo_cli.config import RankConfig
from sppo_cli.errors import SppoError
from sppo_cli.rank import rank_all
from sppo_cli.rankers import load_ranker
from sppo_cli.rankers.reward_model import RewardModelRanker
from sppo_cli.rankers.rule_math import MathRuleRanker


def ranker(spec: str, **options):
    return load_ranker(RankConfig(ranker=spec, **options))


def rank(generations: Dataset, directory, spec: str, **options):
    return rank_all(generations, RankConfig(ranker=spec, **options), directory)


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    from sppo_cli.tiny import build_tiny_reward_model

    return build_tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm", seed=0)


def test_math_rule_correct_beats_incorrect():
    batch = {
        "prompt": ["1+1?", "2+2?"],
        "responses": [["\\boxed{2}", "\\boxed{3}", "The answer is 2."], ["\\boxed{5}", "\\boxed{3}"]],
        "answer": ["2", "4"],
    }
    ranker = MathRuleRanker()
    first, second = ranker.judge(batch)
    assert first.tolist() == [[0.5, 1.0, 0.5], [0.0, 0.5, 0.0], [0.5, 1.0, 0.5]]
    assert second.tolist() == [[0.5, 0.5], [0.5, 0.5]]  # both wrong: no preference
    assert ranker.stats() == {"correct_responses": 2, "judged_responses": 5}


def test_math_rule_through_rank_skips_prompts_without_signal(tmp_path):
    generations = Dataset.from_list(
        [
            {"prompt": "1+1?", "prompt_text": "", "responses": ["\\boxed{3}", "so \\boxed{2}"], "answer": "2"},
            {"prompt": "2+2?", "prompt_text": "", "responses": ["\\boxed{4}", "\\boxed{4.0}"], "answer": "4"},
        ]
    )
    rankings, stats = rank(generations, tmp_path, "rule:math")
    assert stats["pairs"] == 1 and stats["tied_prompts"] == 1 and stats["correct_responses"] == 3
    row = rankings[0]
    assert row["chosen"][-1]["content"] == "so \\boxed{2}" and row["rejected"][-1]["content"] == "\\boxed{3}"
    assert (row["chosen_probs"], row["chosen_probs_win"], row["chosen_probs_lose"]) == (1.0, 0.75, 0.25)


def test_math_rule_names_the_missing_answer_column():
    with pytest.raises(SppoError, match="rule:math needs the reference answer column 'solution'"):
        ranker("rule:math", answer_column="solution").judge({"prompt": ["q"], "responses": [["a", "b"]]})


def test_reward_model_scores_the_chat_formatted_conversation(tiny_reward_model):
    reward_model = ranker(f"reward-model:{tiny_reward_model}", ranker_batch_size=3)
    assert isinstance(reward_model, RewardModelRanker)
    batch = {"prompt": ["Name a fruit.", "Two plus two?"],
             "responses": [["an apple", "a red apple from the tree", "no"], ["four", "4"]]}
    scores = reward_model.judge(batch)
    assert [len(s) for s in scores] == [3, 2]
    # the same rewards, one conversation at a time, without padding
    tokenizer, model = reward_model.tokenizer, reward_model.model
    for prompt, responses, got in zip(batch["prompt"], batch["responses"], scores):
        for response, reward in zip(responses, got):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
            )
            assert text.endswith(f"{response}<|end|>")
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            assert reward == pytest.approx(model(**ids).logits[0, 0].item(), abs=1e-5)


def test_a_long_conversation_loses_its_beginning_never_the_response(tiny_reward_model):
    reward_model = RewardModelRanker(str(tiny_reward_model), max_length=24)
    batch = {"prompt": ["Tell me a long story. " * 20], "responses": [["yes", "no"]]}
    rewards = reward_model.judge(batch)[0]
    tokenizer, model = reward_model.tokenizer, reward_model.model
    for response, reward in zip(batch["responses"][0], rewards):
        text = tokenizer.apply_chat_template([{"role": "user", "content": batch["prompt"][0]},
                                              {"role": "assistant", "content": response}], tokenize=False)  # fmt: skip
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, -24:]
        assert reward == pytest.approx(model(input_ids=ids).logits[0, 0].item(), abs=1e-5)
    assert rewards[0] != rewards[1] and reward_model.stats() == {"truncated_conversations": 2}


def test_the_reward_model_s_limit_is_its_context_window_or_reward_max_length(tiny_reward_model):
    from sppo_cli.config import RankConfig
    from sppo_cli.rankers import load_ranker

    context = RewardModelRanker(str(tiny_reward_model)).model.config.max_position_embeddings
    assert RewardModelRanker(str(tiny_reward_model)).max_length == context  # not a fixed 4096
    ranker = load_ranker(RankConfig(ranker=f"reward-model:{tiny_reward_model}", reward_max_length=24))
    assert ranker.max_length == 24
    with pytest.raises(SppoError, match=f"--reward-max-length {context + 1} is longer than the context window"):
        RewardModelRanker(str(tiny_reward_model), max_length=context + 1)


def test_reward_model_probabilities_are_sigmoid_of_reward_differences(tmp_path, tiny_reward_model):
    generations = Dataset.from_list(
        [{"prompt": "Name a fruit.", "prompt_text": "", "responses": ["an apple", "a pear", "no idea at all"]}]
    )
    rewards = np.asarray(ranker(f"reward-model:{tiny_reward_model}").judge(generations[:])[0])
    rankings, _ = rank(generations, tmp_path, f"reward-model:{tiny_reward_model}")
    expected = 1 / (1 + np.exp(-(rewards[:, None] - rewards[None, :])))
    np.testing.assert_allclose(rankings[0]["probability"], expected, atol=1e-12)
    assert rankings[0]["chosen"][-1]["content"] == generations[0]["responses"][int(np.argmax(rewards))]


def test_reward_model_errors(tmp_path, tiny_model):
    with pytest.raises(SppoError, match="model not found"):
        ranker(f"reward-model:{tmp_path / 'missing'}")
    with pytest.raises(SppoError, match="cannot load the reward model|outputs; a reward model has one"):
        ranker(f"reward-model:{tiny_model}")


def test_pairwise_mode_keeps_the_intransitive_preferences_the_score_reduction_erases():
    from sppo_cli.rank import ranking_row
    from sppo_cli.rankers.pairrm import pairwise_probabilities, scores_from_logits

    # PairRM logits for a cycle a > b > c > a (both orders of each pair), as a real ranker can produce
    logits = np.array([[0.0, 2.0, -2.0], [-2.0, 0.0, 2.0], [2.0, -2.0, 0.0]])
    scores = scores_from_logits(logits)
    np.testing.assert_allclose(scores, [0.0, 0.0, 0.0])  # the score reduction: every response looks equal
    assert ranking_row([{"role": "user", "content": "p"}], ["a", "b", "c"], scores) is None

    probabilities = pairwise_probabilities(logits)
    assert probabilities[0, 1] == pytest.approx(1 / (1 + np.exp(-4.0)))  # sigmoid(L[a][b] - L[b][a])
    np.testing.assert_allclose(probabilities + probabilities.T, np.ones((3, 3)))
    # the cycle plus a response that everything beats: pairwise keeps both the cycle and the loser
    logits = np.array([[0, 2, -2, 3], [-2, 0, 2, 3], [2, -2, 0, 3], [-3, -3, -3, 0]], dtype=float)
    row = ranking_row([{"role": "user", "content": "p"}], ["a", "b", "c", "d"], pairwise_probabilities(logits))
    np.testing.assert_allclose(row["probability"][0][:3], [0.5, 1 / (1 + np.exp(-4.0)), 1 / (1 + np.exp(4.0))])
    assert row["rejected"][-1]["content"] == "d"


def test_pairrm_ranker_through_rank_with_both_modes(tmp_path, tiny_pairrm):
    generations = Dataset.from_list(
        [{"prompt": "Name a fruit.", "prompt_text": "", "responses": ["an apple", "a pear", "no idea at all", "x"]},
         {"prompt": "Two plus two?", "prompt_text": "", "responses": ["four", "4 of course"]}]
    )
    by_scores, stats = rank(generations, tmp_path / "a", str(tiny_pairrm), source_max_length=8, candidate_max_length=4)
    pairwise, _ = rank(generations, tmp_path / "b", str(tiny_pairrm), probability_mode="pairwise")
    assert stats["truncated_responses"] > 0
    for row in pairwise:
        p = np.array(row["probability"])
        np.testing.assert_allclose(p + p.T, np.ones_like(p), atol=1e-6)
    assert len(by_scores) == len(pairwise) == 2


@pytest.mark.slow
def test_pairrm_on_two_worker_processes_matches_one(tmp_path, tiny_pairrm):
    generations = Dataset.from_list(
        [{"prompt": f"Question {i}?", "prompt_text": "", "responses": [f"answer {i}", "no", f"maybe {i} or more"]}
         for i in range(5)]
    )
    options = {"source_max_length": 8, "candidate_max_length": 4, "shard_size": 2}
    single, single_stats = rank(generations, tmp_path / "a", str(tiny_pairrm), **options)
    parallel, stats = rank(generations, tmp_path / "b", str(tiny_pairrm), data_parallel_size=2, **options)  # spawned
    assert parallel["prompt"] == single["prompt"]
    np.testing.assert_allclose(parallel["probability"], single["probability"], atol=1e-6)
    assert stats["truncated_responses"] == single_stats["truncated_responses"] > 0


def test_a_reward_model_reads_the_whole_conversation_through_its_own_template(tiny_reward_model):
    reward_model = ranker(f"reward-model:{tiny_reward_model}")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a fruit."}]
    (rewards,) = reward_model.judge({"prompt": [chat], "conversation": [chat], "responses": [["An apple.", "No."]]})
    tokenizer, model = reward_model.tokenizer, reward_model.model
    for response, reward in zip(["An apple.", "No."], rewards):
        text = tokenizer.apply_chat_template([*chat, {"role": "assistant", "content": response}], tokenize=False)
        assert text.startswith("<|begin|><|system|>\nBe brief.<|end|><|user|>\nHi.<|end|><|assistant|>\nHello.")
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        assert reward == pytest.approx(model(**ids).logits[0, 0].item(), abs=1e-5)
