"""Training: the IVL loss (masking, norm term, chunking), batching/resume order, and a tiny
end-to-end run on the real SmolLM2 base -> convert -> llama.cpp logits vs torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ivl_local.errors import ConfigError  # noqa: E402
from ivl_local.train.config import TrainConfig  # noqa: E402
from ivl_local.train.data import IGNORE, Example  # noqa: E402
from ivl_local.train.loss import fused_loss, next_token_targets  # noqa: E402
from ivl_local.train.trainer import micro_batch  # noqa: E402

pytestmark = pytest.mark.train
DATA = Path(__file__).resolve().parents[1] / "data"


def identity(h):
    return h


def random_case(n=10, vocab=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    base_logits = torch.randn(n, vocab, generator=g) * 3
    value_logits = (torch.randn(n, vocab, generator=g)).requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[:4] = IGNORE                       # positions predicting prompt tokens
    return base_logits, value_logits, targets


# --------------------------------------------------------------------------------------
# loss


def test_loss_is_ce_on_response_tokens_plus_mean_abs_norm():
    base_logits, value_logits, targets = random_case()
    norm_mask = torch.ones(len(targets))
    parts = fused_loss(value_logits, base_logits, targets, norm_mask, identity, identity, norm_weight=0.7)
    keep = targets != IGNORE
    log_probs = torch.log_softmax(base_logits + value_logits, -1)
    ce = -log_probs[keep].gather(1, targets[keep, None]).mean()
    norm = value_logits.abs().mean()
    assert torch.allclose(parts.loss, ce + 0.7 * norm, atol=1e-5)
    assert parts.n_response == int(keep.sum())


def test_prompt_tokens_contribute_nothing_and_response_tokens_do():
    base_logits, value_logits, targets = random_case()
    norm_mask = torch.ones(len(targets))
    loss = fused_loss(value_logits, base_logits, targets, norm_mask, identity, identity, 0.0).loss
    loss.backward()
    grad = value_logits.grad
    assert torch.count_nonzero(grad[:4]) == 0          # masked: no gradient at all
    assert (grad[4:].abs().sum(-1) > 0).all()
    # Changing what a masked position "would" predict changes nothing; a response token does.
    other = targets.clone()
    other[:4] = IGNORE
    with torch.no_grad():
        same = fused_loss(value_logits, base_logits, other, norm_mask, identity, identity, 0.0).loss
        changed = targets.clone()
        changed[5] = (changed[5] + 1) % base_logits.shape[1]
        different = fused_loss(value_logits, base_logits, changed, norm_mask, identity, identity, 0.0).loss
    assert torch.equal(same, loss.detach())
    assert not torch.allclose(different, loss.detach())


def test_chunked_loss_and_gradients_match_unchunked():
    base_logits, value_logits, targets = random_case(n=37, vocab=23, seed=1)
    norm_mask = (torch.arange(37) % 3 != 0).float()
    whole = fused_loss(value_logits, base_logits, targets, norm_mask, identity, identity, 1.0, chunk=1000)
    (g_whole,) = torch.autograd.grad(whole.loss, value_logits)
    chunked = fused_loss(value_logits, base_logits, targets, norm_mask, identity, identity, 1.0, chunk=5)
    (g_chunked,) = torch.autograd.grad(chunked.loss, value_logits)
    assert torch.allclose(whole.loss, chunked.loss, atol=1e-5)
    assert torch.allclose(g_whole, g_chunked, atol=1e-6)
    assert whole.n_correct == chunked.n_correct


def test_targets_are_next_tokens():
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, 2]])
    assert next_token_targets(labels).tolist() == [[IGNORE, 7, 8, 2, IGNORE]]


def test_config_validation():
    with pytest.raises(ConfigError, match="init must be"):
        TrainConfig(init="bogus")
    with pytest.raises(ConfigError, match="multiple of fresh_heads"):
        TrainConfig(fresh_hidden=100, fresh_heads=3)
    assert TrainConfig(init="pruned:4").init == "pruned:4"
    with pytest.raises(ConfigError, match="train_layers needs full_finetune"):
        TrainConfig(train_layers=2)
    with pytest.raises(ConfigError, match="train_layers must be >= 0"):
        TrainConfig(train_layers=-1, full_finetune=True)


def test_partial_finetune_unfreezes_only_the_last_layers_and_final_norm():
    from transformers import LlamaConfig, LlamaForCausalLM

    from ivl_local.train.model import count_parameters
    from ivl_local.train.trainer import _unfreeze_for_finetune

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=4, num_attention_heads=2,
                                         num_key_value_heads=1, tie_word_embeddings=False))
    _unfreeze_for_finetune(model, 2)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.2.", "model.layers.3.", "model.norm.")) for n in trainable)
    assert any(n.startswith("model.layers.2.") for n in trainable) and "model.norm.weight" in trainable
    assert count_parameters(model, trainable_only=True) < count_parameters(model)
    _unfreeze_for_finetune(model, 0)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="only 4 layers"):
        _unfreeze_for_finetune(model, 5)


def test_micro_batches_are_seeded_epochs():
    examples = [Example((i,), (i,), i) for i in range(10)]
    epoch0 = [e.source_line for k in range(3) for e in micro_batch(examples, k, 4, seed=1)]
    assert sorted(epoch0) == list(range(10))                      # one epoch = every example once
    again = [e.source_line for k in range(3) for e in micro_batch(examples, k, 4, seed=1)]
    assert again == epoch0                                        # resume replays the same order
    epoch1 = [e.source_line for k in range(3, 6) for e in micro_batch(examples, k, 4, seed=1)]
    assert epoch1 != epoch0


# --------------------------------------------------------------------------------------
# real: SmolLM2 base


def small_cfg(tmp_path: Path, **overrides) -> TrainConfig:
    rows = (DATA / "arith_train.jsonl").read_text().splitlines()[:48]
    data = tmp_path / "arith48.jsonl"
    if not data.exists():
        data.write_text("\n".join(rows) + "\n")
    settings = dict(base="smollm2-135m", data=data, out_dir=tmp_path / "ckpt", init="pruned:1",
                    max_steps=6, batch_size=4, max_len=48, learning_rate=1e-3, warmup_ratio=0.0,
                    eval_fraction=0.1, eval_every=0, check_tokenizer=False)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smollm2_path):
    from ivl_local.train.api import train

    tmp = tmp_path_factory.mktemp("train")
    ckpt = train(small_cfg(tmp), progress=False)
    return ckpt


@pytest.mark.real
@pytest.mark.slow
def test_loss_decreases_and_checkpoint_is_complete(trained):
    meta = json.loads((trained / "ivl_checkpoint.json").read_text())
    history = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 7))
    assert history[-1]["loss"] < history[0]["loss"]
    assert meta["complete"] and meta["step"] == 6 and meta["init"] == "pruned:1"
    assert meta["training_base"]["vocab_fingerprint"] and meta["training_base"]["arch"] == "llama"
    assert meta["stats"]["peak_rss_mb"] < 8000
    assert "eval_ce" in meta["stats"]["final"]
    print(f"steps/s {meta['stats']['steps_per_s']:.3f}, peak RSS {meta['stats']['peak_rss_mb']:.0f} MB")


def torch_value_logits(ckpt: Path, tokens: list[int]) -> np.ndarray:
    """The checkpoint's network in transformers (any architecture its config.json names)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ivl_local.train.checkpoint import load_weights_into

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt))
    load_weights_into(model, ckpt)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.real
