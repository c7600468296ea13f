"""Evaluation: perplexity against direct computations, the lm-eval adapter against lm-eval's own `hf` model, the
offline task configs against the documented dataset sizes, speed figures, and the eval / compare commands.

Models are tiny random Llamas with SmolLM2's vocabulary, so lm-eval tokenises real benchmark text with a real
tokenizer. The benchmark files come from the data folder (`$IGP_DATA_DIR`, else `../shared/data` from the current
directory); tests that need them are skipped without it.
"""

import json
import math
import random
import statistics
import sys

import pytest
import torch

from conftest import identity_blocks, tiny_base
from igp_training import cli, evaluation
from igp_training.evaluation import (
    HFLM,
    IGPruningLM,
    SpeedConfig,
    ZeroShotConfig,
    evaluate_perplexity,
    evaluate_zero_shot,
    heldout_texts,
    measure_speed,
    perplexity,
    routing_text,
    seeded_subset,
)
from modeling_igp import IGPruningForCausalLM

NUM_LAYERS = 4
SKIP_MASK = [1, 0, 1, 1, 0, 0, 1, 1]  # layer 0's MLP and all of layer 2 skipped


@pytest.fixture(scope="module")
def data_dir():
    try:
        return evaluation.resolve_data_dir(None)
    except FileNotFoundError:
        pytest.skip("benchmark data folder not found (set IGP_DATA_DIR)")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from igp_training.assets import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def base(tokenizer):
    return tiny_base("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def dense(base, tokenizer):
    return IGPruningForCausalLM.from_base(base, [[1] * (2 * NUM_LAYERS)], tokenizer=tokenizer)


def _gsm8k_texts(data_dir, count):
    return heldout_texts("gsm8k", data_dir)[:count]


# -- perplexity ----------------------------------------------------------------------------------------------------


def direct_nll(model, ids, window, mask=None):
    """Return the sum of the token NLLs of one token sequence and their count, from the model's own loss on each
    window alone (skipped blocks replaced by the identity)."""
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = torch.tensor([ids[start : start + window]])
        if chunk.shape[1] < 2:
            continue
        with torch.no_grad():
            if mask is None:
                loss = model(chunk, labels=chunk).loss
            else:
                with identity_blocks(model, mask):
                    loss = model(chunk, labels=chunk).loss
        nll += float(loss) * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    return nll, count


def direct_perplexity(model, tokenizer, texts, window, mask=None):
    """Return exp(sum of token NLLs / token count) over `texts`, each scored by `direct_nll`, and the token count."""
    nll, count = 0.0, 0
    for text in texts:
        text_nll, text_count = direct_nll(model, tokenizer(text, add_special_tokens=False)["input_ids"], window, mask)
        nll += text_nll
        count += text_count
    return math.exp(nll / count), count


def routed_model(base, tokenizer, router, texts, centroid_texts):
    """Return a two-cluster model (dense mask and SKIP_MASK, centroids embedded from two texts), its bank and the
    cluster of each of `texts`."""
    centroids = router.embed(centroid_texts)
    bank = [[1] * (2 * NUM_LAYERS), SKIP_MASK]
    model = IGPruningForCausalLM.from_base(base, bank, centroids=centroids, router=router, tokenizer=tokenizer)
    return model, bank, router.route(texts, centroids).tolist()


def test_perplexity_dense_matches_base_loss(dense, base, tokenizer, data_dir):
    texts = _gsm8k_texts(data_dir, 5)
    result = perplexity(dense, tokenizer, texts, window=48, batch_size=3)
    expected, count = direct_perplexity(base, tokenizer, texts, window=48)

    assert result.num_tokens == count
    assert result.num_texts == 5
    assert result.perplexity == pytest.approx(expected, rel=1e-5)


def test_perplexity_static_mask_matches_identity_reference(base, tokenizer, data_dir):
    model = IGPruningForCausalLM.from_base(base, [SKIP_MASK], tokenizer=tokenizer)
    texts = _gsm8k_texts(data_dir, 4)
    result = perplexity(model, tokenizer, texts, window=40, batch_size=4)
    expected, _ = direct_perplexity(base, tokenizer, texts, window=40, mask=SKIP_MASK)

    assert result.perplexity == pytest.approx(expected, rel=1e-5)


def test_perplexity_routes_each_text(base, tokenizer, router, data_dir):
    texts = _gsm8k_texts(data_dir, 2) + heldout_texts("github", data_dir)[:2]
    model, bank, clusters = routed_model(base, tokenizer, router, texts, [texts[0], texts[2]])
    result = perplexity(model, tokenizer, texts, window=64, batch_size=3, max_tokens=None)

    nll, count = 0.0, 0
    for text, cluster in zip(texts, clusters):
        text_ppl, text_count = direct_perplexity(base, tokenizer, [text], window=64, mask=bank[cluster])
        nll += math.log(text_ppl) * text_count
        count += text_count
    assert sorted(set(clusters)) == [0, 1]
    assert result.clusters == {"0": clusters.count(0), "1": clusters.count(1)}
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_max_tokens_caps_scored_tokens(dense, tokenizer, data_dir):
    result = perplexity(dense, tokenizer, _gsm8k_texts(data_dir, 20), window=32, max_tokens=100)

    # 100 tokens in windows of at most 32: every window loses its first token as a target.
    assert 100 - 2 * math.ceil(100 / 32) <= result.num_tokens <= 100 - math.ceil(100 / 32)


def test_perplexity_keeps_each_text_nll(base, tokenizer, router, data_dir):
    # Two clusters, windows batched across texts and a token cap that cuts the last text. Each text's sum must still
    # be the loss of its own windows under its own cluster's mask.
    texts = _gsm8k_texts(data_dir, 3) + heldout_texts("github", data_dir)[:2]
    model, bank, clusters = routed_model(base, tokenizer, router, texts, [texts[0], texts[3]])
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    # No text before the last ends in a one-token window (which is not scored and not counted against the cap).
    assert all(length % 40 != 1 for length in lengths[:4])
    max_tokens = sum(lengths[:4]) + 50
    result = perplexity(model, tokenizer, texts, window=40, batch_size=3, max_tokens=max_tokens)

    assert result.num_texts == 5
    assert result.text_num_tokens[-1] < lengths[-1] - 1
    for index, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: lengths[index] if index < 4 else 50]
        nll, tokens = direct_nll(base, ids, 40, bank[clusters[index]])
        assert result.text_num_tokens[index] == tokens
        assert result.text_nll_sums[index] == pytest.approx(nll, rel=1e-5)
    assert sum(result.text_nll_sums) == pytest.approx(result.nll_sum)


