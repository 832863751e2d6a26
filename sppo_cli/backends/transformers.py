"""The transformers backend: plain `model.generate`, K samples per prompt in one batched call, sampling from the
distribution the settings describe and nothing else (as vLLM does with explicit SamplingParams)."""

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from sppo_cli.backends import Completion
from sppo_cli.config import EngineOptions, SamplingOptions
from sppo_cli.models import load_causal_lm, load_tokenizer, on_gpu


class TransformersBackend:
    def __init__(self, model: str, engine: EngineOptions):
        self.tokenizer = load_tokenizer(model)
        self.model = load_causal_lm(model, engine.dtype).eval()
        self.batch_size = engine.batch_size
        self.max_model_len = engine.max_model_len or self.model.config.max_position_embeddings

    def close(self) -> None:
        del self.model
        if on_gpu():
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]], seeds: list[int], sampling: SamplingOptions) -> list[Completion]:
        completions = []
        for start in range(0, len(prompt_ids), self.batch_size):
            # One generator serves the whole batch: seeding it from the batch's first prompt keeps a batch's
            # samples the same whatever ran before it.
            torch.manual_seed(seeds[start])
            completions += self._generate_batch(prompt_ids[start : start + self.batch_size], sampling)
        return completions

    def _generate_batch(self, prompt_ids: list[list[int]], sampling: SamplingOptions) -> list[Completion]:
        self.tokenizer.padding_side = "left"
        inputs = self.tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt").to(self.model.device)
        processors = LogitsProcessorList()
        if sampling.repetition_penalty != 1.0:
            padding = (inputs["attention_mask"] == 0).sum(dim=1).repeat_interleave(sampling.num_samples)
            processors.append(RepetitionPenalty(sampling.repetition_penalty, padding))
        outputs = self.model.generate(
            **inputs,
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            # what the settings do not name is off, as in vLLM: not the model's generation_config (a Qwen's 1.05
            # repetition penalty, say), nor transformers' default top-k of 50
            top_k=0,
            repetition_penalty=1.0,
            min_p=0.0,
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.min_new_tokens or None,
            logits_processor=processors,
            stop_strings=sampling.stop or None,
            tokenizer=self.tokenizer,
            num_return_sequences=sampling.num_samples,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new_tokens = outputs[:, inputs["input_ids"].shape[1] :]
        decoded = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        texts = [_cut(text, sampling.stop) for text in decoded]
        lengths = (new_tokens != self.tokenizer.pad_token_id).sum(dim=1).tolist()
        k = sampling.num_samples
        return [
            Completion([t.strip() for t in texts[i : i + k]], lengths[i : i + k]) for i in range(0, len(texts), k)
        ]


def _cut(text: str, stop: list[str]) -> str:
    """The response before its first stop string, which transformers leaves in (vLLM leaves it out)."""
    ends = [text.find(string) for string in stop if string in text]
    return text[: min(ends)] if ends else text


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
