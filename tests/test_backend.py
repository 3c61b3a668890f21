"""llama.cpp's extra weight buffers (AMX, CPU repack) and the guard against its AMX crash."""

from __future__ import annotations

import numpy as np
import pytest

from ivl_local import backend


@pytest.fixture
def fresh_guard(monkeypatch):
    monkeypatch.delenv("IVL_LLAMA_EXTRA_BUFFERS", raising=False)
    backend.extra_buffers_allowed.cache_clear()
    yield monkeypatch
    backend.extra_buffers_allowed.cache_clear()


@pytest.mark.parametrize("info, allowed", [
    (b"CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 | ", False),
    (b"CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | REPACK = 1 | ", True),
    (b"CPU : NEON = 1 | ARM_FMA = 1 | REPACK = 1 | ", True),
])
def test_extra_buffers_are_off_exactly_when_the_build_has_amx(fresh_guard, info, allowed):
    fresh_guard.setattr(backend.C, "llama_print_system_info", lambda: info)
    assert backend.extra_buffers_allowed() is allowed
    assert backend.model_params(vocab_only=True).use_extra_bufts is allowed
    assert backend.model_params(vocab_only=True).vocab_only


@pytest.mark.parametrize("env, allowed", [("0", False), ("1", True)])
def test_the_environment_overrides_the_guard(fresh_guard, env, allowed):
    fresh_guard.setenv("IVL_LLAMA_EXTRA_BUFFERS", env)
    fresh_guard.setattr(backend.C, "llama_print_system_info", lambda: b"AMX_INT8 = 1 | AVX2 = 1")
    assert backend.extra_buffers_allowed() is allowed


def test_llama_objects_built_inside_the_guard_get_its_params(fresh_guard, smollm2_path):
    """llama_cpp.Llama reads llama_model_default_params(); inside safe_llama_params() it gets
    the guarded ones, and outside it the original function is back."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    fresh_guard.setenv("IVL_LLAMA_EXTRA_BUFFERS", "0")
    original = low.llama_model_default_params
    with backend.safe_llama_params():
        llm = llama_cpp.Llama(str(smollm2_path), n_ctx=64, verbose=False, n_threads=1)
    try:
        assert low.llama_model_default_params is original
        assert llm.model_params.use_extra_bufts is False
        tokens = llm.tokenize(b"Hello there", add_bos=True, special=True)
        llm.eval(tokens)   # decodes (on an AMX build with extra buffers this is where it died)
        assert np.isfinite(np.asarray(llm.scores[len(tokens) - 1])).all()
    finally:
        llm.close()


@pytest.mark.real
def test_an_engine_left_open_at_exit_prints_no_traceback(smollm2_path, tmp_path):
    """An app that never closes its Engine: at interpreter shutdown llama_cpp's functions may
    already be gone, and freeing then printed "Exception ignored in __del__ ... TypeError"."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "left_open.py"
    script.write_text(
        "from ivl_local.eval.task import load_split\n"
        "from ivl_local.engine import Engine\n"
        "from ivl_local.config import GREEDY\n"
        f"engine = Engine({str(smollm2_path)!r}, None, n_ctx=512, n_threads=1)\n"
        "messages = load_split('test', task='ifeval')[0].prompt_messages\n"
        "print(engine.chat(messages, max_tokens=2, sampling=GREEDY)['choices'][0]['message']['content'])\n")
    import ivl_local

    # the ivl_local this test imported: the source tree here, the installed package in CI
    home = Path(ivl_local.__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(home), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr[-2000:]