# -- paired comparison ------------------------------------------------------------------------------------------------


def _perplexity_entry(nll, tokens, digest="texts"):
    return {"text_nll_sums": nll, "text_num_tokens": tokens, "texts_sha256": digest}


def test_paired_perplexity_of_identical_results():
    entry = _perplexity_entry([30.0, 52.5, 7.25], [10, 20, 3])
    paired = evaluation.paired_perplexity(entry, entry)

    assert paired["ratio"] == 1.0
    assert paired["log_ratio_stderr"] == 0.0
    assert paired["texts_lower"] == 0


def test_paired_perplexity_standard_error_matches_jackknife():
    # The linearised standard error and the delete-one jackknife over texts estimate the same quantity, so on 300
    # texts of uneven length they agree within a few percent.
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(20, 400, (300,), generator=generator).tolist()
    reference = [3.0 * count + float(torch.randn(1, generator=generator)) * count ** 0.5 for count in tokens]
    model = [nll + count * (0.05 + 0.1 * float(torch.randn(1, generator=generator))) for nll, count in
             zip(reference, tokens)]
    paired = evaluation.paired_perplexity(_perplexity_entry(model, tokens), _perplexity_entry(reference, tokens))

    def log_ratio(keep):
        return (sum(model[i] for i in keep) - sum(reference[i] for i in keep)) / sum(tokens[i] for i in keep)

    everything = range(len(tokens))
    assert paired["log_ratio"] == pytest.approx(log_ratio(everything))
    leave_one_out = [log_ratio([j for j in everything if j != i]) for i in everything]
    mean = sum(leave_one_out) / len(tokens)
    jackknife = math.sqrt((len(tokens) - 1) / len(tokens) * sum((value - mean) ** 2 for value in leave_one_out))
    assert paired["log_ratio_stderr"] == pytest.approx(jackknife, rel=0.05)
    assert paired["ratio"] == pytest.approx(math.exp(log_ratio(everything)))


