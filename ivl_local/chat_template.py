"""Chat templates: messages -> prompt text, shared by training and the runtime.

The template comes from the base GGUF's `tokenizer.chat_template` metadata and is rendered
in a sandboxed Jinja environment (a model file must not be able to run code). A base model
without a template (Gemma 3 270M *base*) uses FALLBACK_TEMPLATE: a plain, documented
format that the project's chat demonstrations are rendered in, so a value network trained
on them teaches the base exactly this format.

    text = render_messages([{"role": "user", "content": "Hi"}], template=None)
    # 'User: Hi\n\nAssistant:'
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache

from .errors import ConfigError

# The fallback chat format (documented in README and data/README.md). Turns are separated
# by a blank line; an assistant turn ends with the model's EOS token, so a value network
# trained on it teaches the base to stop after its answer.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] | trim }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] | trim }}\n\n"
    "{% else %}Assistant: {{ m['content'] | trim }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# Strings after which an answer in the fallback format is over.
FALLBACK_STOP = ("\nUser:", "\n\nUser:")

ROLES = ("system", "user", "assistant")


def _raise(message: str):
    raise ConfigError(f"chat template error: {message}")


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def validate_messages(messages: list[dict]) -> None:
    if not messages:
        raise ConfigError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ConfigError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}")


def render_messages(messages: list[dict], template: str | None = None, *, bos_token: str = "",
                    eos_token: str = "", add_generation_prompt: bool = True) -> str:
    """Render a conversation. `template=None` uses FALLBACK_TEMPLATE.

    The result does not start with a BOS token unless the template writes one; the
    tokenizer adds BOS where the model wants it (callers pass `bos_token=""` then).
    """
    validate_messages(messages)
    compiled = _compile(template or FALLBACK_TEMPLATE)
    try:
        return compiled.render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                               add_generation_prompt=add_generation_prompt)
    except ConfigError:
        raise
    except Exception as e:  # a broken template in a model file
        raise ConfigError(f"chat template of the model failed to render: {e}") from None


def split_for_training(messages: list[dict], template: str | None = None, **kw) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_response) segments.

    Response segments are the assistant turns (what the loss is computed on); everything
    else (system, user, template markup) is prompt. Works for any template by rendering
    growing prefixes and taking differences.
    """
    validate_messages(messages)
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render_messages(messages[:i], template, add_generation_prompt=True, **kw) if i else ""
        full = render_messages(messages[: i + 1], template, add_generation_prompt=False, **kw)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ConfigError("chat template is not prefix-stable; cannot mask prompt tokens")
        segments.append((prompt[len(done):], False))
        segments.append((full[len(prompt):], True))
        done = full
    if not any(is_resp for _, is_resp in segments):
        raise ConfigError("a training conversation needs at least one assistant message")
    return segments
