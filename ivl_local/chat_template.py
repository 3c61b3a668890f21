"""Chat templates: messages -> prompt text, shared by training and the runtime.

The template comes from the base GGUF's `tokenizer.chat_template` metadata and is rendered
in a sandboxed Jinja environment (a model file must not be able to run code) under a budget
(a model file must not be able to hang the chat or exhaust memory either; see `_Budget`).
A base model without a template (Gemma 3 270M *base*) uses FALLBACK_TEMPLATE: a plain,
documented format that the project's chat demonstrations are rendered in, so a value
network trained on them teaches the base exactly this format.

    text = render_messages([{"role": "user", "content": "Hi"}], template=None)
    # 'User: Hi\n\nAssistant:'

Every way a template can fail (not text, a syntax error, an error while rendering, a
budget exceeded) is one ConfigError whose message starts with "chat template".
"""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime
from functools import lru_cache, wraps

from .errors import ConfigError, ContextOverflowError

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

# --- the budget of one rendering -------------------------------------------------------------
# Real chat templates (Llama 3, Qwen, Gemma, SmolLM2, tool-calling ones) are under 20 KB and
# render a conversation in well under a millisecond with a few thousand steps; these limits
# are orders of magnitude above that and only stop a template that would hang or exhaust
# memory (nested range() loops, 'x' * 10**12, a string doubled in a loop).
TEMPLATE_MAX_CHARS = 200_000     # the template text itself
RENDER_SECONDS = 2.0             # wall time of one rendering
RENDER_MAX_STEPS = 1_000_000     # loop iterations + calls + filters + lookups + output pieces
RENDER_MAX_CHARS = 4_000_000     # the output, and any string or list built on the way
                                 # (a 128K-token context holds about 0.5M characters)
RENDER_MAX_INT = 100_000         # an integer argument (a width, a count, range()'s length)


def _raise(message: str):
    raise ConfigError(f"chat template error: {message}")


def _over(what: str) -> ConfigError:
    return ConfigError(f"chat template of the model exceeds its rendering budget ({what}); "
                       "the model file's tokenizer.chat_template is broken")


