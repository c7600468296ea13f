"""Evaluation of block-pruned models: held-out perplexity per domain, zero-shot accuracy with lm-eval, and speed.

- Perplexity: token-weighted over the held-out text of each domain (WikiText-2 test, GSM8K test, and the RedPajama
  C4 / StackExchange / GitHub samples minus every record that calibration drew). Each text is routed once and all
  its windows are scored with that text's mask.
- Zero-shot accuracy: lm-evaluation-harness with offline task configs that read the local benchmark files. The
  lm-eval model `igp` (a subclass of lm-eval's `HFLM`) routes each document once, so every choice of a question is
  scored with the same mask.
- Speed and memory: prefill and decode tokens per second at batch 1 and 8, peak memory, KV cache bytes and router
  time, measured back to back for several models so their ratios are comparable.
"""

import json
import logging
import math
import os
import statistics
import string
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# Folder of the offline lm-eval task templates; `${data_dir}` in them is replaced by the data folder.
TASK_TEMPLATE_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TASK_HELPER_MODULE = "igp_tasks.py"

# Short task names accepted by `igp eval --tasks`, mapped to the task names in the templates.
ZERO_SHOT_TASKS = {
    "hellaswag": "igp_hellaswag",
    "piqa": "igp_piqa",
    "arc_easy": "igp_arc_easy",
    "arc_challenge": "igp_arc_challenge",
    "winogrande": "igp_winogrande",
    "boolq": "igp_boolq",
    "openbookqa": "igp_openbookqa",
    "lambada": "igp_lambada_openai",
}

# The metrics each task reports, in the order tables show them.
TASK_METRICS = {
    "hellaswag": ("acc", "acc_norm"),
    "piqa": ("acc", "acc_norm"),
    "arc_easy": ("acc", "acc_norm"),
    "arc_challenge": ("acc", "acc_norm"),
    "winogrande": ("acc",),
    "boolq": ("acc",),
    "openbookqa": ("acc", "acc_norm"),
    "lambada": ("acc", "perplexity"),
}


def default_data_dir() -> Path:
    """Folder of the benchmark files: `$IGP_DATA_DIR`, else `../shared/data` relative to the current directory."""
    return Path(os.environ.get("IGP_DATA_DIR") or Path("..") / "shared" / "data")


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """Return the absolute data folder, checking that it exists."""
    path = Path(data_dir) if data_dir is not None else default_data_dir()
    if not path.is_dir():
        raise FileNotFoundError(
            f"Benchmark data folder not found: {path}. Pass --data-dir, or set IGP_DATA_DIR to the folder that holds "
            "wikitext2/, gsm8k/, hellaswag/, ..."
        )
    return path.resolve()


# -- held-out text for perplexity ----------------------------------------------------------------------------------

# Domain name -> file inside the data folder. RedPajama files have no separate test split, so their held-out part is
# the end of the file minus whatever calibration drew from it.
PERPLEXITY_DOMAINS = {
    "wikitext2": "wikitext2/test.txt",
    "gsm8k": "gsm8k/test.jsonl",
    "c4": "redpajama_sample/sample_c4-rp1.jsonl",
    "stackexchange": "redpajama_sample/sample_stackexchange1.jsonl",
    "github": "redpajama_sample/sample_github1.jsonl",
}

# Number of records from the end of each RedPajama sample kept for evaluation. The GitHub sample has only 100 records,
# and calibration draws from all of them. Its held-out part is the last 50 that calibration did not draw, so that it
# reaches the benchmark's 8,192-token budget like the other domains. The last 10 held only 2,849 tokens.
REDPAJAMA_HELDOUT_RECORDS = {"c4": 100, "stackexchange": 100, "github": 50}


def wikitext_articles(path: Path) -> list[str]:
    """Split the tokenised WikiText file into articles: each starts at a ` = Title = ` line (one `=` on each side)."""
    articles, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        stripped = line.strip()
        is_title = stripped.startswith("= ") and stripped.endswith(" =") and not stripped.startswith("= =")
        if is_title and current:
            articles.append("".join(current))
            current = []
        current.append(line)
    if "".join(current).strip():
        articles.append("".join(current))
    return [article.strip() for article in articles if article.strip()]


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def heldout_texts(domain: str, data_dir: Path, exclude: set[str] | None = None,
                  num_records: int | None = None) -> list[str]:
    """Return the held-out texts of a perplexity domain, in file order.

    Args:
        domain: one of `PERPLEXITY_DOMAINS`.
        data_dir: the benchmark data folder.
        exclude: calibration texts; a record whose text is in this set is never returned.
        num_records: for RedPajama domains, how many records to take from the end of the file (after exclusion);
            defaults to `REDPAJAMA_HELDOUT_RECORDS`.
    """
    if domain not in PERPLEXITY_DOMAINS:
        raise ValueError(f"Unknown perplexity domain {domain!r}; choose from {', '.join(PERPLEXITY_DOMAINS)}.")
    path = data_dir / PERPLEXITY_DOMAINS[domain]
    if not path.is_file():
        raise FileNotFoundError(f"Held-out file for {domain} not found: {path}.")
    exclude = exclude or set()

    if domain == "wikitext2":
        texts = wikitext_articles(path)
    elif domain == "gsm8k":
        texts = [record["question"] + "\n" + record["answer"] for record in _read_jsonl(path)]
    else:
        count = num_records or REDPAJAMA_HELDOUT_RECORDS[domain]
        kept = []
        for record in reversed(_read_jsonl(path)):
            if record["text"].strip() and record["text"] not in exclude:
                kept.append(record["text"])
            if len(kept) == count:
                break
        texts = kept[::-1]

    overlap = [text for text in texts if text in exclude]
    if overlap:
        # Possible when calibration drew from the test split itself (the embedded GSM8K source ships the test split).
        logger.warning("Dropped %d held-out %s texts that calibration used; %d remain.", len(overlap), domain,
                       len(texts) - len(overlap))
        texts = [text for text in texts if text not in exclude]
    return texts


