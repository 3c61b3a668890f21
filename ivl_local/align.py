"""Corpus-aligned token maps (the paper's cross-vocabulary builder).

    from ivl_local.align import build_aligned_map
    build_aligned_map("gemma3-270m", "value.ivl.gguf", "data/corpus/corpus.txt", "map.npz")
    Engine("gemma3-270m", "value.ivl.gguf", token_map="map.npz")

How: every paragraph of the corpus is tokenized by both tokenizers (llama.cpp, no special
tokens). The two token sequences are aligned by dynamic time warping whose cost is the edit
distance between the tokens' texts (spaces removed), ten times cheaper when one text contains
the other (`token_cost`). Each aligned (base token, value token) pair is counted; per base
token the counts are normalised to shares, and the map keeps the value token with the largest
share, the share being its weight in [0, 1]. Base tokens the corpus never aligned map to -1
(the value network adds nothing to them). So the map is only as good as the corpus covers
the text the models will see: build it from text like the task's.

The DTW is banded: a base token may only align with value tokens whose byte spans lie within
`band` bytes of its own (both tokenizations cover the same bytes), so a paragraph costs
O(tokens x band) edit distances, each cached. Rows are filled with a vectorised prefix-minimum
(D[i, j] = P[j] + min_{k<=j}(A[k] - P[k-1]), P the row's cumulative cost, A the best entry
from the row above), so Python only loops over rows and the traceback.

The `.npz` has the keys vocab.load_map reads (token_map int32, token_weights float32,
base_fingerprint, value_fingerprint, builder="aligned") plus the corpus's sha256 and size.
"""

from __future__ import annotations

import hashlib
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import DataError, VocabMismatchError
from .models import resolve_model

log = logging.getLogger(__name__)

ALIGNED_BUILDER = "aligned"
CONTAIN_DISCOUNT = 0.1     # cost factor when one token's text contains the other's (official code)
DEFAULT_BAND = 24          # bytes of slack around a token's span for its DTW candidates
MAX_DOC_BYTES = 2000       # paragraphs are cut at whitespace into pieces at most this long


# --- cost ---------------------------------------------------------------------------------

def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute, each 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


@lru_cache(maxsize=1 << 20)
def token_cost(base_text: str, value_text: str) -> float:
    """Edit distance of the two tokens' texts without spaces, discounted on containment."""
    a, b = base_text.replace(" ", ""), value_text.replace(" ", "")
    distance = levenshtein(a, b)
    return distance * CONTAIN_DISCOUNT if (a in b or b in a) else float(distance)


# --- banded DTW -------------------------------------------------------------------------

def band_limits(base_offsets: np.ndarray, value_offsets: np.ndarray, band: int) -> tuple[np.ndarray, np.ndarray]:
    """Per base token i, the value columns [lo[i], hi[i]) it may align with.

    Offsets are cumulative byte positions (length n+1 / m+1). The band is widened where
    needed so that (0, 0) and (n-1, m-1) are inside and consecutive rows connect."""
    n, m = len(base_offsets) - 1, len(value_offsets) - 1
    start, end = base_offsets[:-1], base_offsets[1:]
    lo = np.searchsorted(value_offsets[1:], start - band, side="right")   # first j ending after
    hi = np.searchsorted(value_offsets[:-1], end + band, side="left")     # j starting before
    lo = np.clip(lo, 0, m - 1)
    hi = np.clip(hi, 1, m)
    lo[0], hi[-1] = 0, m
    lo = np.maximum.accumulate(lo)
    hi = np.maximum.accumulate(np.maximum(hi, lo + 1))
    lo[1:] = np.minimum(lo[1:], hi[:-1])                                  # rows connect
    return lo.astype(np.int64), hi.astype(np.int64)


