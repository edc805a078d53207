"""Decode throughput and peak memory: our VILA model against transformers' own LLaVA.

One run on one machine. The parent process builds, with random weights:

* transformers' ``LlavaForConditionalGeneration`` (SigLIP tower, 2-layer GELU projector, Llama LLM);
* ours with the SAME weights copied in (``mlp2x_gelu`` projector = LLaVA's projector, all 729 image
  tokens kept), saved in the released VILA layout and loaded back with ``from_pretrained``: the
  computation is the same, so the greedy tokens must match LLaVA's;
* ours with the released ``mlp_downsample`` projector (196 image tokens, shorter context).

Throughput: all three loaded in one process, a warm-up each, then ``--repeats`` rounds in rotating
order (fair when the machine's load changes), each a greedy generation of N tokens
(``min_new_tokens`` = N forces the length). A streamer timestamps every token; decode tokens/s =
1 / median time between consecutive tokens over all runs (prompt processing excluded; the median
keeps pauses caused by other processes out). Per-run means are printed too.
Peak memory: each model in a fresh process that loads it and generates once; on GPU
``torch.cuda.max_memory_allocated`` (weights + cache + activations), on CPU the process's peak
resident set size (``ru_maxrss``), total and above the resident size once torch, transformers and
vila_m3 are imported.

Run: ``.venv/bin/python benchmarks/vlm_decode.py [--new-tokens 64 --llm-hidden 512 ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm-hidden", type=int, default=512)
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--llm-heads", type=int, default=8)
    parser.add_argument("--llm-kv-heads", type=int, default=8)
    parser.add_argument("--llm-intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--vision-hidden", type=int, default=256)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--vision-heads", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=378, help="pixels; 378 / 14 = 27 -> 729 tokens")
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--prompt-tokens", type=int, default=48, help="text tokens around the image")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--worker", choices=["llava", "ours", "ours_downsample"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.dtype != "auto":
        return device, getattr(torch, args.dtype)
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


# ---- building the models (parent process) ----------------------------------------------------------
def build_checkpoints(args: argparse.Namespace, workdir: Path) -> None:
    """LLaVA (transformers format) and two VILA-layout checkpoints sharing its LLM and vision weights."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    from vila_m3.vlm import VilaConfig, VilaForConditionalGeneration
    from vila_m3.vlm.configuration import legacy_config_dict

    torch.manual_seed(args.seed)
    text_config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.llm_hidden,
        intermediate_size=args.llm_intermediate,
        num_hidden_layers=args.llm_layers,
        num_attention_heads=args.llm_heads,
        num_key_value_heads=args.llm_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=args.vision_hidden,
        intermediate_size=4 * args.vision_hidden,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_heads,
        image_size=args.image_size,
        patch_size=args.patch_size,
    )
    n_image_tokens = (args.image_size // args.patch_size) ** 2
    llava_config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=args.vocab - 1,
        image_seq_length=n_image_tokens,
        vision_feature_select_strategy="full",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    llava = LlavaForConditionalGeneration(llava_config).eval()
    llava.save_pretrained(workdir / "llava")
    state = llava.state_dict()

    for name, projector_type in (("ours", "mlp2x_gelu"), ("ours_downsample", "mlp_downsample")):
        config = VilaConfig(
            llm_cfg={**legacy_config_dict(text_config), "tokenizer_model_max_length": 4096},
            vision_tower_cfg=legacy_config_dict(vision_config),
            mm_projector_cfg={"mm_projector_type": projector_type, "model_type": "v2l_projector"},
            hidden_size=args.llm_hidden,
            mm_hidden_size=args.vision_hidden,
            model_dtype="torch.float32",
        )
        ours = VilaForConditionalGeneration(config).eval()
        mapped = {}
        for key, value in state.items():
            if key.startswith("model.language_model."):
                mapped["llm.model." + key.removeprefix("model.language_model.")] = value
            elif key.startswith("lm_head."):
                mapped["llm." + key] = value
            elif key.startswith("model.vision_tower."):
                mapped["vision_tower." + key.removeprefix("model.vision_tower.")] = value
            elif projector_type == "mlp2x_gelu" and key.startswith("model.multi_modal_projector.linear_"):
                index = {"1": "0", "2": "2"}[key.split("linear_")[1][0]]
                mapped["mm_projector.layers." + index + key[key.rindex("."):]] = value
        missing, unexpected = ours.load_state_dict(mapped, strict=False)
        allowed_missing = {k for k in missing if k.startswith("mm_projector.") and projector_type != "mlp2x_gelu"}
        assert not unexpected and set(missing) == allowed_missing, (missing, unexpected)
        ours.save_pretrained(workdir / name)
        del ours
    del llava


def prompt_inputs(args: argparse.Namespace, kind: str, n_image_tokens: int) -> dict[str, torch.Tensor]:
    """Random text ids around one image: LLaVA expands the image token, ours uses one placeholder."""
    from vila_m3.vlm import IMAGE_TOKEN_INDEX

    generator = torch.Generator().manual_seed(args.seed + 1)
    before = torch.randint(3, args.vocab - 2, (args.prompt_tokens * 2 // 3,), generator=generator)
    after = torch.randint(3, args.vocab - 2, (args.prompt_tokens - before.numel(),), generator=generator)
    pixel_values = torch.randn(1, 3, args.image_size, args.image_size, generator=generator)
    if kind == "llava":
        image = torch.full((n_image_tokens,), args.vocab - 1)
    else:
        image = torch.tensor([IMAGE_TOKEN_INDEX])
    input_ids = torch.cat([torch.tensor([1]), before, image, after])[None]
    return {"input_ids": input_ids, "pixel_values": pixel_values}


# ---- measuring ------------------------------------------------------------------------------------
class TokenClock:
    """A generate() streamer that timestamps every new token (the prompt ids come first and are skipped)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:  # value was copied to the CPU: the device is in sync
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load(name: str, workdir: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if name == "llava":
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(workdir / "llava", dtype=dtype, device_map=str(device))
    else:
        from vila_m3.vlm import VilaForConditionalGeneration

        model = VilaForConditionalGeneration.from_pretrained(workdir / name, dtype=dtype, device_map=str(device))
    return model.eval()


def timed_generate(model: torch.nn.Module, inputs: dict, n: int) -> tuple[float, list[float], list[int]]:
    """(seconds to the first token, seconds between consecutive new tokens, the new token ids)."""
    clock = TokenClock()
    if inputs["input_ids"].device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                             streamer=clock)
    assert len(clock.times) == n, (len(clock.times), n)
    steps = [b - a for a, b in zip(clock.times[:-1], clock.times[1:], strict=True)]
    return clock.times[0] - start, steps, out[0, -n:].tolist()


def model_inputs(args: argparse.Namespace, name: str, device: torch.device, dtype: torch.dtype) -> dict:
    n_image_tokens = (args.image_size // args.patch_size) ** 2
    inputs = {k: v.to(device) for k, v in prompt_inputs(args, name, n_image_tokens).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def run_memory_worker(args: argparse.Namespace) -> dict:
    """In a fresh process: load one model, generate once, report the peak memory."""
    import transformers  # noqa: F401  (imports first: the baseline holds the libraries, not the model)

    import vila_m3.vlm  # noqa: F401

    device, dtype = resolve(args)
    baseline = rss_mib()
    model = load(args.worker, Path(args.workdir), device, dtype)
    inputs = model_inputs(args, args.worker, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loaded = rss_mib()
    samples: list[float] = []
    done = threading.Event()

    def sample_rss() -> None:  # ru_maxrss cannot be reset: poll the resident size during generation
        while not done.is_set():
            samples.append(rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    _, _, tokens = timed_generate(model, inputs, args.new_tokens)
    done.set()
    sampler.join()
    if device.type == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20, "tokens": tokens}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "peak_mib": peak,
        "peak_above_imports_mib": peak - baseline,
        "generation_above_loaded_mib": max(samples, default=loaded) - loaded,
        "tokens": tokens,
    }


def measure_throughput(args: argparse.Namespace, workdir: Path, names: list[str]) -> dict[str, dict]:
    """All models in this process, repeats interleaved (fair when the machine's load changes)."""
    device, dtype = resolve(args)
    models = {name: load(name, workdir, device, dtype) for name in names}
    inputs = {name: model_inputs(args, name, device, dtype) for name in names}
    for name in names:  # warm-up
        timed_generate(models[name], inputs[name], min(8, args.new_tokens))
    firsts: dict[str, list[float]] = {name: [] for name in names}
    steps: dict[str, list[float]] = {name: [] for name in names}
    runs: dict[str, list[float]] = {name: [] for name in names}
    tokens: dict[str, list[int]] = {}
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[: repeat % len(names)]
        for name in order:
            first, intervals, tokens[name] = timed_generate(models[name], inputs[name], args.new_tokens)
            firsts[name].append(first)
            steps[name].extend(intervals)
            runs[name].append(len(intervals) / sum(intervals))
    step_ms = decode_step_ms(models, inputs, iterations=20 * args.repeats)
    return {
        name: {
            "step_ms": step_ms[name],
            "prompt_tokens": inputs[name]["input_ids"].shape[1]
            + (0 if name == "llava" else models[name].tokens_per_image - 1),
            "first_token_s": statistics.median(firsts[name]),
            "decode_tok_s": 1.0 / statistics.median(steps[name]),
            "decode_tok_s_per_run": [round(r, 1) for r in runs[name]],
            "tokens": tokens[name],
        }
        for name in names
    }


def decode_step_ms(models: dict[str, torch.nn.Module], inputs: dict[str, dict], iterations: int) -> dict[str, float]:
    """Median milliseconds of one decode forward (1 token, KV cache holding the prompt), interleaved."""
    from transformers import DynamicCache

    caches = {}
    with torch.inference_mode():
        for name, model in models.items():
            cache = DynamicCache(config=model.config.get_text_config(decoder=True))
            model(**inputs[name], past_key_values=cache, use_cache=True, logits_to_keep=1)
            caches[name] = cache
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(iterations):
            for name, model in models.items():
                token = torch.tensor([[5]], device=inputs[name]["input_ids"].device)
                if token.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(input_ids=token, past_key_values=caches[name], use_cache=True, logits_to_keep=1)
                if token.device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
                caches[name].crop(-1)  # back to the prompt length
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_memory_worker(args)))
        return
    device, dtype = resolve(args)
    names = ["llava", "ours", "ours_downsample"]
    with tempfile.TemporaryDirectory(prefix="vila-m3-decode-") as tmp:
        workdir = Path(tmp)
        build_checkpoints(args, workdir)
        memory = {}
        for name in names:
            command = [sys.executable, __file__, *argv, "--worker", name, "--workdir", str(workdir)]
            completed = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", check=False)
            if completed.returncode != 0:
                sys.stderr.write(completed.stderr)
                raise SystemExit(f"memory worker {name} failed")
            memory[name] = json.loads(completed.stdout.strip().splitlines()[-1])
        speed = measure_throughput(args, workdir, names)

    print(f"device {device}, dtype {str(dtype).removeprefix('torch.')}, torch threads {torch.get_num_threads()}; "
          f"LLM {args.llm_layers} layers x {args.llm_hidden} (vocab {args.vocab}), SigLIP {args.vision_layers} x "
          f"{args.vision_hidden}; {args.new_tokens} new tokens (greedy, min_new_tokens forces the length), "
          f"{args.repeats} interleaved repeats after a warm-up")
    kind = ("torch.cuda.max_memory_allocated during generation" if device.type == "cuda"
            else "peak RSS (ru_maxrss) of a fresh process that loads the model and generates once; above "
                 "imports = minus the RSS after importing torch/transformers/vila_m3; in generate = peak RSS "
                 "polled during generate() minus the RSS before it")
    print(f"memory: {kind}")
    labels = {
        "llava": "transformers LlavaForConditionalGeneration",
        "ours": "ours, same weights (mlp2x_gelu, 729 img tok)",
        "ours_downsample": "ours, mlp_downsample (196 img tok)",
    }
    above = "above imports  in generate" if device.type == "cpu" else ""
    print(f"{'model':<46} {'prompt':>7} {'1st tok s':>10} {'decode tok/s':>13} {'step ms':>8} {'peak MiB':>9} "
          f"{above:>26}")
    for name in names:
        row, mem = speed[name], memory[name]
        extra = (f"{mem['peak_above_imports_mib']:>14.0f} {mem['generation_above_loaded_mib']:>11.0f}"
                 if "peak_above_imports_mib" in mem else "")
        print(f"{labels[name]:<46} {row['prompt_tokens']:>7} {row['first_token_s']:>10.3f} "
              f"{row['decode_tok_s']:>13.1f} {row['step_ms']:>8.2f} {mem['peak_mib']:>9.0f} {extra}")
    print("  step ms: median of one decode forward (1 token, cache of the prompt), interleaved across models")
    for name in names:
        print(f"  decode tok/s of each run (mean over its steps), {name}: {speed[name]['decode_tok_s_per_run']}")
    llava, ours = speed["llava"], speed["ours"]
    print(f"ratio ours/LLaVA decode throughput: {ours['decode_tok_s'] / llava['decode_tok_s']:.3f} (target >= 0.95)")
    print(f"ratio LLaVA/ours decode step time:  {llava['step_ms'] / ours['step_ms']:.3f} (same measure as throughput)")
    print(f"ratio ours/LLaVA peak memory:       {memory['ours']['peak_mib'] / memory['llava']['peak_mib']:.3f} "
          "(target <= 1.00)")
    print(f"greedy tokens identical to LLaVA:   {ours['tokens'] == llava['tokens'] == memory['ours']['tokens']}")


if __name__ == "__main__":
    main()