# -- perplexity ---------------------------------------------------------------------------------------------------


@dataclass
class PerplexityResult:
    """Token-weighted perplexity of one domain."""

    domain: str
    perplexity: float
    nll_sum: float
    """Sum of the negative log-likelihoods (nats) of all scored tokens."""
    num_tokens: int
    """Number of scored tokens (every token of a window but its first)."""
    num_texts: int
    clusters: dict
    """Number of texts routed to each cluster."""
    text_nll_sums: list = field(default_factory=list)
    """NLL sum of each scored text, in the order the texts were taken. Two models scored on the same texts can then
    be compared text by text (`paired_perplexity`)."""
    text_num_tokens: list = field(default_factory=list)
    """Scored tokens of each text, in the same order."""

    def to_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "nll_sum": self.nll_sum,
            "num_tokens": self.num_tokens,
            "num_texts": self.num_texts,
            "clusters": self.clusters,
            "text_nll_sums": self.text_nll_sums,
            "text_num_tokens": self.text_num_tokens,
        }


def route_texts(model, texts: list[str]) -> list[int]:
    """Return the cluster of each text: 0 for a one-mask model, else the model's router on the text."""
    if model.config.num_clusters == 1:
        return [0] * len(texts)
    return [int(cluster) for cluster in model.route(list(texts))]


def text_windows(token_ids: list[int], window: int, max_tokens: int | None) -> list[list[int]]:
    """Cut a token sequence into consecutive windows of at most `window` tokens (at most `max_tokens` in all)."""
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    return [token_ids[start : start + window] for start in range(0, len(token_ids), window)
            if len(token_ids[start : start + window]) >= 2]


@torch.no_grad()
def window_nll(model, windows: list[list[int]], cluster_ids: list[int],
               pad_token_id: int) -> tuple[list[float], list[int]]:
    """Return the sum of next-token negative log-likelihoods of each right-padded window and its number of scored
    tokens."""
    device = model.device
    length = max(len(window) for window in windows)
    input_ids = torch.full((len(windows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), length), dtype=torch.long)
    for row, window in enumerate(windows):
        input_ids[row, : len(window)] = torch.tensor(window)
        attention_mask[row, : len(window)] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    logits = model(
        input_ids,
        attention_mask=attention_mask,
        cluster_ids=torch.tensor(cluster_ids, dtype=torch.long),
        use_cache=False,
    ).logits.float()
    log_probs = F.log_softmax(logits[:, :-1], dim=-1)
    targets = input_ids[:, 1:]
    token_nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    scored = attention_mask[:, 1:]
    row_nll = (token_nll.double() * scored).sum(dim=1)
    return row_nll.tolist(), scored.sum(dim=1).tolist()


