"""Text for calibration and evaluation: an offline corpus that always works, hub datasets where
the hub is reachable, or any text / text file.

The offline corpus is the Python reference documentation shipped with the interpreter
(``pydoc_data.topics``: about 80 topics, 0.45 M characters). Its topics, sorted by name, are split
into two disjoint parts: every fourth topic (indices 3, 7, 11, ...) is the *evaluation* split,
the rest the *calibration* split, so perplexity is always measured on text the calibration never
saw.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from ..utils import is_int

OFFLINE = "offline"
HUB_DATASETS = {
    # name: (hub id, config, split for calibration, split for evaluation, text field)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "test", "sentence"),
    "c4": ("allenai/c4", "en", "train", "validation", "text"),
}


def offline_text(split: str = "calibration") -> str:
    """The offline corpus' ``split`` ("calibration" or "evaluation")."""
    import pydoc_data.topics as topics
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    names = sorted(topics.topics)
    keep = [n for i, n in enumerate(names) if (i % 4 == 3) == (split == "evaluation")]
    return "\n\n".join(topics.topics[n] for n in keep)


def load_text(text: Optional[str] = None, dataset: Optional[str] = None,
              split: str = "calibration") -> str:
    """Resolves the text sources of calibration_data / perplexity.

    ``text`` is a string, or a path to a text file; ``dataset`` is "offline" (the default), a
    file path, or a hub dataset name (wikitext2, ptb, c4; needs the `datasets` package and the
    hub). ``split`` chooses the calibration or evaluation part.
    """
    if text is not None and dataset is not None:
        raise ValueError("give text or dataset, not both")
    if text is not None:
        if len(text) < 4096 and "\n" not in text and os.path.isfile(text):
            return Path(text).read_text(encoding="utf-8", errors="replace")
        return text
    dataset = dataset or OFFLINE
    if dataset == OFFLINE:
        return offline_text(split)
    if os.path.isfile(dataset):
        return Path(dataset).read_text(encoding="utf-8", errors="replace")
    if dataset not in HUB_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: use 'offline', a text file, or one of "
                         f"{sorted(HUB_DATASETS)}")
    try:
        import datasets
    except ImportError:
        raise RuntimeError(f"dataset {dataset!r} needs the `datasets` package (pip install "
                           f"datasets) and access to the Hugging Face hub; the offline corpus "
                           f"(dataset='offline') always works") from None
    hub_id, config, calib_split, eval_split, field = HUB_DATASETS[dataset]
    hub_split = calib_split if split == "calibration" else eval_split
    try:
        if dataset == "c4":  # stream a slice: the full split is huge
            rows = datasets.load_dataset(hub_id, config, split=hub_split, streaming=True)
            parts = [r[field] for _, r in zip(range(2000), rows)]
        else:
            parts = datasets.load_dataset(hub_id, config, split=hub_split)[field]
    except Exception as exc:
        raise RuntimeError(f"cannot load {dataset!r} from the hub ({type(exc).__name__}: {exc}); "
                           f"the offline corpus (dataset='offline') always works") from None
    return "\n\n".join(parts)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D int64 tensor of the text's token ids (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def calibration_data(tokenizer, text: Optional[str] = None, dataset: Optional[str] = None,
                     n_samples: int = 128, seqlen: int = 2048, seed: int = 0) -> torch.Tensor:
    """Calibration batches: ``n_samples`` random windows of ``seqlen`` tokens.

    Returns an int64 tensor [n_samples, seqlen] of token ids, drawn with a generator seeded by
    ``seed`` from the calibration split of the chosen text (the offline corpus by default).
    Raises ValueError when the text is shorter than one window.
    """
    if not is_int(n_samples) or not is_int(seqlen) or n_samples < 1 or seqlen < 2:
        raise ValueError(f"need integers n_samples >= 1 and seqlen >= 2, got {n_samples!r}, "
                         f"{seqlen!r}")
    ids = tokenize(tokenizer, load_text(text, dataset, "calibration"))
    if ids.numel() < seqlen + 1:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than one window "
                         f"of seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