def dtw_path(cost: list[np.ndarray], lo: np.ndarray, hi: np.ndarray, m: int) -> list[tuple[int, int]]:
    """Minimum-cost monotone path from (0, 0) to (n-1, m-1) through the band.

    cost[i] holds the costs of columns lo[i]..hi[i]-1 of row i. Moves: right, down, diagonal.
    """
    n = len(cost)
    rows: list[np.ndarray] = []
    previous = np.full(m + 1, np.inf)    # previous[j + 1] = D[i-1, j]; previous[0] = D[i-1, -1]
    previous[0] = 0.0                    # virtual start D[-1, -1] = 0
    for i in range(n):
        cols = np.arange(lo[i], hi[i])
        entry = np.minimum(previous[cols + 1], previous[cols])   # from above, from the diagonal
        prefix = np.cumsum(cost[i])
        before = np.concatenate(([0.0], prefix[:-1]))
        row = prefix + np.minimum.accumulate(entry - before)
        rows.append(row)
        previous = np.full(m + 1, np.inf)
        previous[cols + 1] = row

    def at(i: int, j: int) -> float:
        return rows[i][j - lo[i]] if i >= 0 and j >= 0 and lo[i] <= j < hi[i] else np.inf

    i, j = n - 1, m - 1
    if not np.isfinite(at(i, j)):
        raise AssertionError("DTW band does not reach the end")
    path = [(i, j)]
    while (i, j) != (0, 0):
        moves = ((at(i - 1, j - 1), i - 1, j - 1), (at(i - 1, j), i - 1, j), (at(i, j - 1), i, j - 1))
        _, i, j = min(moves, key=lambda move: move[0])   # ties: diagonal first
        path.append((i, j))
    path.reverse()
    return path


# --- corpus -------------------------------------------------------------------------------

def corpus_documents(text: str, max_doc_bytes: int = MAX_DOC_BYTES) -> list[str]:
    """Paragraphs (blank-line separated), long ones cut at whitespace."""
    docs = []
    for paragraph in text.split("\n\n"):
        paragraph = paragraph.strip("\n")
        while len(paragraph.encode("utf-8")) > max_doc_bytes:
            cut = paragraph.rfind(" ", 0, max_doc_bytes // 2)
            cut = cut if cut > 0 else max_doc_bytes // 2
            docs.append(paragraph[:cut])
            paragraph = paragraph[cut:]
        if paragraph.strip():
            docs.append(paragraph)
    return docs


class _Side:
    """One tokenizer: token ids, piece texts (cached) and byte offsets of a text."""

    def __init__(self, path: Path):
        from .backend import Model

        self.model = Model(path, vocab_only=True)
        self.vocab = self.model.vocab
        self._pieces: dict[int, tuple[str, int]] = {}

    def encode(self, text: str) -> tuple[list[int], list[str], np.ndarray]:
        ids = self.vocab.tokenize(text, add_special=False, parse_special=False)
        texts, lengths = [], []
        for t in ids:
            if t not in self._pieces:
                raw = self.vocab.piece(t)
                self._pieces[t] = (raw.decode("utf-8", "replace"), len(raw))
            piece, size = self._pieces[t]
            texts.append(piece)
            lengths.append(size)
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.float64)
        return ids, texts, offsets

    def close(self) -> None:
        self.model.close()


def align_document(text: str, base: _Side, value: _Side, band: int = DEFAULT_BAND,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base ids, value ids, costs) of every aligned pair on the DTW path of one document."""
    base_ids, base_texts, base_off = base.encode(text)
    value_ids, value_texts, value_off = value.encode(text)
    if not base_ids or not value_ids:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
    # Both cover the same bytes; rescale so a tokenizer's added prefix space cannot drift the band.
    value_off = value_off * (base_off[-1] / value_off[-1]) if value_off[-1] > 0 else value_off
    lo, hi = band_limits(base_off, value_off, band)
    cost = [np.array([token_cost(base_texts[i], value_texts[j]) for j in range(lo[i], hi[i])])
            for i in range(len(base_ids))]
    path = dtw_path(cost, lo, hi, len(value_ids))
    b = np.fromiter((base_ids[i] for i, _ in path), np.int64, len(path))
    v = np.fromiter((value_ids[j] for _, j in path), np.int64, len(path))
    c = np.fromiter((cost[i][j - lo[i]] for i, j in path), np.float64, len(path))
    return b, v, c


# --- map ----------------------------------------------------------------------------------

def map_from_pairs(base_ids: np.ndarray, value_ids: np.ndarray, n_base: int, n_value: int,
                   costs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Count pairs; per base token keep the most frequent value token and its share of that
    base token's alignments as the weight. Ties go to the lower mean alignment cost (the more
    similar text), then the lower id. Never aligned: -1, weight 0."""
    token_map = np.full(n_base, -1, dtype=np.int32)
    weights = np.zeros(n_base, dtype=np.float32)
    if base_ids.size == 0:
        return token_map, weights
    keys, inverse, counts = np.unique(base_ids * n_value + value_ids, return_inverse=True, return_counts=True)
    b, v = keys // n_value, keys % n_value
    mean_cost = (np.bincount(inverse, weights=costs, minlength=keys.size) / counts
                 if costs is not None else np.zeros(keys.size))
    totals = np.bincount(b, weights=counts, minlength=n_base)
    order = np.lexsort((v, mean_cost, -counts, b))            # base, count desc, cost, id
    b_sorted = b[order]
    first = order[np.concatenate(([True], b_sorted[1:] != b_sorted[:-1]))]
    token_map[b[first]] = v[first].astype(np.int32)
    weights[b[first]] = (counts[first] / totals[b[first]]).astype(np.float32)
    return token_map, weights


