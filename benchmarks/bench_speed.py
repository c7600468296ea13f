"""Generation speed of IG-Pruning against the dense model and a statically pruned copy, measured in one run.

Three models share the same weights:

- dense: the base `LlamaForCausalLM` with its stock `DynamicCache`;
- static: a stock `LlamaForCausalLM` rebuilt with the skipped blocks physically removed (layers without any kept
  block are dropped, a skipped attention or MLP sub-block of a kept layer is replaced by a branch that computes
  nothing) and a stock `DynamicCache` that holds only the kept attention layers;
- igp: `IGPruningForCausalLM` with a bank of masks of equal sparsity (4 random masks, or the learned bank of a saved
  model given with `--bank`), at batch 1 with the static copy's mask (the bank's first), and at batch 8 with row i
  using mask i mod N.

On a CPU, decoding is bound by reading weights, so a block costs the same whether one row of the batch runs it or
all of them. A mixed batch therefore decodes about as fast as a static model that runs every block some row needs.
The output reports that count as `blocks_run_by_some_row_at_batch_8`.

Prefill time is the time of `generate` with one new token; decode throughput is the extra tokens of a
`max_new_tokens` run divided by its extra time. Each figure is the median of `--repeats` runs, interleaved across
models so that drift in machine load hits all of them alike.

    python benchmarks/bench_speed.py --output benchmarks/results/speed_cpu.json
"""

import argparse
import copy
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from igp_training.assets import load_default_model, load_default_router
from modeling_igp import IGPruningForCausalLM


class ZeroBranch(nn.Module):
    """Stands in for a removed attention or MLP sub-block: adds nothing to the residual stream, computes nothing."""

    def forward(self, hidden_states, *args, **kwargs):
        zero = hidden_states.new_zeros(())
        return (zero, None) if kwargs or args else zero


def skipped_blocks_masks(num_blocks: int, num_skipped: int, num_masks: int, seed: int) -> list[list[int]]:
    """Random masks that skip `num_skipped` blocks each, never block 0 (the first attention)."""
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(num_masks):
        skipped = 1 + torch.randperm(num_blocks - 1, generator=generator)[:num_skipped]
        mask = [1] * num_blocks
        for block in skipped.tolist():
            mask[block] = 0
        masks.append(mask)
    return masks


def build_static_copy(base_model, mask: list[int]):
    """A stock LlamaForCausalLM with the blocks that `mask` skips physically removed, sharing the base weights."""
    static = copy.copy(base_model)
    static._modules = dict(base_model._modules)
    inner = copy.copy(base_model.model)
    inner._modules = dict(base_model.model._modules)

    layers = []
    attention_index = 0
    for layer_idx, layer in enumerate(base_model.model.layers):
        keep_attention, keep_mlp = mask[2 * layer_idx], mask[2 * layer_idx + 1]
        if not keep_attention and not keep_mlp:
            continue
        new_layer = copy.copy(layer)
        new_layer._modules = dict(layer._modules)
        if keep_attention:
            attention = copy.copy(layer.self_attn)
            attention.layer_idx = attention_index  # the stock cache holds kept attention layers contiguously
            new_layer.self_attn = attention
            attention_index += 1
        else:
            new_layer.input_layernorm = nn.Identity()
            new_layer.self_attn = ZeroBranch()
        if not keep_mlp:
            new_layer.post_attention_layernorm = nn.Identity()
            new_layer.mlp = ZeroBranch()
        layers.append(new_layer)

    inner.layers = nn.ModuleList(layers)
    inner.config = copy.deepcopy(base_model.config)
    inner.config.num_hidden_layers = len(layers)
    static.model = inner
    static.config = inner.config
    return static


