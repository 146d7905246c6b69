"""Per-dataset token statistics, in the layout of the model card's statistics blocks.

A sample is *accepted* (written) or *skipped* (fewer assistant tokens than
`min_assistant_tokens`); `total_samples` is what the dataset contributed to the split after
`fraction` / `val_split` / `max_val_set` (threads, for the OASST export), so accepted + skipped =
total. Token counts are the whole sample's tokens; skipped tokens are summed (not overwritten)
per sample.

Each block is named as Open-Assistant's pretokenizer names the dataset: the class of what its
`get_one_dataset` returned, `Subset of ...` when that is a Subset (`DatasetSpec.display` and
`val_display` say when); a split's file lists only the datasets that have that split there (no
val block for a sample dataset with val_split 0).
"""

from dataclasses import dataclass

import numpy as np

RULE = "-----------------"


@dataclass
class TokenStats:
    """Counters of one dataset (or the total) in one split."""

    name: str  # display name, e.g. "Subset of OrcaChat (orca-chat)"
    fraction: float = 1.0  # the `fraction` option (train) or 1.0
    accepted_samples: int = 0
    accepted_tokens: int = 0
    accepted_assistant_tokens: int = 0
    skipped_samples: int = 0
    skipped_tokens: int = 0
    min_tokens: int | None = None
    max_tokens: int = 0

    @property
    def processed_samples(self) -> int:
        return self.accepted_samples + self.skipped_samples

    @property
    def total_samples(self) -> int:
        return self.processed_samples

    @property
    def avg_tokens(self) -> float:
        return self.accepted_tokens / self.accepted_samples if self.accepted_samples else 0.0

    def add(self, sizes: np.ndarray, assistant: np.ndarray, accepted: np.ndarray) -> None:
        """Count a batch of samples: token counts, assistant-token counts, accepted flags."""
        acc = sizes[accepted]
        skipped = sizes[~accepted]
        self.accepted_samples += int(acc.size)
        self.accepted_tokens += int(acc.sum(dtype=np.int64))
        self.accepted_assistant_tokens += int(assistant[accepted].sum(dtype=np.int64))
        self.skipped_samples += int(skipped.size)
        self.skipped_tokens += int(skipped.sum(dtype=np.int64))
        if acc.size:
            lo, hi = int(acc.min()), int(acc.max())
            self.min_tokens = lo if self.min_tokens is None else min(self.min_tokens, lo)
            self.max_tokens = max(self.max_tokens, hi)

    def merge(self, other: "TokenStats") -> None:
        self.accepted_samples += other.accepted_samples
        self.accepted_tokens += other.accepted_tokens
        self.accepted_assistant_tokens += other.accepted_assistant_tokens
        self.skipped_samples += other.skipped_samples
        self.skipped_tokens += other.skipped_tokens
        if other.min_tokens is not None:
            self.min_tokens = (
                other.min_tokens
                if self.min_tokens is None
                else min(self.min_tokens, other.min_tokens)
            )
        self.max_tokens = max(self.max_tokens, other.max_tokens)

    def block(self) -> str:
        """One `## Stats for ...` block, as in the model card."""
        p = self.processed_samples

        def pct(x: int) -> str:
            return f"{x / p:.1%}" if p else f"{0:.1%}"

        return "\n".join(
            [
                f"## Stats for '{self.name}' ({self.total_samples} samples ({self.fraction:.1%}))",
                RULE,
                f"  Accepted: {self.accepted_samples}/{p} ({pct(self.accepted_samples)})",
                f"  Accepted tokens: {self.accepted_tokens}",
                f"  Skipped: {self.skipped_samples} ({pct(self.skipped_samples)})",
                f"  Min tokens per sample: {self.min_tokens if self.min_tokens is not None else 0}",
                f"  Max tokens per sample: {self.max_tokens}",
                f"  Avg tokens per sample: {self.avg_tokens}",
                RULE,
            ]
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "total_samples": self.total_samples,
            "fraction": self.fraction,
            "accepted_samples": self.accepted_samples,
            "accepted_tokens": self.accepted_tokens,
            "accepted_assistant_tokens": self.accepted_assistant_tokens,
            "skipped_samples": self.skipped_samples,
            "skipped_tokens": self.skipped_tokens,
            "min_tokens": self.min_tokens,
            "max_tokens": self.max_tokens,
            "avg_tokens": self.avg_tokens,
        }


def stats_text(title: str, per_dataset: list[TokenStats], total: TokenStats) -> str:
    """The whole `{prefix}-{split}_stats.txt` file."""
    blocks = [b.block() for b in [*per_dataset, total]]
    return f"# Stats for {title}\n\n" + "\n\n".join(blocks) + "\n"
