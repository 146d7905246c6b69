"""Pretokenizer mix configs: the seed's YAML, read verbatim.

    <mix name>:
      datasets:
        - <dataset name>:          # the kind (megacode2, orca-chat, ...) unless `kind:` says
            fraction: 0.5          # train part only: seeded sample without replacement
            val_split: 0.01        # share held out for val (Open-Assistant's default: 0.2)
            max_val_set: 1000      # cap on the val part (a seeded subset; for oasst_export,
                                   # whose val_split picks trees, fraction and the cap count
                                   # threads)
            data_files: "*.json"   # optional: glob pattern(s) of the files to read in the
                                   # dataset's directory (Hugging Face's data_files)
            ...                    # kind options: lang, top_k, input_file_path, filter_words,
                                   # rows_per_conv (orca-chat)
      output_dir: "output/..."
      filename_prefix: "..."
      min_assistant_tokens: 25     # samples with fewer assistant tokens are skipped (counted)
      rng_seed: 42                 # optional

A dataset is read from `path:` if given, else from `--data-root/<dataset name>`
(`input_file_path` for oasst_export); relative paths are taken from `--data-root` (default: the
current directory), absolute ones as they are. A directory is read whole, except where
Open-Assistant's loader names the files it reads of the hub repository and the directory holds
them: megacode2 then reads only DeDuped_LosslessMegaCodeTrainingV2_942k_Evol_Uncensored.json, not
the repository's other copies of the data. `data_files` overrides that choice. Unknown keys are
errors that list the allowed ones and name the file and line.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data.errors import DataError
from data.sources import KINDS, Kind, list_files, parse_langs

MIX_KEYS = ("datasets", "output_dir", "filename_prefix", "min_assistant_tokens", "rng_seed")
COMMON_KEYS = ("kind", "path", "fraction", "val_split", "max_val_set", "data_files")
DEFAULT_VAL_SPLIT = 0.2  # Open-Assistant's default when a dataset gives none
DEFAULT_SEED = 42


@dataclass
class DatasetSpec:
    """One dataset of a mix, resolved to files."""

    name: str  # the YAML name (key in stats.json and dataset_ranges)
    kind: Kind
    location: Path
    files: list[Path]
    fraction: float = 1.0
    val_split: float = DEFAULT_VAL_SPLIT
    max_val_set: int | None = None
    options: dict = field(default_factory=dict)  # the kind's options, parsed

    @property
    def class_name(self) -> str:
        """Open-Assistant's name of the whole dataset: its class (and `name` attribute)."""
        if self.kind.name == "chat":
            return f"{self.kind.display} ({self.name})"
        return self.kind.display

    @property
    def display(self) -> str:
        """Name in the train stats, as Open-Assistant's `get_dataset_name` prints what
        `get_one_dataset` returned: a sample kind's train part is a `Subset of ...` once
        val_split cut it; the export's is a ListDataset. `fraction` never renames: the
        pretokenizer takes the name before it samples."""
        if self.kind.unit == "sample" and self.val_split > 0:
            return f"Subset of {self.class_name}"
        return self.class_name

    def val_display(self, capped: bool) -> str:
        """Name in the val stats: a sample kind's val part is always a Subset (of the split);
        the export's is a ListDataset, a `Subset of ListDataset` when max_val_set `capped` it."""
        if self.kind.unit == "sample" or capped:
            return f"Subset of {self.class_name}"
        return self.class_name


@dataclass
class MixConfig:
    """One mix: its datasets and where its files go."""

    name: str
    datasets: list[DatasetSpec]
    output_dir: Path
    filename_prefix: str
    min_assistant_tokens: int | None = None
    rng_seed: int = DEFAULT_SEED
    source: str = ""  # config file


