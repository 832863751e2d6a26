"""Loading policies and their tokenizers from a local directory or a hub id, with errors a user can act on; the
device and dtype policy every stage follows; and the chat rendering every stage shares."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sppo_cli.data import may_be_hub_id, refuse_partial
from sppo_cli.errors import SppoError, first_line

# ---- devices and dtypes ---------------------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def on_gpu() -> bool:
    return torch.cuda.is_available()


def gpu_count() -> int:
    return torch.cuda.device_count()


def bf16_supported() -> bool:
    """Whether training and judging run in bf16: on GPUs that support it; CPUs stay in float32."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def inference_dtype() -> torch.dtype:
    """The dtype rankers run in: bf16 on GPUs, float32 on CPUs (bf16 matmuls are slow there)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def torch_dtype(name: str) -> torch.dtype | str:
    if name == "auto":
        return "auto"
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SppoError(f"unknown dtype {name!r} (use auto, float32, bfloat16 or float16)")
    return dtype


# ---- loading --------------------------------------------------------------------------------------------------------


def is_hub_id(name: str) -> bool:
    """Whether a model name that is not a local directory may be looked up on the hub (`gpt2` or `org/name`)."""
    return may_be_hub_id(name, owner_required=False)


def resolve_model(name: str) -> str:
    """A local directory, or a hub id; a path-like name that does not exist is an error, never a hub lookup."""
    refuse_partial(name)
    if not Path(name).is_dir() and not is_hub_id(name):
        raise SppoError(f"model not found: {name} (expected a model directory or a hub id)")
    return name


def load_tokenizer(name: str, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model, with the Jinja template in the file `chat_template` instead of its own if given."""
    name = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as error:  # OSError, ValueError, hub errors: all mean "this is not a loadable tokenizer"
        raise SppoError(f"cannot load the tokenizer of {name}: {first_line(error)}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        try:
            tokenizer.chat_template = Path(chat_template).read_text()
        except OSError as error:
            raise SppoError(f"cannot read the chat template {chat_template}: {first_line(error)}") from error
    return tokenizer


def load_causal_lm(name: str, dtype: str = "auto", device: str | None = None) -> PreTrainedModel:
    name = resolve_model(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype(dtype))
    except Exception as error:
        raise SppoError(f"cannot load the model {name}: {first_line(error)}") from error
    return model.to(device or default_device())


# ---- chat rendering -------------------------------------------------------------------------------------------------


def require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not tokenizer.chat_template:
        raise SppoError(f"the tokenizer of {tokenizer.name_or_path} has no chat template: give one with "
                        "--chat-template FILE")  # fmt: skip


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The exact text the policy is sampled from: the conversation rendered by the chat template, ready for the
    assistant's turn."""
    require_chat_template(tokenizer)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # a template rejects conversations it does not support (roles, system turns)
        raise SppoError(f"the chat template cannot render a prompt: {first_line(error)}") from error


def encode_chat_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a rendered template: the template writes BOS itself, so special tokens are not added again."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
