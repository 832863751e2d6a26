"""The transformers backend: plain `model.generate`, K samples per prompt in one batched call, sampling from the
distribution the settings describe and nothing else (as vLLM does with explicit SamplingParams), each prompt from its
own seed."""

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TopPLogitsWarper

from sppo_cli.backends import Completion
from sppo_cli.config import EngineOptions, SamplingOptions
from sppo_cli.data import STOPPED, TRUNCATED
from sppo_cli.models import load_causal_lm, load_tokenizer, on_gpu


class TransformersBackend:
    def __init__(self, model: str, engine: EngineOptions):
        self.tokenizer = load_tokenizer(model)
        self.model = load_causal_lm(model, engine.dtype).eval()
        self.batch_size = engine.batch_size
        self.max_model_len = engine.max_model_len or self.model.config.max_position_embeddings
        ends = self.model.generation_config.eos_token_id
        self.end_of_sequence = {self.tokenizer.eos_token_id, *(ends if isinstance(ends, list) else [ends])} - {None}
        self.ends = self.end_of_sequence | {self.tokenizer.pad_token_id}  # what follows a response

    def close(self) -> None:
        del self.model
        if on_gpu():
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]], seeds: list[int], sampling: SamplingOptions) -> list[Completion]:
        completions = []
        for start in range(0, len(prompt_ids), self.batch_size):
            batch = slice(start, start + self.batch_size)
            completions += self._generate_batch(prompt_ids[batch], seeds[batch], sampling)
        return completions

    def _generate_batch(self, prompt_ids: list[list[int]], seeds: list[int],
                        sampling: SamplingOptions) -> list[Completion]:  # fmt: skip
        self.tokenizer.padding_side = "left"
        k = sampling.num_samples
        rows = [ids for ids in prompt_ids for _ in range(k)]  # K copies of each prompt, one per sample
        inputs = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(self.model.device)
        processors = LogitsProcessorList()
        if sampling.repetition_penalty != 1.0:
            padding = (inputs["attention_mask"] == 0).sum(dim=1)
            processors.append(RepetitionPenalty(sampling.repetition_penalty, padding))
        # vLLM's seeding: sample j of a prompt draws from seed + j
        processors.append(SeededSampler([seed + j for seed in seeds for j in range(k)], sampling.temperature,
                                        sampling.top_p, self.model.device))  # fmt: skip
        outputs = self.model.generate(
            **inputs,
            # the draw is SeededSampler's: generate takes the best token of the scores it returns
            do_sample=False,
            # what the settings do not name is off, as in vLLM: not the model's generation_config (a Qwen's 1.05
            # repetition penalty, say)
            repetition_penalty=1.0,
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.min_new_tokens or None,
            logits_processor=processors,
            stop_strings=sampling.stop or None,
            tokenizer=self.tokenizer,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        samples = [self._response(row, sampling) for row in outputs[:, inputs["input_ids"].shape[1] :].tolist()]
        return [Completion(*map(list, zip(*samples[i : i + k]))) for i in range(0, len(samples), k)]

    def _response(self, new_tokens: list[int], sampling: SamplingOptions) -> tuple[str, list[int], str]:
        """One sample's text, its tokens (up to its end-of-sequence, included, or the padding after a stop string)
        and why it ended."""
        length = next((i for i, token in enumerate(new_tokens) if token in self.ends), len(new_tokens))
        ended = length < len(new_tokens)  # padding or an end-of-sequence token follows
        text = self.tokenizer.decode(new_tokens[:length], skip_special_tokens=True)
        by_stop_string = any(string in text for string in sampling.stop)
        if ended and not by_stop_string and new_tokens[length] in self.end_of_sequence:
            length += 1  # the end-of-sequence token was sampled (after a stop string, it is padding)
        ids = new_tokens[:length]
        stopped = ended or by_stop_string
        return _cut(text, sampling.stop).strip(), ids, STOPPED if stopped else TRUNCATED


def _cut(text: str, stop: list[str]) -> str:
    """The response before its first stop string, which transformers leaves in (vLLM leaves it out)."""
    ends = [text.find(string) for string in stop if string in text]
    return text[: min(ends)] if ends else text


class SeededSampler(LogitsProcessor):
    """Draws each row's next token from its own generator, so that a sample depends on its seed only, not on the batch
    it runs in (transformers' sampling draws the whole batch from one generator). Temperature, then top-p, then the
    Gumbel-max trick: the argmax of the log-probabilities plus Gumbel noise (-log of an Exp(1) draw, as vLLM draws it)
    is a draw from their distribution."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device):
        self.generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        noise = torch.stack([torch.empty_like(scores[0]).exponential_(generator=g) for g in self.generators])
        return scores - noise.log()


class RepetitionPenalty(LogitsProcessor):
    """transformers' repetition penalty (as vLLM's: on the tokens of the prompt and the response so far), blind to the
    left padding, which transformers' own processor counts: with the end-of-sequence token as padding, a prompt padded
    in its batch would be kept from ending."""

    def __init__(self, penalty: float, padding: torch.Tensor):
        self.penalty, self.padding = penalty, padding

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        real = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] >= self.padding[:, None]
        seen = torch.zeros(scores.shape, dtype=torch.long, device=scores.device).scatter_add_(1, input_ids, real.long())
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen > 0, penalised, scores)
