"""Conversations -> token ids + assistant-only loss masks via the target's chat template.

    train_ds, val_ds, summary = data.build(cfg.data, target.tokenizer)   # cached under data/prepared/
    loader = DataLoader(train_ds, batch_size=4, collate_fn=data.make_collate(tokenizer.pad_token_id))

See data/README.md for sources, record shapes, skip reasons and the cache layout.
"""

from specdistill.data.chat import ChatEncoder, Encoded, TemplateAlignError
from specdistill.data.collate import collate, length_grouped_order, make_collate
from specdistill.data.dataset import PreparedDataset
from specdistill.data.prepare import build, cache_dir, load_prepared
from specdistill.data.sources import Conversation, SourceError, iter_conversations, resolve, split_of
from specdistill.data.stats import SKIP_REASONS, SkipCounter, format_summary

__all__ = [
    "SKIP_REASONS", "ChatEncoder", "Conversation", "Encoded", "PreparedDataset", "SkipCounter", "SourceError",
    "TemplateAlignError", "build", "cache_dir", "collate", "format_summary", "iter_conversations",
    "length_grouped_order", "load_prepared", "make_collate", "resolve", "split_of",
]