def test_paired_perplexity_rejects_different_texts():
    with pytest.raises(ValueError, match="same held-out texts"):
        evaluation.paired_perplexity(_perplexity_entry([1.0], [5], "a"), _perplexity_entry([1.0], [5], "b"))
    assert evaluation.paired_perplexity({"perplexity": 3.0}, _perplexity_entry([1.0], [5])) is None


def test_paired_zero_shot_on_shared_documents():
    def entry(values):
        return {"samples": [{"doc_id": doc, "metrics": {"acc": value}} for doc, value in values.items()]}

    model = entry({0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0, 7: 1.0})
    reference = entry({0: 0.0, 1: 0.0, 2: 1.0, 3: 0.0, 9: 0.0})
    paired = evaluation.paired_zero_shot(model, reference, "acc")

    # Documents 0 to 3 are shared, with differences 1, 0, 0 and 1.
    assert paired["num_docs"] == 4
    assert paired["difference"] == 0.5
    assert paired["stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert paired["docs_better"] == 2
    assert paired["docs_worse"] == 0
    assert evaluation.paired_zero_shot(model, entry({}), "acc") is None

    mean = evaluation.mean_difference([paired, dict(paired, difference=-0.5)])
    assert mean["difference"] == 0.0
    assert mean["stderr"] == pytest.approx(paired["stderr"] / math.sqrt(2))


def test_pool_zero_shot_disjoint_samples():
    def entry(doc_ids, values, lambada_perplexity):
        accuracy = sum(values) / len(values)
        return {"num_docs": len(doc_ids), "total_docs": 100, "doc_ids": doc_ids, "settings": {"limit": len(doc_ids)},
                "acc": accuracy, "acc_stderr": statistics.stdev(values) / math.sqrt(len(values)),
                "perplexity": lambada_perplexity, "perplexity_stderr": 1.0,
                "samples": [{"doc_id": doc, "metrics": {"acc": value}} for doc, value in zip(doc_ids, values)]}

    first, second = entry([4, 9], [1.0, 0.0], 20.0), entry([1, 2, 7, 8], [1.0, 1.0, 0.0, 1.0], 80.0)
    pooled = evaluation.pool_zero_shot([first, second])

    assert pooled["num_docs"] == 6
    assert pooled["doc_ids"] == [1, 2, 4, 7, 8, 9]
    assert pooled["acc"] == pytest.approx(4 / 6)
    # Standard errors of independent samples: the variance of the pooled mean is sum((n_i / n)^2 * se_i^2).
    assert pooled["acc_stderr"] == pytest.approx(math.sqrt((2 / 6 * first["acc_stderr"]) ** 2 +
                                                           (4 / 6 * second["acc_stderr"]) ** 2))
    assert pooled["perplexity"] == pytest.approx(math.exp((2 * math.log(20.0) + 4 * math.log(80.0)) / 6))
    assert pooled["perplexity_stderr"] is None
    assert [sample["doc_id"] for sample in pooled["samples"]] == pooled["doc_ids"]

    with pytest.raises(ValueError, match="share 1 documents, .*document 9"):
        evaluation.pool_zero_shot([first, entry([9, 10], [0.0, 1.0], 5.0)])


def test_heldout_texts_skip_calibration_records(data_dir):
    tail = heldout_texts("c4", data_dir, num_records=5)
    shifted = heldout_texts("c4", data_dir, exclude={tail[-1]}, num_records=5)

    assert len(tail) == len(shifted) == 5
    assert tail[-1] not in shifted
    assert shifted[1:] == tail[:-1]


def test_heldout_wikitext_is_split_into_articles(data_dir):
    articles = heldout_texts("wikitext2", data_dir)

    assert len(articles) == 62  # the WikiText-2 test split has 62 articles
    assert articles[0].startswith("= Robert <unk> =")


# -- lm-eval adapter --------------------------------------------------------------------------------------------------

ADAPTER_TASKS = ("piqa", "winogrande", "arc_challenge", "lambada")


def _loglikelihoods(results):
    return {task: [sample["loglikelihoods"] for sample in entry["samples"]] for task, entry in results.items()}


def _run(lm, data_dir, limit=4, tasks=ADAPTER_TASKS):
    config = ZeroShotConfig(tasks=tasks, limit=limit, seed=7, batch_size=4, log_samples=True)
    return evaluate_zero_shot(lm, config, data_dir)


def test_adapter_matches_lm_eval_hf_on_dense(dense, base, tokenizer, data_dir):
    ours = _run(IGPruningLM(pretrained=dense, batch_size=4), data_dir)
    reference = _run(HFLM(pretrained=base, tokenizer=tokenizer, batch_size=4), data_dir)

    for task in ADAPTER_TASKS:
        assert ours[task]["doc_ids"] == reference[task]["doc_ids"]
        assert ours[task]["acc"] == reference[task]["acc"]
        assert ours[task]["acc_stderr"] == pytest.approx(reference[task]["acc_stderr"])
        ours_ll, reference_ll = _loglikelihoods(ours)[task], _loglikelihoods(reference)[task]
        assert torch.allclose(torch.tensor(ours_ll), torch.tensor(reference_ll), atol=1e-4)


@pytest.fixture(scope="module")
def two_cluster_runs(base, tokenizer, router, data_dir):
    """Zero-shot results of a two-cluster model, and those of the plain base model under each of its two masks."""
    # Centroids at the prompts of two PIQA questions, so both clusters receive documents.
    piqa_docs = [json.loads(line) for line in open(data_dir / "piqa" / "valid.jsonl", encoding="utf-8")]
    doc_ids = seeded_subset(len(piqa_docs), 4, 7, "piqa")
    prompts = [f"Question: {piqa_docs[index]['goal']}\nAnswer:" for index in doc_ids[:2]]
    bank = [[1] * (2 * NUM_LAYERS), SKIP_MASK]
    model = IGPruningForCausalLM.from_base(base, bank, centroids=router.embed(prompts), router=router,
                                           tokenizer=tokenizer)
    ours = _run(IGPruningLM(pretrained=model, batch_size=4), data_dir, tasks=("piqa", "winogrande"))
    by_mask = []
    for mask in bank:
        with identity_blocks(base, mask):
            by_mask.append(_loglikelihoods(_run(HFLM(pretrained=base, tokenizer=tokenizer, batch_size=4), data_dir,
                                                tasks=("piqa", "winogrande"))))
    return ours, by_mask


def _matching_masks(scores, by_mask, task, index):
    return [cluster for cluster in range(len(by_mask))
            if torch.allclose(torch.tensor(scores), torch.tensor(by_mask[cluster][task][index]), atol=1e-4)]


def test_adapter_scores_every_choice_with_one_mask(two_cluster_runs):
    ours, by_mask = two_cluster_runs

    used = set()
    for task, documents in _loglikelihoods(ours).items():
        for index, scores in enumerate(documents):
            matches = _matching_masks(scores, by_mask, task, index)
            assert len(matches) == 1, f"{task} document {index} mixes masks across its choices"
            used.add(matches[0])
    assert used == {0, 1}


def test_logged_samples_name_the_routed_cluster(two_cluster_runs):
    ours, by_mask = two_cluster_runs

    for task, entry in ours.items():
        for index, sample in enumerate(entry["samples"]):
            matches = _matching_masks(sample["loglikelihoods"], by_mask, task, index)
            assert [sample["cluster"]] == matches, f"{task} document {sample['doc_id']}"


def test_logged_samples_of_one_mask_have_no_cluster(dense, data_dir):
    results = _run(IGPruningLM(pretrained=dense, batch_size=4), data_dir, tasks=("piqa",))

    assert all("cluster" not in sample for sample in results["piqa"]["samples"])


def test_routing_text_uses_shared_part():
    class Request:
        def __init__(self, *args):
            self.args = args

    multiple_choice = [Request("Question: why?\nAnswer:", " because"), Request("Question: why?\nAnswer:", " no")]
    partial = [Request("The trophy does not fit because the trophy", " is too big."),
               Request("The trophy does not fit because the suitcase", " is too big.")]
    single = [Request("He looked at the", " sky")]

    assert routing_text(multiple_choice) == "Question: why?\nAnswer:"
    assert routing_text(partial) == "The trophy does not fit because the  is too big."
    assert routing_text(single) == "He looked at the"


def test_seeded_subset_is_fixed_per_task():
    first = seeded_subset(1000, 50, 1234, "piqa")

    assert first == seeded_subset(1000, 50, 1234, "piqa")
    assert first != seeded_subset(1000, 50, 1234, "boolq")
    assert first == sorted(set(first))
    assert len(first) == 50
    assert seeded_subset(30, 50, 1234, "piqa") == list(range(30))


def test_seeded_subset_excluding_earlier_subsets():
    first, second = seeded_subset(500, 200, 1234, "piqa"), seeded_subset(500, 50, 1234, "piqa")
    disjoint = seeded_subset(500, 200, 1234, "piqa", exclude_limits=(50, 200))

    # Without exclusion the subset is the plain seeded draw that stored results name.
    assert first == sorted(random.Random("1234:piqa").sample(range(500), 200))
    assert len(disjoint) == 200
    assert not set(disjoint) & (set(first) | set(second))
    assert disjoint == seeded_subset(500, 200, 1234, "piqa", exclude_limits=(50, 200))
    assert seeded_subset(300, None, 1234, "piqa", exclude_limits=(200,)) == sorted(
        set(range(300)) - set(seeded_subset(300, 200, 1234, "piqa")))
    with pytest.raises(ValueError, match="leaves none of the 150 documents"):
        seeded_subset(150, 10, 1234, "piqa", exclude_limits=(200,))


def test_task_configs_load_every_document(data_dir, tmp_path):
    _, tasks = evaluation.build_tasks(list(evaluation.ZERO_SHOT_TASKS), evaluation.write_task_configs(tmp_path, data_dir))
    sizes = {name: len(task.eval_docs) for name, task in tasks.items()}

    # Dataset sizes as documented with the data files.
    assert sizes == {"hellaswag": 10042, "piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "winogrande": 1267,
                     "boolq": 3270, "openbookqa": 500, "lambada": 5153}
    first = tasks["hellaswag"].eval_docs[0]
    assert first["label"] == 3
    assert first["choices"][3] == "starts pulling up roofing on a roof."
    assert tasks["arc_challenge"].eval_docs[0]["id"] == "Mercury_7175875"
    assert tasks["boolq"].doc_to_target(tasks["boolq"].eval_docs[0]) in (0, 1)


def test_evaluation_is_repeatable(dense, tokenizer, data_dir):
    def run_once():
        lm = IGPruningLM(pretrained=dense, batch_size=4)
        zero_shot = evaluate_zero_shot(lm, ZeroShotConfig(tasks=("piqa", "lambada"), limit=3, batch_size=4),
                                       data_dir)
        ppl = evaluate_perplexity(dense, tokenizer, ["gsm8k"], data_dir, max_tokens=300, window=64)
        return zero_shot, ppl

    assert run_once() == run_once()


# -- speed --------------------------------------------------------------------------------------------------------


def test_measure_speed_counts_cache_of_kept_attention(base, tokenizer):
    # Layer 2's attention is skipped, so 3 of 4 layers hold keys and values.
    model = IGPruningForCausalLM.from_base(base, [SKIP_MASK], tokenizer=tokenizer)
    config = SpeedConfig(prompt_tokens=6, new_tokens=3, batch_sizes=(1, 2))
    prompts = [[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26]]
    result = measure_speed(model, tokenizer, prompts, config)

    text_config = base.config
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    per_token_per_layer = 2 * text_config.num_key_value_heads * head_dim * 4  # keys and values, float32
    for batch_size in (1, 2):
        entry = result[f"batch_{batch_size}"]
        assert entry["kv_cache_bytes"] == 3 * batch_size * (6 + 3) * per_token_per_layer
        assert entry["prefill_tokens_per_s"] > 0
        assert entry["decode_tokens_per_s"] > 0


# -- commands -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_models(base, tokenizer, tmp_path_factory):
    folders = {}
    for name, mask in (("dense", [1] * (2 * NUM_LAYERS)), ("skip", SKIP_MASK)):
        folder = tmp_path_factory.mktemp(name)
        IGPruningForCausalLM.from_base(base, [mask], tokenizer=tokenizer).save_pretrained(folder)
        folders[name] = folder
    return folders


def test_eval_and_compare_commands(saved_models, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["igp", "eval"])
    models = [str(saved_models["dense"]), str(saved_models["skip"])]
    status = cli.main(["eval", "--model", *models, "--tasks", "piqa", "--limit", "3", "--ppl", "gsm8k",
                       "--ppl-max-tokens", "200", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "eval")])
    first = json.loads((tmp_path / "eval" / f"{saved_models['dense'].name}.json").read_text())

    assert status == 0
    assert first["zero_shot"]["piqa"]["num_docs"] == 3
    assert first["perplexity"]["gsm8k"]["num_tokens"] > 0

    # A second run finds every result in place and recomputes nothing.
    cli.main(["eval", "--model", *models, "--tasks", "piqa", "--limit", "3", "--ppl", "gsm8k",
              "--ppl-max-tokens", "200", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "eval")])
    assert json.loads((tmp_path / "eval" / f"{saved_models['dense'].name}.json").read_text())["zero_shot"] == \
        first["zero_shot"]

    status = cli.main(["compare", *models, "--eval-dir", str(tmp_path / "eval"), "--output-dir",
                       str(tmp_path / "compare")])
    output = capsys.readouterr().out
    content = json.loads((tmp_path / "compare" / "compare.json").read_text())

    assert status == 0
    assert "ppl gsm8k" in output
    assert [row["method"] for row in content["models"]] == ["dense", "static"]
    assert content["mismatched_perplexity_texts"] == []
    for name in ("compare.md", "accuracy_vs_sparsity.png", "perplexity.png", "masks.png"):
        assert (tmp_path / "compare" / name).stat().st_size > 0


