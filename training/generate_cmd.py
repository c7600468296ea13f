"""`igp generate`: route a prompt, print its cluster and skipped blocks, and generate with that cluster's mask."""

import argparse
import logging
import time
from pathlib import Path

from .cli import UsageError

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with a pruned model, routing the prompt to its cluster",
        description=(
            "Load a pruned model folder, route the prompt to its nearest cluster with the saved router, print the "
            "cluster and the blocks its mask skips, then generate with that mask. The prompt is wrapped in the "
            "tokenizer's chat template when it has one (see --no-chat-template); routing always uses the plain prompt."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("prompt", help="prompt text")
    parser.add_argument("--model", required=True, help="folder written by `igp prune` (or a hub name)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="maximum number of tokens to generate")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="feed the prompt as plain text even when the tokenizer has a chat template")
    parser.add_argument("--cluster", type=int, default=None,
                        help="use this cluster's mask instead of routing the prompt")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (with --do-sample)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch

    from modeling_igp import IGPruningForCausalLM

    from .pipeline import block_names

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    if args.do_sample and not args.temperature > 0:
        raise UsageError(f"--temperature must be greater than 0 with --do-sample, got {args.temperature}.")
    if not args.prompt.strip():
        raise UsageError("The prompt is empty; give the text to continue.")
    if not Path(args.model).exists() and (args.model.startswith((".", "/", "~")) or Path(args.model).suffix):
        raise UsageError(f"Model folder not found: {args.model}.")

    start = time.perf_counter()
    try:
        model = IGPruningForCausalLM.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        raise UsageError(f"Could not load a pruned model from {args.model!r}: {error}") from error
    model.eval()
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise UsageError(f"{args.model} has no tokenizer; save the model with its tokenizer (igp prune does).")
    logger.info("Loaded %s in %.1f s", args.model, time.perf_counter() - start)

    num_clusters = model.config.num_clusters
    if args.cluster is not None:
        if not 0 <= args.cluster < num_clusters:
            raise UsageError(f"--cluster {args.cluster} is out of range; the model has clusters 0 to {num_clusters - 1}.")
        cluster, how = args.cluster, "chosen with --cluster"
    elif num_clusters == 1:
        cluster, how = 0, "the only cluster"
    else:
        # Route the plain prompt: a chat template would add a system message that is the same for every prompt.
        cluster, how = int(model.route([args.prompt])[0]), "routed"

    mask = model.config.mask_bank[cluster]
    names = block_names(model.config.num_layers)
    skipped = [names[block] for block, keep in enumerate(mask) if not keep]
    print(f"cluster: {cluster} of {num_clusters} ({how})")
    print(f"skipped blocks: {len(skipped)} of {len(mask)} ({100 * len(skipped) / len(mask):.1f}%)"
          + (f": {', '.join(skipped)}" if skipped else ""))

    if tokenizer.chat_template and not args.no_chat_template:
        input_ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                                  return_tensors="pt", return_dict=True)
    else:
        input_ids = tokenizer(args.prompt, return_tensors="pt")

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    generation_kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        generation_kwargs["temperature"] = args.temperature
    else:
        generation_kwargs.update(temperature=None, top_p=None, top_k=None)
    output = model.generate(
        input_ids["input_ids"],
        attention_mask=input_ids["attention_mask"],
        cluster_ids=torch.tensor([cluster]),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **generation_kwargs,
    )
    new_tokens = output[0, input_ids["input_ids"].shape[1]:]
    seconds = time.perf_counter() - start
    print("text:")
    print(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    logger.info("Generated %d tokens in %.1f s", len(new_tokens), seconds)
    return 0