class _Budget:
    """Steps and wall time of the rendering running on this thread."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + RENDER_SECONDS
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps > RENDER_MAX_STEPS:
            raise _over(f"more than {RENDER_MAX_STEPS:,} steps")
        if time.monotonic() > self.deadline:
            raise _over(f"more than {RENDER_SECONDS:g} s")


_active = threading.local()   # .budget: the _Budget of this thread's rendering, if any


def _step() -> None:
    budget = getattr(_active, "budget", None)
    if budget is not None:     # None while Jinja folds constants at compile time
        budget.step()


def _size(value, limit: int = RENDER_MAX_CHARS) -> int:
    """Characters `value` has when printed, roughly: strings by length, containers by their
    items (a list holding one string 1000 times counts it 1000 times, as printing would).
    Stops counting once past `limit`, so it costs at most `limit` steps."""
    if isinstance(value, str):          # the common case, and the hot path
        return len(value)
    from collections.abc import Mapping, MappingView

    from jinja2.utils import Namespace

    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, (str, bytes, range)):
            total += len(v)
            continue
        if isinstance(v, Namespace):
            v = object.__getattribute__(v, "_Namespace__attrs")
        if isinstance(v, Mapping):
            total += 1 + len(v)
            if total <= limit:
                stack.extend(v.keys())
                stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset, MappingView)):
            total += 1 + len(v)
            if total <= limit:
                stack.extend(v)
        else:
            total += 1
    return total


def _check_size(value, what: str):
    if _size(value) > RENDER_MAX_CHARS:
        raise _over(f"{what} of more than {RENDER_MAX_CHARS:,} characters")
    return value


def _check_ints(args, kwargs) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > RENDER_MAX_INT:
            raise _over(f"an integer argument {v} larger than {RENDER_MAX_INT:,}")


# '%-10.3s', '%*d', '%(name)08x': the numbers (or '*') that pad a %-formatted field
_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent_format(fmt: str, args) -> None:
    padding = sum(int(n) if n.isdigit() else RENDER_MAX_INT
                  for field in _PERCENT_FIELD.findall(fmt) for n in field if n)
    if len(fmt) + padding + _size(args) > RENDER_MAX_CHARS:
        raise _over(f"a %-format of more than {RENDER_MAX_CHARS:,} characters")


def _check_brace_format(fmt: str, args) -> None:
    from string import Formatter

    try:
        specs = [spec or "" for _, _, spec, _ in Formatter().parse(fmt)]
    except ValueError:
        return  # str.format raises the same error itself
    padding = sum(int(n) for spec in specs for n in re.findall(r"\d+", spec))
    if len(fmt) + padding + _size(args) > RENDER_MAX_CHARS:
        raise _over(f"a format() of more than {RENDER_MAX_CHARS:,} characters")


def _check_replace(text, old, new) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        count = text.count(old) if old else len(text) + 1
        if len(text) + count * len(new) > RENDER_MAX_CHARS:
            raise _over(f"a replace() of more than {RENDER_MAX_CHARS:,} characters")


# Filters whose result is no bigger than their input (up to a small factor): no size check.
_SMALL_FILTERS = frozenset({
    "abs", "attr", "batch", "bool", "capitalize", "count", "d", "default", "dictsort", "first",
    "float", "groupby", "int", "items", "last", "length", "list", "lower", "map", "max", "min",
    "random", "reject", "rejectattr", "reverse", "round", "safe", "select", "selectattr",
    "slice", "sort", "striptags", "title", "trim", "unique", "upper", "wordcount"})


def _guard_filter(name: str, func):
    """A filter that counts a step and refuses arguments that would build a huge value."""
    skip = 1 if hasattr(func, "jinja_pass_arg") else 0   # the context/environment argument

    @wraps(func)
    def guarded(*args, **kwargs):
        _step()
        value, rest = (args[skip] if len(args) > skip else None), args[skip + 1:]
        _check_ints(rest, kwargs)
        if name == "sum" and not isinstance(kwargs.get("start", rest[1] if len(rest) > 1 else 0),
                                            (int, float)):
            raise _over("sum() of lists or strings (quadratic)")
        if name == "replace" and len(rest) >= 2:
            _check_replace(value, rest[0], rest[1])
        elif name == "indent" and isinstance(value, str):
            width = rest[0] if rest else kwargs.get("width", 4)
            pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
            if len(value) + (value.count("\n") + 1) * pad > RENDER_MAX_CHARS:
                raise _over(f"an indent() of more than {RENDER_MAX_CHARS:,} characters")
        elif name == "format" and isinstance(value, str):
            _check_percent_format(value, (rest, kwargs))
        elif name not in _SMALL_FILTERS:
            _check_size((value, rest, kwargs), f"a value passed to |{name}")
        result = func(*args, **kwargs)
        if isinstance(result, (str, list, tuple)) and len(result) > RENDER_MAX_CHARS:
            raise _over(f"a |{name} result of more than {RENDER_MAX_CHARS:,} characters")
        return result

    return guarded


@lru_cache(maxsize=1)
def _environment():
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import pass_context
    from jinja2.visitor import NodeTransformer

    class StepEveryLoop(NodeTransformer):
        """`{% for x in xs %}` iterates `xs|_ivl_steps` (one step per item); `a ~ b` becomes
        `[a, b]|_ivl_concat` (size-checked). Neither can be reached by another hook."""

        def visit_For(self, node):
            self.generic_visit(node)
            node.iter = nodes.Filter(node.iter, "_ivl_steps", [], [], None, None,
                                     lineno=node.iter.lineno)
            return node

        def visit_Concat(self, node):
            self.generic_visit(node)
            return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), "_ivl_concat",
                                [], [], None, None, lineno=node.lineno)

    @pass_context   # pass_context: never folded at compile time
    def steps(context, iterable):
        for item in iterable:
            _step()
            yield item

    @pass_context
    def concat(context, parts):
        _check_size(parts, "a string joined with ~")
        return "".join(map(str, parts))

    def budget_range(*args):
        _check_ints(args, {})
        r = range(*args)
        if len(r) > RENDER_MAX_INT:
            raise _over(f"a range() of more than {RENDER_MAX_INT:,} items")
        return r

    class BudgetSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"+", "*", "%", "**"})

        def __init__(self) -> None:
            super().__init__(trim_blocks=True, lstrip_blocks=True,
                             finalize=lambda v: _check_size(v, "a printed value"))
            self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
            self.filters["_ivl_steps"], self.filters["_ivl_concat"] = steps, concat
            self.globals.pop("lipsum", None)          # lipsum(n=...) writes pages of text
            self.globals["range"] = budget_range
            self.globals["raise_exception"] = _raise
            self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)

        def _parse(self, source, name, filename):
            tree = StepEveryLoop().visit(super()._parse(source, name, filename))
            tree.set_environment(self)
            return tree

        def is_safe_attribute(self, obj, attr, value):
            # str.expandtabs / translate multiply a string by an argument's size
            if isinstance(obj, str) and attr in ("expandtabs", "translate", "maketrans"):
                return False
            return super().is_safe_attribute(obj, attr, value)

        def getattr(self, obj, attribute):
            _step()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _step()
            return super().getitem(obj, argument)

        def call_binop(self, context, operator, left, right):
            _step()
            number = (int, float)
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
                if right * max(1, abs(left).bit_length() - 1) > RENDER_MAX_CHARS:
                    raise _over(f"a power of more than {RENDER_MAX_CHARS:,} bits")
            elif operator == "*":
                if isinstance(left, int) and isinstance(right, int):
                    if left.bit_length() + right.bit_length() > RENDER_MAX_CHARS:
                        raise _over(f"a product of more than {RENDER_MAX_CHARS:,} bits")
                elif isinstance(left, number) or isinstance(right, number):
                    seq, times = (right, left) if isinstance(left, number) else (left, right)
                    if isinstance(times, int) and times > 0 and _size(seq) * times > RENDER_MAX_CHARS:
                        raise _over(f"a repetition of more than {RENDER_MAX_CHARS:,} characters")
            elif operator == "%" and isinstance(left, str):
                _check_percent_format(left, right)
            elif operator == "+" and not (isinstance(left, number) and isinstance(right, number)):
                if _size(left) + _size(right) > RENDER_MAX_CHARS:
                    raise _over(f"a sum of more than {RENDER_MAX_CHARS:,} characters")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):   # noqa: N805 (Jinja's signature)
            _step()
            _check_ints(args, kwargs)
            method = getattr(__obj, "__wrapped__", __obj)   # str.format comes wrapped
            owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
            if isinstance(owner, str):
                if name == "replace" and len(args) >= 2:
                    _check_replace(owner, args[0], args[1])
                elif name in ("format", "format_map"):
                    _check_brace_format(owner, (args, kwargs))
                elif name == "join":
                    _check_size((owner, args), "a join()")
                    if args and len(owner) * _size(args[0], RENDER_MAX_CHARS) > RENDER_MAX_CHARS:
                        raise _over(f"a join() of more than {RENDER_MAX_CHARS:,} characters")
            result = super().call(__context, __obj, *args, **kwargs)
            if isinstance(result, (str, list, tuple)) and len(result) > RENDER_MAX_CHARS:
                raise _over(f"a {name or 'call'}() result of more than {RENDER_MAX_CHARS:,} characters")
            return result

    return BudgetSandbox()


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateSyntaxError

    try:
        return _environment().from_string(template)
    except TemplateSyntaxError as e:
        raise ConfigError(f"chat template of the model has a syntax error at line {e.lineno}: "
                          f"{e.message}") from None
    except Exception as e:  # a template that breaks the compiler itself (nesting too deep)
        raise ConfigError(f"chat template of the model cannot be compiled: "
                          f"{type(e).__name__}: {e}") from None


def check_template(template) -> str | None:
    """The template text, or None for the fallback format; ConfigError if it is not one."""
    if template is None or template == "":
        return None
    if not isinstance(template, str):
        raise ConfigError("chat template of the model is not text (tokenizer.chat_template in the "
                          f"model file holds a value of type {type(template).__name__})")
    if len(template) > TEMPLATE_MAX_CHARS:
        raise ConfigError(f"chat template of the model is {len(template):,} characters long "
                          f"(at most {TEMPLATE_MAX_CHARS:,})")
    return template


def validate_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ConfigError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ConfigError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}")


def render_messages(messages: list[dict], template: str | None = None, *, bos_token: str = "",
                    eos_token: str = "", add_generation_prompt: bool = True) -> str:
    """Render a conversation. `template=None` uses FALLBACK_TEMPLATE.

    The result does not start with a BOS token unless the template writes one; the
    tokenizer adds BOS where the model wants it (callers pass `bos_token=""` then).
    Raises ConfigError for a template that is broken or exceeds the rendering budget.
    """
    validate_messages(messages)
    n_chars = sum(len(m["content"]) for m in messages)
    if n_chars > RENDER_MAX_CHARS // 4:
        raise ContextOverflowError(f"the conversation is {n_chars:,} characters long, far more "
                                   "than a context window holds")
    compiled = _compile(check_template(template) or FALLBACK_TEMPLATE)
    _active.budget = budget = _Budget()
    pieces, n_chars = [], 0
    try:
        for piece in compiled.generate(messages=messages, bos_token=bos_token,
                                       eos_token=eos_token,
                                       add_generation_prompt=add_generation_prompt):
            budget.step()
            n_chars += len(piece)
            if n_chars > RENDER_MAX_CHARS:
                raise _over(f"an output of more than {RENDER_MAX_CHARS:,} characters")
            pieces.append(piece)
    except ConfigError:
        raise
    except Exception as e:  # a broken template in a model file (RecursionError, MemoryError too)
        raise ConfigError(f"chat template of the model failed to render: "
                          f"{type(e).__name__}: {e}") from None
    finally:
        _active.budget = None
    return "".join(pieces)


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