def test_eval_log_samples_and_paired_compare(saved_models, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["igp", "eval"])
    models = [str(saved_models["dense"]), str(saved_models["skip"])]
    arguments = ["eval", "--model", *models, "--tasks", "piqa,boolq", "--limit", "6", "--ppl", "gsm8k",
                 "--ppl-max-tokens", "300", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "eval")]
    cli.main(arguments)
    without = json.loads((tmp_path / "eval" / f"{saved_models['skip'].name}.json").read_text())
    assert "samples" not in without["zero_shot"]["piqa"]

    # Asking for samples recomputes the tasks that lack them; the per-document values average to lm-eval's figure.
    cli.main(arguments + ["--log-samples"])
    results = {name: json.loads((tmp_path / "eval" / f"{folder.name}.json").read_text())
               for name, folder in saved_models.items()}
    for result in results.values():
        for task, metric in (("piqa", "acc_norm"), ("boolq", "acc")):
            samples = result["zero_shot"][task]["samples"]
            assert [sample["doc_id"] for sample in samples] == sorted(result["zero_shot"][task]["doc_ids"])
            assert sum(sample["metrics"][metric] for sample in samples) / 6 == pytest.approx(
                result["zero_shot"][task][metric])

    status = cli.main(["compare", *models, "--eval-dir", str(tmp_path / "eval"), "--output-dir",
                       str(tmp_path / "compare"), "--paired", models[0]])
    output = capsys.readouterr().out
    paired = json.loads((tmp_path / "compare" / "compare.json").read_text())["paired"]

    assert status == 0
    assert f"Against {saved_models['dense'].name}" in output
    assert list(paired) == [saved_models["skip"].name]
    dense, skip = results["dense"], results["skip"]
    assert paired[saved_models["skip"].name]["perplexity"]["gsm8k"]["ratio"] == pytest.approx(
        skip["perplexity"]["gsm8k"]["perplexity"] / dense["perplexity"]["gsm8k"]["perplexity"], rel=1e-9)
    assert paired[saved_models["skip"].name]["zero_shot"]["piqa"]["difference"] == pytest.approx(
        skip["zero_shot"]["piqa"]["acc_norm"] - dense["zero_shot"]["piqa"]["acc_norm"])
    # Two of the eight tasks: no mean difference, as no mean accuracy either.
    assert paired[saved_models["skip"].name]["zero_shot_mean"] is None

    # The reference must be one of the compared models, or its figures would not be in the table.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", models[1], "--eval-dir", str(tmp_path / "eval"), "--output-dir",
                  str(tmp_path / "compare"), "--paired", models[0]])
    assert exit_info.value.code == 2
    assert "is not one of the compared models" in capsys.readouterr().err


