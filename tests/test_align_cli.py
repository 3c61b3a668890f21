"""`ivl align` on the real models: writes a map the Engine's loader accepts; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from ivl_local.cli.main import app


def test_align_missing_corpus_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["align", "smollm2-135m", "smollm2-135m",
                                      "--corpus", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "m.npz")])
    assert result.exit_code == 1
    assert "no such corpus file" in result.output and "Traceback" not in result.output


def test_align_missing_output_folder(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n")
    result = CliRunner().invoke(app, ["align", "smollm2-135m", "smollm2-135m", "--corpus", str(corpus),
                                      "-o", str(tmp_path / "missing" / "m.npz")])
    assert result.exit_code == 2
    assert "output folder does not exist" in result.output


@pytest.mark.real
def test_align_writes_a_loadable_map(tmp_path, gemma3_path, smollm2_path):
    from ivl_local.valuefile import read_gguf_header
    from ivl_local.vocab import load_map, read_vocab

    out = tmp_path / "map.npz"
    result = CliRunner().invoke(app, ["align", str(gemma3_path), str(smollm2_path),
                                      "--max-bytes", "4000", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    mapping = load_map(out, read_vocab(read_gguf_header(gemma3_path)),
                       read_vocab(read_gguf_header(smollm2_path)))
    assert mapping.builder == "aligned"
    mapped = mapping.token_map >= 0
    assert 0 < mapped.sum() < len(mapping.token_map)
    assert np.all((mapping.token_weights[mapped] > 0) & (mapping.token_weights[mapped] <= 1))
