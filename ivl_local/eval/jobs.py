"""Child-process jobs of the evaluation harness (torch lives here, never in the harness).

    python -m ivl_local.eval.jobs train    '<json payload>' result.json
    python -m ivl_local.eval.jobs generate '<json payload>' result.json

train     trains a Trained recipe on the task's train split, converts llama/qwen2 results to
          GGUF (q8_0, the runtime's default) and writes {"path", "checkpoint", ...}.
generate  greedy answers from a torch checkpoint (a full fine-tune of another arch, which
          ivl_convert cannot write as GGUF), prompts rendered and tokenized exactly as the
          Engine does (the base GGUF's chat template and llama.cpp tokenizer).
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path


def train_job(payload: dict) -> dict:
    from ivl_local.train.api import TrainConfig, train

    recipe, folder = payload["recipe"], Path(payload["folder"])
    extra = {name: value for name, value in recipe["extra"]}
    cfg = TrainConfig(base=recipe["base"], data=Path(payload["data"]), out_dir=folder / "checkpoint",
                      init=recipe["init"] if not recipe["full_finetune"] else "auto",
                      norm_weight=recipe["norm_weight"], full_finetune=recipe["full_finetune"],
                      max_steps=recipe["steps"], seed=0, check_tokenizer=False,
                      threads=int(payload.get("threads", 2)), **extra)
    started = time.time()
    ckpt = train(cfg, progress=True)
    train_s = time.time() - started
    model_type = json.loads((ckpt / "config.json").read_text())["model_type"]
    path = ckpt
    from ivl_convert import CONVERTIBLE_ARCHS, convert_checkpoint

    if model_type in CONVERTIBLE_ARCHS:
        name = "full-ft.gguf" if recipe["full_finetune"] else "value.ivl.gguf"
        path = convert_checkpoint(ckpt, folder / name, out_type="q8_0", progress=False)
    metrics = []
    metrics_file = ckpt / "metrics.jsonl"
    if metrics_file.exists():
        metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return {"path": str(path), "checkpoint": str(ckpt), "model_type": model_type,
            "train_seconds": round(train_s, 1), "config": cfg.to_json(),
            "last_metrics": metrics[-3:]}


def generate_job(payload: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from ivl_local.backend import Model
    from ivl_local.chat_template import FALLBACK_STOP, render_messages
    from ivl_local.valuefile import read_gguf_header

    torch.set_num_threads(int(payload.get("threads", 2)))
    base_path = Path(payload["base_gguf"])
    template = read_gguf_header(base_path).get("tokenizer.chat_template")
    vocab_model = Model(base_path, vocab_only=True)
    vocab = vocab_model.vocab
    eos_text = vocab.eos_text
    stops = [] if template else list(FALLBACK_STOP)
    model = AutoModelForCausalLM.from_pretrained(payload["checkpoint"], dtype=torch.float32).eval()
    # transformers 5 renamed past_key_values to cache (the old name warns)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    answers = []
    for messages in payload["conversations"]:
        prompt = render_messages(messages, template, bos_token="", eos_token=eos_text)
        ids = vocab.tokenize(prompt, add_special=True, parse_special=True)
        out: list[int] = []
        cache, step_ids = None, torch.tensor([ids])
        with torch.no_grad():
            for _ in range(int(payload["max_tokens"])):
                result = model(input_ids=step_ids, use_cache=True, **{cache_arg: cache})
                cache = getattr(result, cache_arg)
                token = int(result.logits[0, -1].argmax())   # greedy, ties -> lowest id
                if vocab.is_eog(token):
                    break
                out.append(token)
                text = vocab.detokenize(out).decode("utf-8", "replace")
                if any(s in text for s in stops):
                    break
                step_ids = torch.tensor([[token]])
        text = vocab.detokenize(out).decode("utf-8", "replace")
        for s in stops:
            text = text.split(s)[0]
        answers.append(text.strip() if not template else text)
    vocab_model.close()
    return {"answers": answers}


JOBS = {"train": train_job, "generate": generate_job}


def main(argv: list[str]) -> int:
    name, payload, out_file = argv[0], json.loads(argv[1]), Path(argv[2])
    result = JOBS[name](payload)
    tmp = out_file.with_name(out_file.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