def test_eval_command_second_disjoint_sample(saved_models, data_dir, tmp_path):
    arguments = ["eval", "--model", str(saved_models["skip"]), "--tasks", "piqa", "--limit", "3", "--ppl", "none",
                 "--data-dir", str(data_dir), "--output-dir"]
    cli.main(arguments + [str(tmp_path / "first")])
    cli.main(arguments + [str(tmp_path / "second"), "--exclude-limits", "3"])
    first, second = (json.loads((tmp_path / part / f"{saved_models['skip'].name}.json").read_text())["zero_shot"]["piqa"]
                     for part in ("first", "second"))

    assert len(second["doc_ids"]) == 3
    assert not set(first["doc_ids"]) & set(second["doc_ids"])
    assert second["settings"] == {"limit": 3, "seed": 1234, "exclude_limits": [3]}


def test_compare_pools_disjoint_samples(saved_models, data_dir, tmp_path, capsys, monkeypatch):
    models = [str(saved_models["dense"]), str(saved_models["skip"])]
    arguments = ["eval", "--model", *models, "--tasks", "piqa,boolq", "--limit", "3", "--ppl", "none",
                 "--log-samples", "--data-dir", str(data_dir), "--output-dir"]
    cli.main(arguments + [str(tmp_path / "first")])
    cli.main(arguments + [str(tmp_path / "second"), "--exclude-limits", "3"])
    compare = ["compare", *models, "--paired", models[0], "--output-dir", str(tmp_path / "compare")]
    status = cli.main(compare + ["--eval-dir", str(tmp_path / "first"), "--eval-dir", str(tmp_path / "second")])
    pooled = json.loads((tmp_path / "compare" / "compare.json").read_text())

    # The reference: one lm-eval run over the union of the two samples.
    samples = [json.loads((tmp_path / part / f"{saved_models['dense'].name}.json").read_text())["zero_shot"]
               for part in ("first", "second")]
    union = {task: sorted(samples[0][task]["doc_ids"] + samples[1][task]["doc_ids"]) for task in ("piqa", "boolq")}
    monkeypatch.setattr(evaluation, "seeded_subset", lambda num_docs, limit, seed, task, exclude=(): union[task])
    cli.main(["eval", "--model", *models, "--tasks", "piqa,boolq", "--limit", "6", "--ppl", "none", "--log-samples",
              "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "whole")])
    cli.main(compare + ["--eval-dir", str(tmp_path / "whole")])
    whole = json.loads((tmp_path / "compare" / "compare.json").read_text())

    assert status == 0
    for pooled_row, whole_row in zip(pooled["models"], whole["models"]):
        assert pooled_row["num_docs"] == {"piqa": 6, "boolq": 6}
        assert whole_row["num_docs"] == pooled_row["num_docs"]
        for task in union:
            assert pooled_row["accuracy"][task] == pytest.approx(whole_row["accuracy"][task], abs=1e-12)
    name = saved_models["skip"].name
    for task in union:
        assert pooled["paired"][name]["zero_shot"][task] == pytest.approx(whole["paired"][name]["zero_shot"][task])

    # The same sample twice is not a larger sample.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(compare + ["--eval-dir", str(tmp_path / "first"), "--eval-dir", str(tmp_path / "first")])
    assert exit_info.value.code == 2
    assert "share 3 documents" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "50,x", ""])