@pytest.mark.slow
def test_converted_value_file_matches_torch_logits(trained, tmp_path):
    import llama_cpp
    from ivl_local.backend import safe_llama_params
    from ivl_convert import convert_checkpoint, inspect_value_file

    text = "State the final answer to the following arithmetic problem: 12 + 30 = 42"
    results = {}
    for out_type in ("f32", "f16", "q8_0"):
        path = convert_checkpoint(trained, tmp_path / f"v.{out_type}.ivl.gguf", out_type=out_type, progress=False)
        with safe_llama_params():
            llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=128, verbose=False)
        tokens = llm.tokenize(text.encode(), add_bos=True, special=True)
        llm.eval(tokens)
        got = np.asarray(llm.scores[:len(tokens)], dtype=np.float32)
        ref = torch_value_logits(trained, tokens)
        results[out_type] = (float(np.abs(got - ref).max()), float((got.argmax(-1) == ref.argmax(-1)).mean()),
                             inspect_value_file(path)["size_bytes"])
        del llm
    scale = float(np.abs(ref).max())
    print("\nlogits vs torch (max |diff|, argmax agreement, bytes); |logit| max", round(scale, 2))
    for out_type, row in results.items():
        print(f"  {out_type}: {row[0]:.4f} {row[1]:.3f} {row[2]}")
    assert results["f32"][0] < 2e-3 * scale       # float32 rounding over a few layers
    assert results["f16"][0] < 1e-2 * scale
    assert results["q8_0"][1] >= 0.8             # same argmax on most positions
    assert results["q8_0"][2] < 0.4 * results["f32"][2]


