"""The interactive chat session: a prompt loop, streamed answers and slash commands.

    session = ChatSession(engine, base_path=..., value_path=..., system=None,
                          sampling=SamplingConfig(), max_tokens=512)
    session.run()      # returns on /quit or Ctrl-D

`engine` may be None with a `loader` (BackgroundLoad) that is still loading it: the prompt
shows at once and the first line entered waits for the engine.

The conversation is a list of {"role", "content"} messages rendered with the base's chat
template by `engine.chat_deltas`. Ctrl-C during an answer stops it and keeps the partial
answer (marked "interrupted" in saved files); Ctrl-C at the prompt clears the line.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

from ..config import SamplingConfig, check_alpha, check_flag, check_max_tokens
from ..errors import ConfigError, ContextOverflowError, GenerationCancelled, IVLError
from ._common import describe_os_error, print_error
from .prompt_keys import CTRL_C_MARK, bind_ctrl_c, ctrl_c_as_key, ctrl_c_cancels, forget_last_history_item

SAVE_FORMAT = "ivl-chat/1"
MAX_SAVE_BYTES = 64 << 20       # a saved conversation far past any context window is not one
HISTORY_FILE = "chat_history"   # typed prompts, under models.cache_dir()
HISTORY_LENGTH = 1000


@dataclass
class SlashCommand:
    name: str
    usage: str
    help: str
    run: Callable[[str], bool | None]   # returns True to end the session


def stats_line(stats) -> str:
    """One line of timings for the last answer (tolerates missing fields)."""
    def get(name, default=None):
        return getattr(stats, name, default) if stats is not None else default

    parts = []
    if get("completion_tokens") is not None:
        parts.append(f"{get('completion_tokens')} tokens")
    if get("tokens_per_s"):
        parts.append(f"{get('tokens_per_s'):.1f} tok/s")
    if get("time_to_first_token_s") is not None:
        parts.append(f"first token {get('time_to_first_token_s') * 1000:.0f} ms")
    if get("prefill_s") is not None and get("prompt_tokens") is not None:
        parts.append(f"prefill {get('prompt_tokens')} tokens in {get('prefill_s') * 1000:.0f} ms")
    if get("context_used") is not None and get("n_ctx"):
        parts.append(f"context {get('context_used')}/{get('n_ctx')}")
    if get("drafted"):
        parts.append(f"drafts {get('accepted')}/{get('drafted')} accepted")
    return "[" + ", ".join(parts) + "]" if parts else "[no statistics yet]"


def read_saved_conversation(path: Path) -> tuple[str | None, list[dict], dict]:
    """(system prompt, user/assistant turns, settings) of a file written by /save, checked:
    ConfigError for anything else (not JSON, not UTF-8, nested too deeply, wrong shapes)."""
    from ..chat_template import validate_messages

    not_saved = f"{path} is not a conversation saved with /save"
    with open(path, "rb") as f:                       # OSError: reported by dispatch
        raw = f.read(MAX_SAVE_BYTES + 1)
    if len(raw) > MAX_SAVE_BYTES:
        raise ConfigError(f"{not_saved} (larger than {MAX_SAVE_BYTES >> 20} MiB)")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{not_saved} (not UTF-8 text)") from None
    except RecursionError:
        raise ConfigError(f"{not_saved} (JSON nested too deeply)") from None
    except ValueError:
        raise ConfigError(not_saved) from None
    if (not isinstance(data, dict) or data.get("format", SAVE_FORMAT) != SAVE_FORMAT
            or not isinstance(data.get("messages"), list)
            or not isinstance(data.get("settings", {}), (dict, type(None)))):
        raise ConfigError(not_saved)
    messages, settings = data["messages"], data.get("settings") or {}
    if messages:
        try:
            validate_messages(messages)
            for m in messages:
                m["content"].encode("utf-8")          # JSON can carry lone surrogates
                if not isinstance(m.get("interrupted", False), bool):
                    raise ConfigError("'interrupted' must be true or false")
        except (ConfigError, UnicodeEncodeError) as e:
            raise ConfigError(f"{not_saved} ({e})") from None
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if any(m["role"] == "system" for m in messages):
        raise ConfigError(f"{path}: only the first message may be a system message")
    turns = [{k: m[k] for k in ("role", "content", "interrupted") if k in m} for m in messages]
    return system, turns, settings


class ChatSession:
    def __init__(self, engine, *, base_path: Path, value_path: Path | None, system: str | None,
                 sampling: SamplingConfig, max_tokens: int, verbose: bool = False,
                 debug: bool = False, console=None, use_readline: bool = True,
                 loader=None) -> None:
        from rich.console import Console

        self.engine = engine
        self.loader = loader
        self.base_path = base_path
        self.value_path = value_path
        self.system = system
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.verbose = verbose
        self.debug = debug
        self.console = console or Console(highlight=False)
        self.use_readline = use_readline
        self._ctrl_c_bound = False     # set by _start_readline: Ctrl-C read as a key at the prompt
        self.messages: list[dict] = []       # user/assistant turns (system kept apart)
        self.commands = {c.name: c for c in self._command_table()}

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        history = self._start_readline() if self.use_readline else None
        self._banner()
        try:
            while True:
                try:
                    if self._turn():
                        return
                except KeyboardInterrupt:  # Ctrl-C between an answer and the prompt
                    print()
        finally:
            if history is not None:
                history()

    def _turn(self) -> bool:
        """Read one line and act on it; True ends the session."""
        try:
            line = self._read_line()
        except EOFError:               # Ctrl-D
            print()
            return True
        if line is None:               # Ctrl-C at the prompt: the line is dropped
            return False
        line = line.strip()
        if not line:
            return False
        if self.engine is None and line.lower() in ("/quit", "/exit"):
            return True  # no need to wait for the models just to leave
        if self.engine is None:  # a loading error ends the session (the CLI prints it)
            self.engine = self.loader.result(self.console)
        if line.startswith("/"):
            return self.dispatch(line)
        self.ask(line)
        return False

    def _read_line(self) -> str | None:
        """The next typed line, or None when Ctrl-C dropped it."""
        try:
            with ctrl_c_as_key(sys.stdin, self._ctrl_c_bound):
                line = input(self._prompt_text())
        except KeyboardInterrupt:      # Ctrl-C as a signal (no readline, or libedit)
            print()
            return None
        if not line.endswith(CTRL_C_MARK):
            return line
        forget_last_history_item(CTRL_C_MARK)   # the dropped line stays out of the history
        return None

    def dispatch(self, line: str) -> bool:
        name, _, arg = line[1:].partition(" ")
        command = self.commands.get(name.lower())
        if command is None:
            print_error(f"unknown command /{name}", "/help lists the commands")
            return False
        try:
            with ctrl_c_cancels(self.engine):
                return bool(command.run(arg.strip()))
        except (KeyboardInterrupt, GenerationCancelled):   # Ctrl-C (see _answer)
            self.console.print("\n[yellow]cancelled[/]")
        except IVLError as e:
            self._report(e)
        except OSError as e:
            print_error(describe_os_error(e))
        return False

    def ask(self, text: str) -> None:
        """Add a user turn and stream the answer to it."""
        self.messages.append({"role": "user", "content": text})
        self._answer()

    def conversation(self, messages: list[dict] | None = None) -> list[dict]:
        """What the engine sees: the system prompt plus clean {role, content} turns."""
        turns = self.messages if messages is None else messages
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in turns]

    def _answer(self) -> None:
        parts: list[str] = []
        out = sys.stdout
        try:
            with ctrl_c_cancels(self.engine):
                for delta in self.engine.chat_deltas(self.conversation(), max_tokens=self.max_tokens,
                                                     sampling=self.sampling):
                    parts.append(delta)
                    out.write(delta)
                    out.flush()
        except (KeyboardInterrupt, GenerationCancelled):   # Ctrl-C; the cancel when Python lost the raise
            text = "".join(parts).rstrip()
            self.messages.append({"role": "assistant", "content": text, "interrupted": True})
            self.console.print(" [yellow]\\[interrupted][/]" if text else "[yellow]\\[interrupted][/]")
            return
        except IVLError as e:
            self.messages.pop()             # the question was not answered: forget it
            if parts:
                print()
            self._report(e)
            return
        text = "".join(parts)
        self.messages.append({"role": "assistant", "content": text})
        if not text.endswith("\n"):
            print()
        self._note_cut(self.engine.stats)
        if self.verbose:
            self.console.print(f"[dim]{stats_line(self.engine.stats)}[/]")

    def _note_cut(self, stats) -> None:
        """Say why an answer ended early: --max-tokens, or a full context window."""
        if getattr(stats, "finish_reason", None) != "length":
            return
        used, n_ctx = getattr(stats, "context_used", 0), getattr(stats, "n_ctx", 0)
        if n_ctx and used >= n_ctx - 1:
            self.console.print("[yellow]\\[context full: /reset starts a new conversation][/]")
        else:
            self.console.print(f"[dim]\\[cut at {self.max_tokens} tokens (--max-tokens)][/]")

    def _report(self, e: IVLError) -> None:
        if self.debug:
            import traceback

            traceback.print_exc()
        hint = "type /reset to start a new conversation" if isinstance(e, ContextOverflowError) else None
        print_error(str(e), hint)

    # --- slash commands ---------------------------------------------------------------------

    def _command_table(self) -> list[SlashCommand]:
        return [
            SlashCommand("help", "/help", "this list", self.cmd_help),
            SlashCommand("reset", "/reset", "forget the conversation (keeps the system prompt)", self.cmd_reset),
            SlashCommand("system", "/system [TEXT|none]", "show, set or clear the system prompt", self.cmd_system),
            SlashCommand("alpha", "/alpha [X]", "show or set the value network's scale (0 = base alone)", self.cmd_alpha),
            SlashCommand("value", "/value [on|off]", "switch the value network on or off", self.cmd_value),
            SlashCommand("weight", "/weight [N X]", "list the composed terms, or set term N's weight", self.cmd_weight),
            SlashCommand("compare", "/compare", "answer the last prompt with and without the value network", self.cmd_compare),
            SlashCommand("save", "/save [FILE]", "save the conversation and settings as JSON", self.cmd_save),
            SlashCommand("load", "/load FILE", "load a conversation saved with /save", self.cmd_load),
            SlashCommand("stats", "/stats", "speed and context use of the last answer", self.cmd_stats),
            SlashCommand("quit", "/quit", "leave (also /exit or Ctrl-D)", self.cmd_quit),
            SlashCommand("exit", "/exit", "", self.cmd_quit),
        ]

    def cmd_help(self, arg: str) -> None:
        from rich.table import Table

        table = Table(show_header=False, box=None, padding=(0, 2))
        for c in self.commands.values():
            if c.help:
                table.add_row(f"[bold]{c.usage}[/]", c.help)
        table.add_row("[bold]Ctrl-C[/]", "stop an answer (keeps it) / clear the line")
        self.console.print(table)

    def cmd_reset(self, arg: str) -> None:
        self.messages.clear()
        self.console.print("[dim]conversation cleared[/]")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            self.console.print(f"system prompt: {self.system!r}" if self.system else "no system prompt")
            return
        self.system = None if arg.lower() == "none" else arg
        self.console.print("[dim]system prompt cleared[/]" if self.system is None else "[dim]system prompt set[/]")

    def cmd_alpha(self, arg: str) -> None:
        if arg:
            try:
                alpha = float(arg)
            except ValueError:
                raise ConfigError(f"/alpha needs a number, got {arg!r}") from None
            self.engine.alpha = check_alpha(alpha)
        note = "" if self.engine.has_value else " (no value network loaded: it has no effect)"
        self.console.print(f"alpha = {self.engine.alpha:g}{note}")

    def cmd_weight(self, arg: str) -> None:
        terms = getattr(self.engine, "terms", [])
        if not terms:
            self.console.print("no terms loaded (start with --value, --expert/--anti-expert, "
                               "--cfg-scale or --amateur)")
            return
        if arg:
            parts = arg.split()
            try:
                index, weight = int(parts[0]), float(parts[1])
                if len(parts) != 2:
                    raise ValueError
            except (ValueError, IndexError):
                raise ConfigError(f"/weight needs a term number and a weight, got {arg!r}") from None
            if not 1 <= index <= len(terms):
                raise ConfigError(f"/weight: there are terms 1 to {len(terms)}, got {index}")
            terms[index - 1].weight = weight   # the term checks it (a value net's as an alpha)
        for i, term in enumerate(terms, 1):
            self.console.print(f"{i}. {term.kind} {term.name}: weight {term.weight:g}")

    def cmd_value(self, arg: str) -> None:
        if not self.engine.has_value:
            self.console.print("no value network loaded (started with --value none)")
            return
        if arg:
            if arg.lower() not in ("on", "off"):
                raise ConfigError("/value takes on or off")
            self.engine.value_enabled = arg.lower() == "on"
        self.console.print(f"value network {'on' if self.engine.value_enabled else 'off'} "
                           f"(alpha = {self.engine.alpha:g})")

    def cmd_compare(self, arg: str) -> None:
        from rich.table import Table

        if not self.engine.has_value:
            self.console.print("no value network loaded: nothing to compare (started with --value none)")
            return
        last_user = max((i for i, m in enumerate(self.messages) if m["role"] == "user"), default=None)
        if last_user is None:
            self.console.print("nothing to compare yet: ask something first")
            return
        turns = self.messages[: last_user + 1]
        # The same seed for both answers, so the value network is the only difference.
        sampling = self.sampling if self.sampling.seed is not None else \
            self.sampling.with_(seed=random.randrange(2**31))
        answers = {}
        was_enabled = self.engine.value_enabled
        try:
            for label, enabled in (("with value", True), ("base alone", False)):
                self.engine.value_enabled = enabled
                with self.console.status(f"answering {label}...", spinner="dots"):
                    answers[label] = "".join(self.engine.chat_deltas(
                        self.conversation(turns), max_tokens=self.max_tokens, sampling=sampling)).strip()
        finally:
            self.engine.value_enabled = was_enabled
        table = Table(expand=True, show_lines=False)
        table.add_column(f"with value (alpha {self.engine.alpha:g})", ratio=1)
        table.add_column("base alone", ratio=1)
        table.add_row(answers["with value"], answers["base alone"])
        self.console.print(table)

    def cmd_save(self, arg: str) -> None:
        from ..atomic import atomic_write

        path = Path(arg).expanduser() if arg else Path(time.strftime("chat-%Y%m%d-%H%M%S.json"))
        data = {
            "format": SAVE_FORMAT,
            "messages": ([{"role": "system", "content": self.system}] if self.system else []) + self.messages,
            "settings": self.settings(),
        }
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        self.console.print(f"[dim]saved {len(self.messages)} messages to {path}[/]")

    def settings(self) -> dict:
        return {
            "base": str(self.base_path),
            "value": str(self.value_path) if self.value_path else None,
            "alpha": self.engine.alpha,
            "value_enabled": self.engine.value_enabled,
            "max_tokens": self.max_tokens,
            "sampling": asdict(self.sampling),
        }

    def cmd_load(self, arg: str) -> None:
        """Everything in the file is checked before anything is applied: a file with one bad
        setting changes nothing."""
        if not arg:
            raise ConfigError("/load needs a file name")
        path = Path(arg).expanduser()
        system, messages, settings = read_saved_conversation(path)
        sampling, max_tokens = self.sampling, self.max_tokens
        alpha = value_enabled = None
        try:
            if settings.get("sampling") is not None:
                if not isinstance(settings["sampling"], dict):
                    raise ConfigError("sampling must be an object")
                known = {f.name for f in fields(SamplingConfig)}
                sampling = SamplingConfig(**{k: v for k, v in settings["sampling"].items() if k in known})
            if "max_tokens" in settings:
                max_tokens = check_max_tokens(settings["max_tokens"])
            if settings.get("alpha") is not None:
                alpha = check_alpha(settings["alpha"])
            if settings.get("value_enabled") is not None:
                value_enabled = check_flag(settings["value_enabled"], "value_enabled")
            for key in ("base", "value"):
                if not isinstance(settings.get(key), (str, type(None))):
                    raise ConfigError(f"{key} must be a file name")
        except ConfigError as e:
            raise ConfigError(f"{path}: invalid setting: {e}") from None
        # All checked: apply.
        self.sampling, self.max_tokens = sampling, max_tokens
        if self.engine.has_value:
            if alpha is not None:
                self.engine.alpha = alpha
            if value_enabled is not None:
                self.engine.value_enabled = value_enabled
        self.system = system
        self.messages = messages
        self.console.print(f"[dim]loaded {len(self.messages)} messages from {path}[/]")
        if settings.get("base") and settings["base"] != str(self.base_path):
            self.console.print(f"[dim]note: it was saved with base {settings['base']}[/]")

    def cmd_stats(self, arg: str) -> None:
        from rich.table import Table

        stats = self.engine.stats
        if stats is None or not getattr(stats, "completion_tokens", 0):
            self.console.print("no answer yet")
            return
        rows = [
            ("prompt tokens", "prompt_tokens", "{}"),
            ("answer tokens", "completion_tokens", "{}"),
            ("prefill", "prefill_s", "{:.3f} s"),
            ("time to first token", "time_to_first_token_s", "{:.3f} s"),
            ("decode speed", "tokens_per_s", "{:.1f} tokens/s"),
            ("base decode", "base_decode_s", "{:.3f} s"),
            ("value decode", "value_decode_s", "{:.3f} s"),
            ("fuse + sample", "fuse_sample_s", "{:.4f} s"),
            ("finish reason", "finish_reason", "{}"),
        ]
        table = Table(show_header=False, box=None, padding=(0, 2))
        for label, name, fmt in rows:
            v = getattr(stats, name, None)
            if v is not None:
                table.add_row(label, fmt.format(v))
        used, n_ctx = getattr(stats, "context_used", None), getattr(stats, "n_ctx", None)
        if used is not None and n_ctx:
            table.add_row("context used", f"{used} of {n_ctx} tokens ({100 * used / n_ctx:.0f} %)")
        self.console.print(table)

    def cmd_quit(self, arg: str) -> bool:
        return True

    # --- terminal chrome --------------------------------------------------------------------

    def _banner(self) -> None:
        value = self.value_path.name if self.value_path else "none (base alone)"
        alpha = f", alpha {self.engine.alpha:g}" if self.engine is not None and self.engine.has_value else ""
        self.console.print(f"[bold]ivl-chat[/]  base [cyan]{self.base_path.name}[/]  "
                           f"value [cyan]{value}[/]{alpha}")
        self.console.print("[dim]/help for commands, Ctrl-C stops an answer, Ctrl-D quits[/]")

    def _prompt_text(self) -> str:
        if self.console.is_terminal and not self.console.no_color:
            # \001..\002 tell readline the escape codes take no room on the line
            return "\001\033[1;32m\002you>\001\033[0m\002 "
        return "you> "

    def _start_readline(self) -> Callable[[], None] | None:
        """Line editing and a persistent history of typed prompts; returns the saver."""
        if not sys.stdin.isatty():
            return None
        try:
            import readline
        except ImportError:  # e.g. Windows without pyreadline
            return None
        from ..models import cache_dir

        path = cache_dir() / HISTORY_FILE
        try:
            readline.read_history_file(path)
        except OSError:
            pass
        readline.set_history_length(HISTORY_LENGTH)
        self._ctrl_c_bound = bind_ctrl_c(readline)

        def save() -> None:
            try:
                readline.write_history_file(path)
            except OSError:
                pass
        return save