def test_eval_command_rejects_invalid_exclude_limits(saved_models, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--model", str(saved_models["dense"]), "--tasks", "piqa", "--exclude-limits", value])

    assert exit_info.value.code == 2
    assert "--exclude-limits must be positive subset sizes" in capsys.readouterr().err


def test_eval_command_rescores_changed_heldout_text(saved_models, data_dir, tmp_path):
    model = str(saved_models["skip"])
    arguments = ["eval", "--model", model, "--tasks", "none", "--ppl", "gsm8k", "--ppl-max-tokens", "200",
                 "--data-dir", str(data_dir), "--output-dir", str(tmp_path)]
    cli.main(arguments)
    first = json.loads((tmp_path / f"{saved_models['skip'].name}.json").read_text())["perplexity"]["gsm8k"]

    # Excluding the first held-out GSM8K question as if a calibration had drawn it changes the texts scored.
    (tmp_path / "calibration.jsonl").write_text(json.dumps({"text": heldout_texts("gsm8k", data_dir)[0]}) + "\n")
    cli.main(arguments + ["--calibration", str(tmp_path / "calibration.jsonl")])
    second = json.loads((tmp_path / f"{saved_models['skip'].name}.json").read_text())["perplexity"]["gsm8k"]

    assert second["texts_sha256"] != first["texts_sha256"]
    assert second["settings"]["heldout_sha256"] != first["settings"]["heldout_sha256"]


def test_eval_command_rejects_unknown_task(saved_models, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--model", str(saved_models["dense"]), "--tasks", "mmlu"])

    assert exit_info.value.code == 2
    assert "mmlu" in capsys.readouterr().err


def test_eval_command_rejects_base_model_folder(base, tmp_path, capsys):
    base.save_pretrained(tmp_path / "base")

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--model", str(tmp_path / "base"), "--tasks", "none", "--ppl", "gsm8k"])

    assert exit_info.value.code == 2
    assert "is a 'llama' model, not a pruned model" in capsys.readouterr().err


def test_eval_command_rejects_nothing_to_evaluate(saved_models, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--model", str(saved_models["dense"]), "--tasks", "none", "--ppl", "none"])

    assert exit_info.value.code == 2
    assert "Nothing to evaluate" in capsys.readouterr().err


def test_eval_command_times_plain_base_model_folder(base, tokenizer, data_dir, tmp_path, monkeypatch):
    # Speed alone runs any causal LM, so a benchmark can show what the block loop of the pruned model costs.
    monkeypatch.setattr(evaluation.SpeedConfig, "isolate", False)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")

    status = cli.main(["eval", "--model", str(tmp_path / "base"), "--tasks", "none", "--ppl", "none", "--speed",
                       "--speed-repeats", "1", "--prompt-tokens", "8", "--new-tokens", "2", "--data-dir",
                       str(data_dir), "--output-dir", str(tmp_path / "eval")])
    speed = json.loads((tmp_path / "eval" / "base.json").read_text())["speed"]

    assert status == 0
    assert speed["batch_1"]["decode_tokens_per_s"] > 0


def test_compare_without_zero_shot_draws_no_accuracy_plot(saved_models, data_dir, tmp_path, capsys):
    models = [str(saved_models["dense"]), str(saved_models["skip"])]
    cli.main(["eval", "--model", *models, "--tasks", "none", "--ppl", "gsm8k", "--ppl-max-tokens", "100",
              "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "eval")])

    status = cli.main(["compare", *models, "--eval-dir", str(tmp_path / "eval"), "--output-dir",
                       str(tmp_path / "compare")])

    assert status == 0
    assert sorted(path.name for path in (tmp_path / "compare").iterdir()) == ["compare.json", "compare.md",
                                                                              "masks.png", "perplexity.png"]
    assert "Wrote compare.json, compare.md, perplexity.png, masks.png" in capsys.readouterr().out


def test_task_calibration_skips_scored_documents(data_dir, tmp_path):
    """The benchmark's task-format calibration texts contain gold continuations of documents that no evaluation subset scores."""
    import subprocess
    from pathlib import Path

    output = tmp_path / "task_calibration.jsonl"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "task_calibration.py"
    subprocess.run([sys.executable, str(script), "--output", str(output), "--data-dir", str(data_dir),
                    "--tasks", "openbookqa,boolq", "--texts-per-task", "6"], check=True, capture_output=True)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    raw = {name: [json.loads(line) for line in (data_dir / name / file).read_text().splitlines() if line.strip()]
           for name, file in (("openbookqa", "test.jsonl"), ("boolq", "val.jsonl"))}

    assert [row["task"] for row in rows] == ["openbookqa"] * 6 + ["boolq"] * 6
    for row in rows:
        scored = set(seeded_subset(len(raw[row["task"]]), 200, 1234, row["task"]))
        scored |= set(seeded_subset(len(raw[row["task"]]), 50, 1234, row["task"]))
        assert not scored.intersection(row["doc_ids"])

        # The gold choice read from the raw file, not through lm-eval.
        for doc_id in row["doc_ids"]:
            record = raw[row["task"]][doc_id]
            if row["task"] == "openbookqa":
                answer = next(c["text"] for c in record["question"]["choices"] if c["label"] == record["answerKey"])
                assert f"{record['question']['stem']} {answer}" in row["text"]
        if row["task"] == "boolq":
            last = raw["boolq"][row["doc_ids"][-1]]
            assert row["text"].endswith(f"Question: {last['question']}?\nAnswer: {'yes' if last['label'] == 'true' else 'no'}")
