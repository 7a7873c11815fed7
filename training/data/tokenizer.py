"""A word-level BERT tokenizer for a closed-vocabulary corpus such as the synthetic scene world.

The synthetic world uses a few hundred words; a 30,522-entry BERT vocabulary would make the
embedding and vocabulary head the largest parts of a small model for nothing, and it cannot be
downloaded offline. This builds a `BertTokenizer` (transformers' fast tokenizer) whose vocabulary is
every word of the given texts, with BERT's lower-casing and punctuation splitting, so the anchor
lexicon, word ids and whole-word masking work exactly as with a real BERT vocabulary.
"""

from collections.abc import Iterable

from transformers import BertTokenizer


SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_word_tokenizer(texts: Iterable[str], model_max_length: int = 512) -> BertTokenizer:
    """A BERT-style tokenizer whose vocabulary is the special tokens plus every word of `texts` (sorted)."""
    splitter = BertTokenizer(vocab={token: i for i, token in enumerate(SPECIAL_TOKENS)})
    pre_tokenize = splitter.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    normalize = splitter.backend_tokenizer.normalizer.normalize_str
    words = sorted({word for text in texts for word, _ in pre_tokenize(normalize(text))})
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + [w for w in words if w not in SPECIAL_TOKENS])}
    return BertTokenizer(vocab=vocab, model_max_length=model_max_length)