@pytest.mark.real
@pytest.mark.slow
def test_interrupt_saves_and_resume_finishes(tmp_path, smollm2_path, monkeypatch):
    from ivl_local.train import trainer
    from ivl_local.train.api import train

    cfg = small_cfg(tmp_path, max_steps=3)
    real = trainer.compute_loss
    calls = {"n": 0}

    def interrupt_on_second_step(s, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(s, batch)

    monkeypatch.setattr(trainer, "compute_loss", interrupt_on_second_step)
    with pytest.raises(trainer.TrainingInterrupted, match="interrupted at step 1/3.*--resume"):
        train(cfg, progress=False)
    monkeypatch.setattr(trainer, "compute_loss", real)
    meta = json.loads((cfg.out_dir / "ivl_checkpoint.json").read_text())
    assert meta["step"] == 1 and not meta["complete"]
    with pytest.raises(ConfigError, match="learning_rate"):
        train(cfg.with_(resume=True, learning_rate=5e-4), progress=False)
    train(cfg.with_(resume=True), progress=False)
    meta = json.loads((cfg.out_dir / "ivl_checkpoint.json").read_text())
    steps = [json.loads(line)["step"] for line in (cfg.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert meta["complete"] and meta["step"] == 3 and steps == [1, 2, 3]


@pytest.mark.real
def test_hf_and_gguf_tokenizers_agree(smollm2_path):
    from ivl_local.train.basefile import BaseGGUF
    from ivl_local.train.tokcheck import compare_tokenizers

    report = compare_tokenizers(BaseGGUF.open(str(smollm2_path)))
    assert report["mismatches"] == 0, report["first"]


def test_auto_init_is_pretrained_for_convertible_bases_else_fresh():
    from types import SimpleNamespace

    from ivl_local.train.model import resolve_init

    llama = SimpleNamespace(config=SimpleNamespace(model_type="llama"))
    gemma = SimpleNamespace(config=SimpleNamespace(model_type="gemma3_text"))
    other = SimpleNamespace(config=SimpleNamespace(model_type="mistral"))
    assert resolve_init(TrainConfig(), llama) == "pretrained"
    assert resolve_init(TrainConfig(), gemma) == "pretrained"     # gemma3 converts since issue 13
    assert resolve_init(TrainConfig(), other) == "fresh"
    assert resolve_init(TrainConfig(init="pruned:3"), gemma) == "pruned:3"


@pytest.mark.real
@pytest.mark.slow
def test_full_finetune_reference_converts_to_a_plain_gguf(tmp_path, smollm2_path):
    from ivl_convert import convert_checkpoint, inspect_value_file

    from ivl_local.train.api import train

    ckpt = train(small_cfg(tmp_path, full_finetune=True, max_steps=1, learning_rate=1e-5), progress=False)
    meta = json.loads((ckpt / "ivl_checkpoint.json").read_text())
    assert meta["kind"] == "full_finetune" and meta["init"] == "full_finetune"
    info = inspect_value_file(convert_checkpoint(ckpt, tmp_path / "ft.gguf", out_type="q8_0", progress=False))
    assert not info["is_value_file"] and info["hparams"]["llama.block_count"] == 30


@pytest.mark.real
@pytest.mark.slow
def test_partial_finetune_changes_only_the_last_layers(tmp_path, smollm2_path):
    from safetensors.numpy import load_file

    from ivl_local.train.api import train
    from ivl_local.train.model import load_causal_lm

    ckpt = train(small_cfg(tmp_path, full_finetune=True, train_layers=1, max_steps=1, learning_rate=1e-3),
                 progress=False)
    meta = json.loads((ckpt / "ivl_checkpoint.json").read_text())
    assert meta["kind"] == "full_finetune" and meta["init"] == "partial_finetune:1"
    after = load_file(str(ckpt / "model.safetensors"))
    before = {k: v.numpy() for k, v in load_causal_lm(str(smollm2_path)).state_dict().items()}
    changed = {k for k in after if not np.array_equal(after[k], before[k])}
    assert changed and all(k.startswith(("model.layers.29.", "model.norm.")) for k in changed), sorted(changed)[:5]


@pytest.mark.real
@pytest.mark.slow
def test_pruned_gemma3_copy_trains_and_converts_to_llama_cpp_gemma3(tmp_path, gemma3_path):
    """pruned:1 on the Gemma 3 base (its first layer, embeddings, final norm): the loss falls,
    and the converted gemma3 file's llama.cpp logits equal the torch value net's."""
    import llama_cpp
    from ivl_local.backend import safe_llama_params
    from ivl_convert import convert_checkpoint, inspect_value_file

    from ivl_local.train.api import train

    ckpt = train(small_cfg(tmp_path, base="gemma3-270m", init="pruned:1", max_steps=5, batch_size=2,
                           max_len=40), progress=False)
    meta = json.loads((ckpt / "ivl_checkpoint.json").read_text())
    history = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert meta["init"] == "pruned:1" and meta["training_base"]["arch"] == "gemma3"
    assert json.loads((ckpt / "config.json").read_text())["num_hidden_layers"] == 1
    assert history[-1]["loss"] < history[0]["loss"]
    print(f"\ngemma3 pruned:1 loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}, "
          f"steps/s {meta['stats']['steps_per_s']:.3f}, peak RSS {meta['stats']['peak_rss_mb']:.0f} MB")

    path = convert_checkpoint(ckpt, tmp_path / "v.f32.ivl.gguf", out_type="f32", progress=False)
    info = inspect_value_file(path)
    assert info["architecture"] == "gemma3" and info["ivl"]["ivl.value.init"] == "pruned:1"
    with safe_llama_params():
        llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=128, verbose=False)
    tokens = llm.tokenize(b"State the final answer: 12 + 30 = 42", add_bos=True, special=True)
    llm.eval(tokens)
    got = np.asarray(llm.scores[:len(tokens)], dtype=np.float32)
    del llm
    ref = torch_value_logits(ckpt, tokens)
    scale = float(np.abs(ref).max())
    assert scale > 0.1
    assert float(np.abs(got - ref).max()) < 2e-3 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).all()


# --------------------------------------------------------------------------------------
# several processes: torchrun, gloo on CPU


def test_global_batch_shards_and_token_counts():
    from ivl_local.train.dist import Dist
    from ivl_local.train.trainer import shard, token_counts

    examples = [Example((1, 2, 3, 4), (IGNORE, IGNORE, 3, 4), 1), Example((1, 2, 3), (IGNORE, 2, 3), 2),
                Example((5, 6), (IGNORE, 6), 3)]
    parts = [shard(examples, Dist(rank=r, world=2)) for r in range(2)]
    assert [e.source_line for e in parts[0]] == [1, 3] and [e.source_line for e in parts[1]] == [2]
    assert token_counts(examples, "response") == (5, 5) and token_counts(examples, "all") == (5, 9)
    # the shares of a split batch, each over the global counts, sum to the whole batch's loss
    base_logits, value_logits, targets = random_case(n=12, vocab=9, seed=3)
    norm_mask = torch.ones(12)
    whole = fused_loss(value_logits, base_logits, targets, norm_mask, identity, identity, 0.5)
    counts = (int((targets != IGNORE).sum()), 12)
    halves = [fused_loss(value_logits[p], base_logits[p], targets[p], norm_mask[p], identity, identity, 0.5,
                         denominators=counts).loss for p in (slice(0, 5), slice(5, 12))]
    assert torch.allclose(halves[0] + halves[1], whole.loss, atol=1e-5)


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["DDP", "FSDP"])
def test_torchrun_two_processes_match_one_and_resume_on_one(tmp_path, smollm2_path, mode):
    """`torchrun --nproc_per_node 2` (DDP, or FSDP with --fsdp; gloo) on a SmolLM2 pruned:1
    value net, global batch 4, evaluated at step 2 (under FSDP every rank takes part): the
    loss curve equals a one-process run with the same global batch (relative 1e-5),
    rank 0 alone writes and prints; the 2-process checkpoint paused at step 2 resumes on ONE
    process (with --grad-checkpointing, which must not change the result) and ends at the
    one-process run's weights: relative L2 difference < 1e-4 and every weight within the
    learning rate (AdamW's first steps move a weight by about lr * sign(grad), so a gradient
    that is ~0 may take the other sign under another summation order)."""
    import subprocess
    import sys

    from safetensors.numpy import load_file

    from ivl_local.cli.produce import build_train_config
    from ivl_local.train.api import train

    small_cfg(tmp_path)                                   # writes arith48.jsonl
    flags = dict(base="smollm2-135m", data=tmp_path / "arith48.jsonl", init="pruned:1", steps=4,
                 batch_size=4, max_len=48, lr=1e-3, eval_every=2, threads=1, seed=0, check_tokenizer=False)
    ref = train(build_train_config(out=tmp_path / "ref", **flags), progress=False)

    dist_dir = tmp_path / "dist"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items() if k != "check_tokenizer"]
    cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ivl_local.cli.main", "train", *args, "--no-check-tokenizer", "--out", str(dist_dir),
           "--pause-after", "2", *(["--fsdp"] if mode == "FSDP" else [])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines() == [str(dist_dir)]                 # one line, rank 0's
    assert f"x 2 processes ({mode}, global batch 4)" in r.stderr
    assert sum(line.startswith("done:") for line in r.stderr.splitlines()) == 1

    def metrics(folder):
        return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]

    expected = metrics(ref)
    got = metrics(dist_dir)
    assert [m["step"] for m in got] == [1, 2]                      # written once, by rank 0
    meta = json.loads((dist_dir / "ivl_checkpoint.json").read_text())
    assert meta["step"] == 2 and not meta["complete"]

    train(build_train_config(out=dist_dir, resume=True, grad_checkpointing=True, **flags), progress=False)
    got = metrics(dist_dir)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(got, expected):
        for key in ("loss", "ce", "norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
        assert ("eval_ce" in a) == ("eval_ce" in b), a["step"]
        if "eval_ce" in b:
            assert a["eval_ce"] == pytest.approx(b["eval_ce"], rel=1e-5), a["step"]
    assert [m["step"] for m in got if "eval_ce" in m] == [2, 4]
    w_ref, w_dist = load_file(str(ref / "model.safetensors")), load_file(str(dist_dir / "model.safetensors"))
    assert w_ref.keys() == w_dist.keys()
    diff = sum(float(((w_ref[k] - w_dist[k]) ** 2).sum()) for k in w_ref) ** 0.5
    norm = sum(float((w_ref[k] ** 2).sum()) for k in w_ref) ** 0.5
    max_abs = max(float(np.abs(w_ref[k] - w_dist[k]).max()) for k in w_ref)
    print(f"\n2 procs + resume on 1 vs 1 proc: relative L2 {diff / norm:.2e}, max |dw| {max_abs:.2e}")
    assert diff / norm < 1e-4 and max_abs < 1e-3


def test_fsdp_without_a_process_group_is_a_config_error(tmp_path):
    from ivl_local.train.dist import Dist
    from ivl_local.train.trainer import setup

    small_cfg(tmp_path)
    cfg = TrainConfig(base="smollm2-135m", data=tmp_path / "arith48.jsonl", fsdp=True, check_tokenizer=False)
    with pytest.raises(ConfigError, match="--fsdp shards the trained network over processes, and none was launched"):
        setup(cfg, dist=Dist())


def test_batch_not_divisible_by_world_is_a_config_error():
    from ivl_local.train.dist import Dist
    from ivl_local.train.trainer import setup

    with pytest.raises(ConfigError, match="global micro-batch: it must be a multiple of the 2 processes"):
        setup(TrainConfig(batch_size=3), dist=Dist(rank=0, world=2))


def test_training_rss_watch_sees_memory_taken_while_it_runs():
    """TrainingRss (the 'train_peak_rss_mb' stat): its peak reaches the resident set the steps
    grow to, read independently from /proc, and it stops cleanly. Compared with a direct reading,
    not with the watch's starting peak: in a long pytest process, garbage freed while the block is
    allocated can leave the resident set below where the watch started (CI at 31ee43e)."""
    import gc
    import os
    import time

    from ivl_local.train.trainer import TrainingRss, release_free_memory

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    gc.collect()
    release_free_memory()
    watch = TrainingRss()
    try:
        before = watch.mb()
        assert before is not None and before > 0
        start = rss_mb()
        block = np.ones(50_000_000, dtype=np.float32)        # 200 MB, touched
        held = rss_mb()
        assert held - start > 150, (start, held)             # the block is resident
        time.sleep(0.2)                                      # ten sampling periods
        assert watch.mb() >= held - 1, (held, watch.mb())
        del block
        release_free_memory()                                # a no-op where malloc_trim is absent
    finally:
        watch.close()
    assert not watch._thread.is_alive()