@torch.no_grad()
def time_generate(model, inputs, new_tokens: int, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    output = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        **kwargs,
    )
    return time.perf_counter() - start, output


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=256, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="generated tokens per row")
    parser.add_argument("--sparsity", type=float, default=0.25, help="fraction of blocks each mask skips")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bank", default=None, metavar="DIR",
                        help="a saved IG-Pruning model of SmolLM2 whose mask bank to time (default: 4 random masks)")
    parser.add_argument("--output", default="benchmarks/results/speed_cpu.json", help="JSON file for the results")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    base, tokenizer = load_default_model()
    base.eval()
    router = load_default_router()
    num_blocks = 2 * base.config.num_hidden_layers
    if args.bank:
        with open(Path(args.bank) / "config.json") as handle:
            bank = json.load(handle)["mask_bank"]
        if len(bank[0]) != num_blocks:
            raise ValueError(f"--bank {args.bank} has masks of {len(bank[0])} blocks; SmolLM2 has {num_blocks}.")
    else:
        bank = skipped_blocks_masks(num_blocks, round(args.sparsity * num_blocks), num_masks=4, seed=args.seed)
    num_masks = len(bank)
    centroids = torch.nn.functional.normalize(torch.randn(num_masks, router.embedding_dim), dim=-1)
    igp = IGPruningForCausalLM.from_base(base, bank, centroids=centroids, router=router, tokenizer=tokenizer).eval()
    static = build_static_copy(base, bank[0]).eval()

    # Real text as prompt: the start of this file's docstring repeated, cut to exactly `prompt_tokens` tokens.
    text = (__doc__ * 8)
    prompt_ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.prompt_tokens]
    results = {"rows": []}

    for batch_size in (1, 8):
        input_ids = prompt_ids.repeat(batch_size, 1)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        cluster_ids = torch.arange(batch_size) % num_masks
        runs = {
            "dense": (base, {}),
            "static": (static, {}),
            "igp": (igp, {"cluster_ids": cluster_ids}),
        }
        timings = {name: {"prefill": [], "full": []} for name in runs}
        kv = {}
        for model, extra in runs.values():  # warm-up: first calls pay for lazy initialisation
            time_generate(model, inputs, 2, **extra)
        for _ in range(args.repeats):
            for name, (model, extra) in runs.items():
                prefill, _ = time_generate(model, inputs, 1, **extra)
                full, output = time_generate(model, inputs, args.new_tokens, **extra)
                timings[name]["prefill"].append(prefill)
                timings[name]["full"].append(full)
                kv[name] = cache_bytes(output.cache)

        for name in runs:
            prefill = statistics.median(timings[name]["prefill"])
            full = statistics.median(timings[name]["full"])
            decode_tps = batch_size * (args.new_tokens - 1) / max(full - prefill, 1e-9)
            results["rows"].append(
                {
                    "model": name,
                    "batch_size": batch_size,
                    "prefill_s": prefill,
                    "prefill_tokens_per_s": batch_size * args.prompt_tokens / prefill,
                    "decode_tokens_per_s": decode_tps,
                    "total_s": full,
                    "kv_cache_bytes": kv[name],
                }
            )
            print(json.dumps(results["rows"][-1]))

    # Router time per prompt, on the same 256-token prompt text.
    prompt_text = tokenizer.decode(prompt_ids[0])
    igp.route([prompt_text])
    start = time.perf_counter()
    for _ in range(10):
        igp.route([prompt_text])
    results["router_ms_per_prompt"] = 1000 * (time.perf_counter() - start) / 10

    attention_kept = [sum(mask[0::2]) for mask in bank]
    batch_8_masks = [bank[row % num_masks] for row in range(8)]
    results["setup"] = {
        "model": "SmolLM2-135M-Instruct (float32)",
        "bank": args.bank or f"{num_masks} random masks, seed {args.seed}",
        "blocks": num_blocks,
        "blocks_skipped_per_mask": [num_blocks - sum(mask) for mask in bank],
        "attention_blocks_kept_per_mask": attention_kept,
        "blocks_run_by_some_row_at_batch_8": sum(any(column) for column in zip(*batch_8_masks)),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with open(args.output, "w") as handle:
        json.dump(results, handle, indent=2)
    print(json.dumps(results["setup"]), f"router {results['router_ms_per_prompt']:.1f} ms/prompt")


if __name__ == "__main__":
    main()