class _Marked(dict):
    """A YAML mapping that remembers the line of each key."""

    line: int = 0
    lines: dict


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> _Marked:
    loader.flatten_mapping(node)
    out = _Marked()
    out.line = node.start_mark.line + 1
    out.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise DataError(
                f"{key_node.start_mark.name}:{key_node.start_mark.line + 1}: duplicate key {key!r}"
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line(mapping, key=None) -> int:
    if isinstance(mapping, _Marked):
        return mapping.lines.get(key, mapping.line) if key is not None else mapping.line
    return 0


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise DataError(f"{where}: invalid YAML ({e.problem or e.context})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict) or not data:
        raise DataError(
            f"{path}: expected a mapping of mix names to mixes "
            "(e.g. `oasst_top1: {datasets: [...], output_dir: ..., filename_prefix: ...}`)"
        )
    return data


def _number(
    where: str, key: str, value, lo: float, hi: float, lo_open=False, hi_open=False, integer=False
):
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise DataError(f"{where}: {key} must be {kind}, found {value!r}")
    # Written as what is inside, so that NaN (`.nan` in YAML), which compares false, is outside.
    if not ((lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise DataError(f"{where}: {key} = {value!r} is outside {lb}{lo}, {hi}{rb}")
    return value


def _path_value(where: str, key: str, value) -> str:
    """A path option as written: a non-empty string (a list or a number is a typo, and str() of
    it would send the search, or the outputs, to a directory named after it)."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {key} must be a path (a non-empty string), found {value!r}")
    return value


def _resolve(data_root: Path, value) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else data_root / p


def _dataset(entry, where_file: str, mix: str, data_root: Path, list_line: int = 0) -> DatasetSpec:
    line = _line(entry) or list_line  # a scalar entry has no mark of its own
    if isinstance(entry, str):
        name, opts = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        name, opts = next(iter(entry.items()))
        opts = opts if opts is not None else {}
        if not isinstance(opts, dict):
            raise DataError(
                f"{where_file}:{line}: options of dataset {name!r} must be a mapping, "
                f"found {opts!r}"
            )
    else:
        raise DataError(
            f"{where_file}:{line}: each entry of {mix}.datasets must be `- name:` with its options "
            f"indented below, found {entry!r}"
        )
    name = str(name)
    kind_name = opts.get("kind", name)
    if not isinstance(kind_name, str) or kind_name not in KINDS:
        raise DataError(
            f"{where_file}:{_line(opts, 'kind') or line}: unknown dataset {kind_name!r} in mix "
            f"{mix!r}; known kinds: {', '.join(KINDS)} (another name needs `kind: <one of these>`)"
        )
    kind = KINDS[kind_name]
    allowed = COMMON_KEYS + tuple(kind.options)
    for key in opts:
        if key not in allowed:
            raise DataError(
                f"{where_file}:{_line(opts, key)}: unknown key {key!r} for dataset {name!r} "
                f"({kind.name}); allowed: {', '.join(allowed)}"
            )

    def at(key: str) -> str:
        return f"{where_file}:{_line(opts, key) or line}: dataset {name!r}"

    fraction = _number(at("fraction"), "fraction", opts.get("fraction", 1.0), 0, 1, lo_open=True)
    val_split = _number(
        at("val_split"), "val_split", opts.get("val_split", DEFAULT_VAL_SPLIT), 0, 1, hi_open=True
    )
    max_val_set = opts.get("max_val_set")
    if max_val_set is not None:
        max_val_set = _number(
            at("max_val_set"), "max_val_set", max_val_set, 0, float("inf"), integer=True
        )
        if max_val_set == 0:
            # Open-Assistant applies the cap only when it is truthy, so there 0 keeps the whole
            # val part; here it would empty it. Neither reading is safe to guess.
            raise DataError(
                f"{at('max_val_set')}: max_val_set = 0 is ambiguous (Open-Assistant reads it as "
                "no cap): omit max_val_set for no cap, or set val_split: 0 for no val set"
            )
    options = {k: opts.get(k, default) for k, default in kind.options.items()}
    if "filter_words" in options and not isinstance(options["filter_words"], bool):
        raise DataError(f"{at('filter_words')}: filter_words must be true or false")
    if "lang" in options:
        value = options["lang"]
        if value is not None and not (
            isinstance(value, str)
            or (isinstance(value, list) and all(isinstance(x, str) for x in value))
        ):
            raise DataError(
                f"{at('lang')}: lang must be a comma-separated string or a list of language "
                f'codes (e.g. "en,de"), found {value!r}'
            )
        options["lang"] = parse_langs(value)
        if options["lang"] is not None and not options["lang"]:
            raise DataError(
                f"{at('lang')}: lang names no language, so every record would be dropped; give "
                'language codes (e.g. "en,de"), or null for no language filter'
            )
    if options.get("rows_per_conv") is not None:
        options["rows_per_conv"] = _number(
            at("rows_per_conv"),
            "rows_per_conv",
            options["rows_per_conv"],
            1,
            float("inf"),
            integer=True,
        )
    if options.get("top_k") is not None:
        options["top_k"] = _number(
            at("top_k"), "top_k", options["top_k"], 1, float("inf"), integer=True
        )
    if kind.name == "oasst_export" and options.get("input_file_path") is not None:
        value = _path_value(at("input_file_path"), "input_file_path", options["input_file_path"])
        location = _resolve(data_root, value)
    elif "path" in opts:
        location = _resolve(data_root, _path_value(at("path"), "path", opts["path"]))
    else:
        location = data_root / name
    patterns = opts.get("data_files")
    if patterns is not None:
        if isinstance(patterns, str):
            patterns = [patterns]
        if not (
            isinstance(patterns, list)
            and patterns
            and all(isinstance(x, str) and x.strip() for x in patterns)
        ):
            raise DataError(
                f"{at('data_files')}: data_files must be a file name or glob pattern, or a list "
                f'of them (e.g. "*.json"), found {opts["data_files"]!r}'
            )
    elif kind.data_files and location.is_dir():
        # Open-Assistant's loader reads only these files of the hub repository.
        patterns = [f for f in kind.data_files if (location / f).is_file()] or None
    files = list_files(location, f"{where_file}:{line}: dataset {name!r}", patterns)
    return DatasetSpec(
        name=name,
        kind=kind,
        location=location,
        files=files,
        fraction=float(fraction),
        val_split=float(val_split),
        max_val_set=max_val_set,
        options=options,
    )


def load_mixes(
    config_path: str | Path,
    data_root: str | Path = ".",
    output_dir: str | Path | None = None,
    mix: str | None = None,
) -> list[MixConfig]:
    """Parse and check a config file; resolve every dataset to its files (missing files fail
    here, before anything is tokenized)."""
    config_path = str(config_path)
    data = read_yaml(config_path)
    data_root = Path(data_root)
    if mix is not None and mix not in data:
        raise DataError(
            f"{config_path}: no mix named {mix!r}; the file defines {', '.join(map(str, data))}"
        )
    names = [mix] if mix is not None else list(data)
    mixes = []
    for name in names:
        body = data[name]
        where = f"{config_path}:{_line(data, name)}"
        if not isinstance(body, dict):
            raise DataError(
                f"{where}: mix {name!r} must be a mapping with datasets, output_dir and "
                "filename_prefix"
            )
        for key in body:
            if key not in MIX_KEYS:
                raise DataError(
                    f"{config_path}:{_line(body, key)}: unknown key {key!r} in mix {name!r}; "
                    f"allowed: {', '.join(MIX_KEYS)}"
                )
        for key in ("datasets", "output_dir", "filename_prefix"):
            if key not in body:
                raise DataError(f"{where}: mix {name!r} has no {key!r}")
        datasets = body["datasets"]
        if not isinstance(datasets, list) or not datasets:
            raise DataError(
                f"{config_path}:{_line(body, 'datasets')}: {name}.datasets must be a non-empty list"
            )
        list_line = _line(body, "datasets")
        specs = [_dataset(e, config_path, str(name), data_root, list_line) for e in datasets]
        seen: dict[str, int] = {}
        for entry, s in zip(datasets, specs):
            line = _line(entry) or list_line
            if s.name in seen:
                raise DataError(
                    f"{config_path}:{line}: dataset {s.name!r} appears twice in mix {name!r} "
                    f"(first at line {seen[s.name]}); give one of them another name and "
                    "`kind: <the dataset's kind>`"
                )
            seen[s.name] = line
        mat = body.get("min_assistant_tokens")
        if mat is not None:
            where_mat = f"{config_path}:{_line(body, 'min_assistant_tokens')}"
            mat = _number(where_mat, "min_assistant_tokens", mat, 0, float("inf"), integer=True)
        seed = body.get("rng_seed", DEFAULT_SEED)
        seed = _number(
            f"{config_path}:{_line(body, 'rng_seed')}", "rng_seed", seed, 0, 2**63 - 1, integer=True
        )
        prefix = body["filename_prefix"]
        if not isinstance(prefix, str) or not prefix or "/" in prefix:
            raise DataError(
                f"{config_path}:{_line(body, 'filename_prefix')}: filename_prefix must be a "
                "file name"
            )
        if output_dir is None:
            where_out = f"{config_path}:{_line(body, 'output_dir')}: mix {name!r}"
            out = Path(_path_value(where_out, "output_dir", body["output_dir"]))
        else:
            out = Path(output_dir) if len(names) == 1 else Path(output_dir) / str(name)
        mixes.append(
            MixConfig(
                name=str(name),
                datasets=specs,
                output_dir=out,
                filename_prefix=prefix,
                min_assistant_tokens=mat,
                rng_seed=seed,
                source=config_path,
            )
        )
    # stats.json and special_tokens.json are not prefixed: a second mix in the same folder
    # would silently replace the first one's.
    seen_dirs: dict[Path, str] = {}
    for m in mixes:
        key = Path(os.path.abspath(m.output_dir))
        if key in seen_dirs:
            raise DataError(
                f"{config_path}: mixes {seen_dirs[key]!r} and {m.name!r} both write to "
                f"{m.output_dir} (their stats.json would overwrite each other); give each mix "
                "its own output_dir"
            )
        seen_dirs[key] = m.name
    return mixes
