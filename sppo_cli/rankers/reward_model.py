"""A scalar reward model (AutoModelForSequenceClassification with one output) as a ranker: P = sigmoid(r_i - r_j)."""

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from sppo_cli.data import RESPONSES, conversations
from sppo_cli.errors import SppoError, first_line
from sppo_cli.models import default_device, inference_dtype, load_tokenizer, resolve_model
from sppo_cli.rankers import Judgement

DEFAULT_MAX_LENGTH = 4096  # for a model that does not say its context window


class RewardModelRanker:
    """A reward per response, read on the chat-formatted conversation; longest-first batches. A conversation longer
    than `max_length` tokens (by default the model's context window) loses its beginning, never the response, and is
    counted."""

    def __init__(self, checkpoint: str, batch_size: int = 32, max_length: int | None = None):
        checkpoint = resolve_model(checkpoint)
        self.tokenizer = load_tokenizer(checkpoint)
        if not self.tokenizer.chat_template:
            raise SppoError(f"the reward model {checkpoint} has no chat template to format conversations with")
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=inference_dtype())
        except Exception as error:
            raise SppoError(f"cannot load the reward model {checkpoint}: {first_line(error)}") from error
        if self.model.config.num_labels != 1:
            raise SppoError(f"{checkpoint} has {self.model.config.num_labels} outputs; a reward model has one")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(default_device()).eval()
        context = getattr(self.model.config, "max_position_embeddings", None)
        if max_length is not None and context is not None and max_length > context:
            raise SppoError(f"--reward-max-length {max_length} is longer than the context window of {checkpoint} "
                            f"({context} tokens)")  # fmt: skip
        self.batch_size, self.max_length = batch_size, max_length or context or DEFAULT_MAX_LENGTH
        self.truncated = 0

    def judge(self, batch: dict[str, list]) -> list[Judgement]:
        texts = [  # the whole conversation, as this reward model's own template writes it
            self.tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
            for messages, responses in zip(conversations(batch), batch[RESPONSES])
            for response in responses
        ]
        rewards = self.rewards(texts)
        judgements, start = [], 0
        for responses in batch[RESPONSES]:
            judgements.append(rewards[start : start + len(responses)])
            start += len(responses)
        return judgements

    @torch.inference_mode()
    def rewards(self, texts: list[str]) -> np.ndarray:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        self.truncated += sum(len(row) > self.max_length for row in ids)
        ids = [row[-self.max_length :] for row in ids]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        rewards = np.empty(len(ids))
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            inputs = self.tokenizer.pad({"input_ids": [ids[i] for i in indices]}, return_tensors="pt")
            rewards[indices] = self.model(**inputs.to(self.model.device)).logits[:, 0].float().cpu().numpy()
        return rewards

    def stats(self) -> dict:
        return {"truncated_conversations": self.truncated}