def _read_corpus(corpus_path: Path, max_bytes: int | None) -> tuple[str, str, int]:
    try:
        data = corpus_path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read corpus {corpus_path}: {e.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if max_bytes is not None and len(data) > max_bytes:
        cut = data.rfind(b"\n", 0, max_bytes)
        data = data[: cut if cut > 0 else max_bytes]
    text = data.decode("utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"corpus {corpus_path} is empty")
    return text, digest, len(data)


def build_aligned_map(base_path, value_path, corpus_path, out_path, progress: bool = True, *,
                      max_bytes: int | None = None, band: int = DEFAULT_BAND) -> Path:
    """Align `corpus_path` under both tokenizers; write the `.npz` map to `out_path`.

    base_path / value_path: GGUF files or known model names (a value .ivl.gguf carries its
    tokenizer). max_bytes: use only the corpus's first bytes (cut at a line end)."""
    from .progress import step_progress
    from .valuefile import read_gguf_header
    from .vocab import TYPE_BYTE, TYPE_NORMAL, TokenMapping, map_end_tokens, read_vocab, save_map

    base_file, value_file = resolve_model(base_path), resolve_model(value_path)
    base_vocab = read_vocab(read_gguf_header(base_file))
    value_vocab = read_vocab(read_gguf_header(value_file))
    text, corpus_sha, used_bytes = _read_corpus(Path(corpus_path), max_bytes)
    docs = corpus_documents(text)

    base, value = _Side(base_file), _Side(value_file)
    if base.vocab.n_tokens != len(base_vocab) or value.vocab.n_tokens != len(value_vocab):
        raise VocabMismatchError("llama.cpp's vocabulary size differs from the GGUF token list")
    all_b, all_v, all_c = [], [], []
    try:
        with step_progress(f"aligning {len(docs)} paragraphs", len(docs) if progress else 0) as advance:
            for doc in docs:
                b, v, c = align_document(doc, base, value, band)
                all_b.append(b)
                all_v.append(v)
                all_c.append(c)
                advance()
    finally:
        base.close()
        value.close()
    b = np.concatenate(all_b) if all_b else np.empty(0, np.int64)
    v = np.concatenate(all_v) if all_v else np.empty(0, np.int64)
    c = np.concatenate(all_c) if all_c else np.empty(0)
    token_map, weights = map_from_pairs(b, v, len(base_vocab), len(value_vocab), c)
    map_end_tokens(base_vocab, value_vocab, token_map, weights)   # a corpus never shows them

    normal = np.isin(base_vocab.types, (TYPE_NORMAL, TYPE_BYTE))
    mapped = token_map >= 0
    summary = (f"aligned map: {len(docs)} paragraphs, {b.size} aligned pairs; {int(mapped.sum())} of "
               f"{int(normal.sum())} normal base tokens mapped ({mapped[normal].mean():.1%}), "
               f"mean weight {weights[mapped].mean() if mapped.any() else 0:.2f}")
    log.info(summary)
    if progress:
        import sys
        print(summary, file=sys.stderr)

    out = Path(out_path)
    mapping = TokenMapping(token_map, weights, base_vocab.fingerprint, value_vocab.fingerprint,
                           ALIGNED_BUILDER)
    save_map(out, mapping, extra={"corpus_sha256": np.str_(corpus_sha),
                                  "corpus_bytes": np.int64(used_bytes),
                                  "aligned_pairs": np.int64(b.size)})
    return out
