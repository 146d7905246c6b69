"""Dataset readers: local files -> conversations of (role, text) turns.

`KINDS` maps a dataset kind (the dataset's name in the YAML, or its `kind:` key) to its reader;
`files.iter_records` streams the raw records of a file, `Kind.convert` turns one record into
conversations (several for an Open-Assistant tree), a drop reason, or raises `BadRecord`.
"""

from data.sources.files import iter_records, list_files
from data.sources.kinds import KINDS, Kind, has_filtered_words, parse_langs

__all__ = ["KINDS", "Kind", "has_filtered_words", "iter_records", "list_files", "parse_langs"]