def perplexity(model, tokenizer, texts: list[str], domain: str = "text", window: int = 512, batch_size: int = 8,
               max_tokens: int | None = None, add_bos: bool = False) -> PerplexityResult:
    """Token-weighted perplexity of `model` on `texts`: exp(total NLL / total scored tokens).

    Each text is routed once on its full text and tokenised on its own. Its tokens are cut into windows of `window`
    tokens that do not overlap; within a window every token but the first is scored. `max_tokens` caps the tokens
    taken per domain (texts are taken in order until the cap). Windows are sorted by length and batched by cluster.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}.")
    if not texts:
        raise ValueError(f"No texts to score for {domain}.")

    clusters = route_texts(model, texts)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # (cluster, window, text index) triples, taking texts in order until the token cap.
    items, remaining, counts = [], max_tokens, {}
    for index, (text, cluster) in enumerate(zip(texts, clusters)):
        token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if add_bos and tokenizer.bos_token_id is not None:
            token_ids = [tokenizer.bos_token_id] + token_ids
        windows = text_windows(token_ids, window, remaining)
        if not windows:
            continue
        items.extend((cluster, window_ids, index) for window_ids in windows)
        counts[str(cluster)] = counts.get(str(cluster), 0) + 1
        if remaining is not None:
            remaining -= sum(len(window_ids) for window_ids in windows)
            if remaining < 2:
                break

    # Longest windows first within each cluster, so padding stays small and the first batch needs the most memory.
    items.sort(key=lambda item: (item[0], -len(item[1])))
    text_nll, text_tokens = {}, {}
    for start in tqdm(range(0, len(items), batch_size), desc=f"perplexity {domain}", leave=False):
        batch = items[start : start + batch_size]
        rows_nll, rows_tokens = window_nll(model, [ids for _, ids, _ in batch], [c for c, _, _ in batch],
                                           pad_token_id)
        for (_, _, index), nll, tokens in zip(batch, rows_nll, rows_tokens):
            text_nll[index] = text_nll.get(index, 0.0) + nll
            text_tokens[index] = text_tokens.get(index, 0) + tokens

    order = sorted(text_nll)
    nll_sum, num_tokens = sum(text_nll.values()), sum(text_tokens.values())
    return PerplexityResult(domain, math.exp(nll_sum / num_tokens), nll_sum, num_tokens, len(order), counts,
                            [text_nll[index] for index in order], [text_tokens[index] for index in order])


def parse_domains(domains) -> list[str]:
    """Turn a comma-separated string or list of perplexity domains into a validated list (`all` = every domain)."""
    if isinstance(domains, str):
        domains = [name.strip() for name in domains.split(",") if name.strip()]
    if list(domains) == ["all"]:
        return list(PERPLEXITY_DOMAINS)
    unknown = [name for name in domains if name not in PERPLEXITY_DOMAINS]
    if unknown:
        raise ValueError(f"Unknown perplexity domain {unknown[0]!r}; choose from {', '.join(PERPLEXITY_DOMAINS)} or 'all'.")
    return list(domains)


def calibration_texts_of(model_dir: str | Path) -> set[str]:
    """Return the calibration texts a saved model was built from, redrawn from its `igp_run.json` (empty if none).

    The pipeline and the baselines record the calibration SPEC, seed and held-out count. Drawing again with the same
    values gives the same texts, because the draw is a seeded shuffle.
    """
    from .data import load_calibration

    record_path = Path(model_dir) / "igp_run.json"
    if not record_path.is_file():
        return set()
    record = json.loads(record_path.read_text())
    settings = record.get("settings", {}).get("prune", {})
    spec = settings.get("calibration") or record.get("calibration", {}).get("spec")
    if not spec:
        return set()
    calibration = load_calibration(spec, seed=settings.get("seed", 0),
                                   heldout_per_source=settings.get("heldout_per_source", 0))
    return set(calibration.texts)


def texts_digest(texts: list[str]) -> str:
    """SHA-256 of a list of texts, to check that two evaluations scored the same held-out text."""
    import hashlib

    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


def perplexity_settings(texts: list[str], window: int, max_tokens: int | None) -> dict:
    """Return what a perplexity result depends on besides the model: window, token cap and held-out texts."""
    return {"window": window, "max_tokens": max_tokens, "heldout_sha256": texts_digest(texts)}


def evaluate_perplexity(model, tokenizer, domains: list[str], data_dir: str | Path | None = None,
                        exclude: set[str] | None = None, max_tokens: int | None = None, window: int = 512,
                        batch_size: int = 8) -> dict:
    """Perplexity of each held-out domain; each entry also records the digest of the texts it scored."""
    data_dir = resolve_data_dir(data_dir)
    results = {}
    for domain in parse_domains(domains):
        start = time.perf_counter()
        texts = heldout_texts(domain, data_dir, exclude=exclude)
        result = perplexity(model, tokenizer, texts, domain=domain, window=window, batch_size=batch_size,
                            max_tokens=max_tokens)
        entry = result.to_dict()
        entry["texts_sha256"] = texts_digest(texts[: result.num_texts])
        entry["settings"] = perplexity_settings(texts, window, max_tokens)
        results[domain] = entry
        logger.info("Perplexity %s: %.3f over %d tokens of %d texts in %.1f s", domain, result.perplexity,
                    result.num_tokens, result.num_texts, time.perf_counter() - start)
    return results


# -- zero-shot accuracy with lm-evaluation-harness --------------------------------------------------------------------

def write_task_configs(output_dir: str | Path, data_dir: str | Path | None = None) -> Path:
    """Write the offline lm-eval task configs with absolute data paths into `output_dir`; return the folder.

    The folder works with `lm_eval --include_path DIR --tasks igp_hellaswag,...` as well as with `igp eval`.
    """
    data_dir = resolve_data_dir(data_dir)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Escaped for a double-quoted YAML string, the form every path in the templates uses.
    quoted_dir = json.dumps(data_dir.as_posix())[1:-1]
    for template in sorted(TASK_TEMPLATE_DIR.glob("*.yaml")):
        text = string.Template(template.read_text(encoding="utf-8")).substitute(data_dir=quoted_dir)
        (output_dir / template.name).write_text(text, encoding="utf-8")
    helper = (TASK_TEMPLATE_DIR / TASK_HELPER_MODULE).read_text(encoding="utf-8")
    (output_dir / TASK_HELPER_MODULE).write_text(helper, encoding="utf-8")
    return output_dir


def parse_task_names(tasks) -> list[str]:
    """Turn a comma-separated string or list of short task names into a validated list (`all` = every task)."""
    if isinstance(tasks, str):
        tasks = [name.strip() for name in tasks.split(",") if name.strip()]
    if list(tasks) == ["all"]:
        return list(ZERO_SHOT_TASKS)
    unknown = [name for name in tasks if name not in ZERO_SHOT_TASKS]
    if unknown:
        raise ValueError(f"Unknown zero-shot task {unknown[0]!r}; choose from {', '.join(ZERO_SHOT_TASKS)} or 'all'.")
    return list(tasks)


def seeded_subset(num_docs: int, limit: int | None, seed: int, task: str, exclude_limits=()) -> list[int]:
    """Return the sorted document indices of a fixed random subset of `limit` documents (all when None).

    With `exclude_limits`, the documents of the subsets of those sizes (same seed) are left out first, so the result
    is a second sample disjoint from the first, to check whether a difference seen there holds on other documents.
    """
    import random

    excluded = set()
    for excluded_limit in exclude_limits:
        excluded.update(seeded_subset(num_docs, excluded_limit, seed, task))
    if len(excluded) >= num_docs:
        raise ValueError(f"Excluding the subsets of {list(exclude_limits)} documents leaves none of the {num_docs} "
                         f"documents of {task}; exclude smaller subsets.")
    candidates = [index for index in range(num_docs) if index not in excluded]
    if limit is None or limit >= len(candidates):
        return candidates
    if limit < 1:
        raise ValueError(f"limit must be a positive number of documents, got {limit}.")
    # A string seed is hashed with SHA-512 by `random`, so the subset is the same in every process and version.
    # Without exclusion the seed string is the one stored results were drawn with.
    seed_text = f"{seed}:{task}"
    if exclude_limits:
        seed_text += f":excluding:{sorted(exclude_limits)}"
    return sorted(random.Random(seed_text).sample(candidates, limit))


def routing_text(requests) -> str:
    """Return the text one document is routed on: the part of its requests that every choice shares.

    That is the longest common prefix of the contexts, followed by the continuation when every choice has the same
    one (WinoGrande puts each option in the context and scores the same continuation). A document with one request
    (LAMBADA, a rolling perplexity text) is routed on its context only, so the target never steers the mask.
    """
    contexts = [request.args[0] for request in requests]
    continuations = [request.args[1] for request in requests if len(request.args) > 1 and isinstance(request.args[1], str)]
    text = os.path.commonprefix(contexts)
    if len(requests) > 1 and len(continuations) == len(requests) and len(set(continuations)) == 1:
        text += continuations[0]
    if not text.strip():
        # No shared text at all (choices with empty contexts): route on the first request in full.
        text = contexts[0] + (continuations[0] if continuations else "")
    return text


@register_model("igp")
class IGPruningLM(HFLM):
    """lm-eval model for `IGPruningForCausalLM`: each document is routed once and all its requests use that mask.

    Requests are grouped by cluster and each group runs through `HFLM`'s own batching and scoring with the cluster's
    mask, so acc and acc_norm are exactly lm-eval's. Use it as `lm_eval --model igp --model_args pretrained=DIR`
    (after importing this module) or pass a loaded model as `pretrained`.
    """

    def __init__(self, pretrained, **kwargs):
        kwargs.setdefault("backend", "causal")
        if not isinstance(pretrained, str) and kwargs.get("tokenizer") is None:
            kwargs["tokenizer"] = getattr(pretrained, "tokenizer", None)
        super().__init__(pretrained=pretrained, **kwargs)
        if getattr(self.model.config, "model_type", None) != "igp":
            raise ValueError(
                f"The igp lm-eval model needs an IGPruningForCausalLM, got model_type="
                f"{getattr(self.model.config, 'model_type', None)!r}. Use lm-eval's 'hf' model for plain checkpoints."
            )
        self.active_cluster = 0
        self.document_clusters: dict[tuple, int] = {}
        self.routing_seconds = 0.0

    # Cluster assignment --------------------------------------------------------------------------------------------

    def _document_key(self, request) -> tuple:
        if request.doc_id is None:
            return ("request", id(request))
        return (request.task_name, request.doc_id)

    def route_requests(self, requests) -> list[int]:
        """Return the cluster of each request, routing each document once on `routing_text`."""
        if self.model.config.num_clusters == 1:
            return [0] * len(requests)

        documents: dict[tuple, list] = {}
        for request in requests:
            documents.setdefault(self._document_key(request), []).append(request)
        new_keys = [key for key in documents if key not in self.document_clusters]
        if new_keys:
            start = time.perf_counter()
            clusters = self.model.route([routing_text(documents[key]) for key in new_keys])
            self.routing_seconds += time.perf_counter() - start
            self.document_clusters.update(zip(new_keys, (int(cluster) for cluster in clusters)))
        return [self.document_clusters[self._document_key(request)] for request in requests]

    def _per_cluster(self, requests, score_fn, disable_tqdm: bool):
        clusters = self.route_requests(requests)
        results = [None] * len(requests)
        for cluster in sorted(set(clusters)):
            indices = [index for index, value in enumerate(clusters) if value == cluster]
            self.active_cluster = cluster
            try:
                scores = score_fn([requests[index] for index in indices], disable_tqdm=disable_tqdm)
            finally:
                self.active_cluster = 0
            for index, score in zip(indices, scores):
                results[index] = score
        return results

    # lm-eval request types -----------------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._per_cluster(requests, super().loglikelihood, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._per_cluster(requests, super().loglikelihood_rolling, disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._per_cluster(requests, super().generate_until, disable_tqdm)

    # Model calls with the active cluster's mask ----------------------------------------------------------------

    def _cluster_ids(self, batch_size: int) -> torch.LongTensor:
        return torch.full((batch_size,), self.active_cluster, dtype=torch.long)

    def _model_call(self, inps, attn_mask=None, labels=None):
        if attn_mask is not None or labels is not None:
            raise ValueError("IGPruningForCausalLM is decoder-only; encoder-decoder calls are not supported.")
        with torch.no_grad(), torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            return self.model(inps, cluster_ids=self._cluster_ids(inps.shape[0]), use_cache=False).logits

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        return super()._model_generate(
            context, max_length, stop, cluster_ids=self._cluster_ids(context.shape[0]), **generation_kwargs
        )


@dataclass
class ZeroShotConfig:
    """Options of a zero-shot run."""

    tasks: tuple = tuple(ZERO_SHOT_TASKS)
    """Short task names (keys of `ZERO_SHOT_TASKS`)."""
    limit: int | None = None
    """Documents per task: a fixed random subset of this size (all documents when None)."""
    seed: int = 1234
    """Seed of the subset; the same seed gives the same documents in every run."""
    exclude_limits: tuple = ()
    """Subset sizes (same seed) whose documents the subset leaves out, for a second sample disjoint from the first."""
    batch_size: int = 16
    """Requests per forward pass."""
    bootstrap_iters: int = 1000
    """Bootstrap resamples for the standard error of non-mean metrics (LAMBADA perplexity)."""
    log_samples: bool = False
    """Keep each document's per-choice log-likelihoods and metric values in the result (`samples`), so that two
    models scored on the same documents can be compared document by document (`paired_zero_shot`). A model with
    several clusters also records the cluster each document was routed to."""


def build_tasks(task_names: list[str], task_dir: Path):
    """Load the lm-eval tasks from the generated configs; return the task manager and {short name: Task}.

    The manager indexes only `task_dir`, not lm-eval's thousands of built-in configs, which takes seconds instead of
    tens of seconds.
    """
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    loaded = manager.load([ZERO_SHOT_TASKS[name] for name in task_names])["tasks"]
    by_name = {task.config.task: task for task in loaded.values()}
    return manager, {name: by_name[ZERO_SHOT_TASKS[name]] for name in task_names}


def evaluate_zero_shot(lm, config: ZeroShotConfig, data_dir: str | Path | None = None,
                       task_dir: str | Path | None = None) -> dict:
    """Run the zero-shot tasks with lm-eval's `simple_evaluate` and return one compact result per task.

    `lm` is an lm-eval model (`IGPruningLM`, or lm-eval's `HFLM` for a plain checkpoint). Each task result holds
    lm-eval's metric values and standard errors, the number and indices of the documents scored, and, with
    `log_samples`, the per-request log-likelihoods.
    """
    import tempfile

    from lm_eval import simple_evaluate

    task_names = parse_task_names(list(config.tasks))
    with tempfile.TemporaryDirectory(prefix="igp-tasks-") as scratch:
        task_dir = Path(task_dir) if task_dir is not None else write_task_configs(scratch, data_dir)
        manager, tasks = build_tasks(task_names, task_dir)
        samples = {
            task.config.task: seeded_subset(len(task.eval_docs), config.limit, config.seed, name,
                                              tuple(config.exclude_limits))
            for name, task in tasks.items()
        }
        output = simple_evaluate(
            model=lm,
            tasks=list(tasks.values()),
            samples=samples,
            task_manager=manager,
            batch_size=config.batch_size,
            bootstrap_iters=config.bootstrap_iters,
            log_samples=config.log_samples,
            random_seed=config.seed,
            numpy_random_seed=config.seed,
            torch_random_seed=config.seed,
            fewshot_random_seed=config.seed,
        )

    results = {}
    for name, task in tasks.items():
        task_name = task.config.task
        raw = output["results"][task_name]
        entry = {"num_docs": len(samples[task_name]), "total_docs": len(task.eval_docs),
                 "doc_ids": samples[task_name]}
        for metric in TASK_METRICS[name]:
            entry[metric] = raw[f"{metric},none"]
            stderr = raw.get(f"{metric}_stderr,none")
            entry[f"{metric}_stderr"] = stderr if isinstance(stderr, (int, float)) else None
        if config.log_samples:
            # An `IGPruningLM` with several clusters keeps the cluster of each document it routed. lm-eval numbers
            # the documents of a `samples` subset by their position among the selected ones, so positions are mapped
            # back to document indices here.
            selected = sorted(samples[task_name])
            routed = {selected[position]: cluster
                      for (task, position), cluster in getattr(lm, "document_clusters", {}).items()
                      if task == task_name}
            entry["samples"] = [
                _logged_sample(sample, TASK_METRICS[name], routed.get(sample["doc_id"]))
                for sample in sorted(output["samples"][task_name], key=lambda sample: sample["doc_id"])
            ]
        results[name] = entry
    return results


def _logged_sample(sample: dict, metrics: tuple, cluster: int | None) -> dict:
    """Return one document's log-likelihood per choice, its accuracy metrics and, when routed, its cluster."""
    # lm-eval adds each document's metric values to its sample. LAMBADA's per-document "perplexity" is the target's
    # log-likelihood, which `loglikelihoods` already contains, so only the accuracy metrics are kept.
    logged = {"doc_id": sample["doc_id"], "loglikelihoods": [float(resp[0][0]) for resp in sample["resps"]],
              "metrics": {metric: float(sample[metric]) for metric in metrics if metric.startswith("acc")}}
    if cluster is not None:
        logged["cluster"] = cluster
    return logged


# -- paired comparison -----------------------------------------------------------------------------------------------
# Two models scored on the same texts and documents differ far less in their paired differences than their separate
# standard errors suggest, because most of the variance comes from which texts and questions were drawn. These
# functions give the difference of one model from a reference, with the standard error of that paired difference.


def paired_perplexity(entry: dict, reference: dict) -> dict | None:
    """Return the perplexity ratio of one model to a reference on the same held-out texts, with a standard error.

    Both entries are `evaluate_perplexity` results of one domain. The log ratio is the difference of the two
    token-weighted mean NLLs. Its standard error counts texts, not tokens, as the independent draws (the tokens of
    one text are correlated), with the linearised variance of a ratio of sums. Returns None when either entry lacks
    per-text sums (results written before they were kept).
    """
    # NOTE: the standard error rests on the number of texts, and the WikiText-2 domain scores only 3 articles at the
    # benchmark's 8,192 tokens, so its standard error is a rough estimate.
    nll, reference_nll = entry.get("text_nll_sums"), reference.get("text_nll_sums")
    if not nll or not reference_nll:
        return None
    tokens = entry["text_num_tokens"]
    if entry.get("texts_sha256") != reference.get("texts_sha256") or tokens != reference["text_num_tokens"]:
        raise ValueError("The two perplexity results were not scored on the same held-out texts (different text "
                         "digests or token counts); evaluate both models in one `igp eval` call.")

    num_texts, total_tokens = len(tokens), sum(tokens)
    differences = [a - b for a, b in zip(nll, reference_nll)]
    log_ratio = sum(differences) / total_tokens
    residuals = [difference - count * log_ratio for difference, count in zip(differences, tokens)]
    stderr = (math.sqrt(num_texts / (num_texts - 1) * sum(r * r for r in residuals)) / total_tokens
              if num_texts > 1 else None)
    return {
        "ratio": math.exp(log_ratio),
        "log_ratio": log_ratio,
        "log_ratio_stderr": stderr,
        "num_texts": num_texts,
        "texts_lower": sum(1 for a, b in zip(nll, reference_nll) if a < b),
    }


def paired_zero_shot(entry: dict, reference: dict, metric: str) -> dict | None:
    """Return the accuracy difference of one model from a reference on the documents both scored, with its standard
    error.

    Both entries are `evaluate_zero_shot` task results written with `log_samples`. Returns None when either lacks
    per-document metric values or they share no document.
    """
    def values(task_entry):
        return {sample["doc_id"]: sample["metrics"][metric] for sample in task_entry.get("samples", [])
                if metric in sample.get("metrics", {})}

    own, other = values(entry), values(reference)
    shared = sorted(own.keys() & other.keys())
    if not shared:
        return None
    differences = [own[doc] - other[doc] for doc in shared]
    return {
        "difference": statistics.mean(differences),
        "stderr": statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else None,
        "num_docs": len(shared),
        "docs_better": sum(1 for difference in differences if difference > 0),
        "docs_worse": sum(1 for difference in differences if difference < 0),
    }


def mean_difference(paired: list[dict]) -> dict | None:
    """Return the mean of per-task `paired_zero_shot` differences, with the standard error of independent tasks."""
    if not paired or any(item["stderr"] is None for item in paired):
        return None
    return {
        "difference": statistics.mean(item["difference"] for item in paired),
        "stderr": math.sqrt(sum(item["stderr"] ** 2 for item in paired)) / len(paired),
        "num_tasks": len(paired),
    }


def pool_zero_shot(entries: list[dict]) -> dict:
    """Return one task result for the documents of several `evaluate_zero_shot` results of that task, as if one run
    had scored them all.

    The entries must score disjoint documents (a first sample and those of `--exclude-limits`). Accuracies are the
    document-weighted means, and their standard errors add as those of independent samples. LAMBADA's perplexity is
    the exponential of the weighted mean log perplexity, without a standard error (lm-eval bootstraps it). Per-document
    samples are kept only when every entry has them.
    """
    seen = set()
    for entry in entries:
        overlap = seen & set(entry["doc_ids"])
        if overlap:
            raise ValueError(f"Invalid samples to pool: they share {len(overlap)} documents, for example document "
                             f"{min(overlap)}. Pool disjoint samples, such as a second one drawn with "
                             "`igp eval --exclude-limits`.")
        seen |= set(entry["doc_ids"])

    counts = [entry["num_docs"] for entry in entries]
    total = sum(counts)
    pooled = {"num_docs": total, "total_docs": entries[0]["total_docs"], "doc_ids": sorted(seen),
              "settings": [entry.get("settings") for entry in entries]}
    metrics = [key for key in entries[0] if f"{key}_stderr" in entries[0]]
    for metric in metrics:
        if metric.startswith("acc"):
            pooled[metric] = sum(count * entry[metric] for count, entry in zip(counts, entries)) / total
            stderrs = [entry[f"{metric}_stderr"] for entry in entries]
            if None in stderrs:
                pooled[f"{metric}_stderr"] = None
            else:
                weighted = sum((count * stderr) ** 2 for count, stderr in zip(counts, stderrs))
                pooled[f"{metric}_stderr"] = math.sqrt(weighted) / total
        else:
            pooled[metric] = math.exp(sum(count * math.log(entry[metric]) for count, entry in zip(counts, entries))
                                      / total)
            pooled[f"{metric}_stderr"] = None
    if all("samples" in entry for entry in entries):
        pooled["samples"] = sorted((sample for entry in entries for sample in entry["samples"]),
                                   key=lambda sample: sample["doc_id"])
    return pooled


# -- speed and memory ------------------------------------------------------------------------------------------------


@dataclass
class SpeedConfig:
    """Options of a speed and memory measurement."""

    prompt_tokens: int = 128
    """Tokens per prompt (every row of a batch has this length, so no padding is involved)."""
    new_tokens: int = 32
    """Greedy decoding steps timed after the prefill."""
    batch_sizes: tuple = (1, 8)
    """Batch sizes to measure."""
    repeats: int = 3
    """Measurements per model; the median is reported. Models are measured in turn within each repeat, so a change
    in machine load affects all of them alike."""
    isolate: bool = True
    """Measure each model in a fresh process, so peak memory (the process's maximum resident set size on CPU) belongs
    to that model alone."""


def speed_prompts(tokenizer, data_dir: str | Path | None, count: int, prompt_tokens: int) -> list[list[int]]:
    """Return `count` prompts of exactly `prompt_tokens` tokens: the openings of held-out WikiText-2 articles."""
    articles = heldout_texts("wikitext2", resolve_data_dir(data_dir))
    prompts = []
    for article in articles:
        token_ids = tokenizer(article, add_special_tokens=False)["input_ids"]
        if len(token_ids) >= prompt_tokens:
            prompts.append(token_ids[:prompt_tokens])
        if len(prompts) == count:
            return prompts
    raise ValueError(f"Only {len(prompts)} WikiText-2 test articles have {prompt_tokens} tokens; lower prompt_tokens.")


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of a transformers cache (layers that stored nothing count zero)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(model, tokenizer, prompts: list[list[int]], config: SpeedConfig) -> dict:
    """Time prefill and greedy decoding of `model` at each batch size; return throughput, cache and router figures.

    For an `IGPruningForCausalLM` each prompt is routed on its text first (timed as router time, not part of
    prefill), then prefill and decoding run with the routed masks. A plain causal LM runs with its default cache.
    """
    from transformers import DynamicCache

    from modeling_igp import IGPruningCache

    is_igp = getattr(model.config, "model_type", None) == "igp"
    device = model.device
    results = {}
    for batch_size in config.batch_sizes:
        rows = prompts[:batch_size]
        if len(rows) < batch_size:
            raise ValueError(f"Need {batch_size} prompts for batch size {batch_size}, got {len(prompts)}.")
        input_ids = torch.tensor(rows, dtype=torch.long, device=device)
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in rows]

        mask_kwargs, router_seconds = {}, 0.0
        if is_igp:
            start = time.perf_counter()
            clusters = route_texts(model, texts)
            router_seconds = time.perf_counter() - start
            mask_kwargs["block_mask"] = torch.tensor(model.config.mask_bank, dtype=torch.bool)[clusters]

        def new_cache():
            return IGPruningCache(model.config.num_layers) if is_igp else DynamicCache(config=model.config)

        # One untimed pass first: the first call of a shape pays for allocations that later calls reuse.
        model(input_ids, cache=new_cache(), use_cache=True, logits_to_keep=1, **mask_kwargs)

        cache = new_cache()
        _synchronize(device)
        start = time.perf_counter()
        output = model(input_ids, cache=cache, use_cache=True, logits_to_keep=1, **mask_kwargs)
        _synchronize(device)
        prefill_seconds = time.perf_counter() - start

        next_tokens = output.logits[:, -1:].argmax(dim=-1)
        start = time.perf_counter()
        for _ in range(config.new_tokens):
            output = model(next_tokens, cache=cache, use_cache=True, **mask_kwargs)
            next_tokens = output.logits[:, -1:].argmax(dim=-1)
        _synchronize(device)
        decode_seconds = time.perf_counter() - start

        cached_tokens = config.prompt_tokens + config.new_tokens
        cache_bytes = kv_cache_bytes(cache)
        results[f"batch_{batch_size}"] = {
            "prefill_tokens_per_s": batch_size * config.prompt_tokens / prefill_seconds,
            "decode_tokens_per_s": batch_size * config.new_tokens / decode_seconds,
            "router_ms": 1000.0 * router_seconds,
            "kv_cache_bytes": cache_bytes,
            "kv_cache_bytes_per_token": cache_bytes / (batch_size * cached_tokens),
        }
    return results


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    # Linux reports ru_maxrss in KiB.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def load_for_eval(model_dir: str | Path, device: str = "cpu"):
    """Load a saved model folder (an IGPruningForCausalLM or a plain causal LM) and its tokenizer, in eval mode."""
    import modeling_igp  # noqa: F401  (registers the igp model type with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"No saved model in {model_dir} (config.json is missing).")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tokenizer = getattr(model, "tokenizer", None) or AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _speed_worker(model_dir: str, config: dict, data_dir: str | None, device: str, num_threads: int) -> dict:
    """Measure one model in the current process: load it, time it, and report its peak memory."""
    torch.set_num_threads(num_threads)
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    model, tokenizer = load_for_eval(model_dir, device)
    speed_config = SpeedConfig(**config)
    prompts = speed_prompts(tokenizer, data_dir, max(speed_config.batch_sizes), speed_config.prompt_tokens)
    result = measure_speed(model, tokenizer, prompts, speed_config)
    result["peak_memory_bytes"] = _peak_memory_bytes(torch_device)
    result["weight_bytes"] = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    return result


def measure_speed_many(model_dirs: list[str | Path], config: SpeedConfig, data_dir: str | Path | None = None,
                       device: str = "cpu") -> dict:
    """Measure several saved models in one run, in turn, `config.repeats` times; return the medians per model.

    Throughputs and router times are medians over the repeats, peak memory the maximum. With `config.isolate`, each
    measurement runs in a fresh process (spawned), so the peak memory is that model's alone.
    """
    import multiprocessing

    data_dir = str(resolve_data_dir(data_dir))
    worker_config = {key: value for key, value in config.__dict__.items() if key in ("prompt_tokens", "new_tokens",
                                                                                      "batch_sizes")}
    runs = {str(model_dir): [] for model_dir in model_dirs}
    context = multiprocessing.get_context("spawn")
    for repeat in range(config.repeats):
        for model_dir in runs:
            start = time.perf_counter()
            args = (model_dir, worker_config, data_dir, device, torch.get_num_threads())
            if config.isolate:
                with context.Pool(1) as pool:
                    runs[model_dir].append(pool.apply(_speed_worker, args))
            else:
                runs[model_dir].append(_speed_worker(*args))
            logger.info("Speed %s, repeat %d/%d: %.1f s", model_dir, repeat + 1, config.repeats,
                        time.perf_counter() - start)

    summary = {}
    for model_dir, measurements in runs.items():
        entry = {"repeats": len(measurements), "settings": dict(worker_config, device=device,
                                                               num_threads=torch.get_num_threads())}
        for batch_key in measurements[0]:
            if not batch_key.startswith("batch_"):
                continue
            entry[batch_key] = {
                metric: statistics.median(run[batch_key][metric] for run in measurements)
                for metric in measurements[0][batch_key]
            }
        entry["peak_memory_bytes"] = max(run["peak_memory_bytes"] for run in measurements)
        entry["weight_bytes"] = measurements[0]["weight_bytes"]
        summary[model_dir] = entry
    return summary
