"""A word-level vocabulary (``data.vocabulary=word``), as WikiText is modelled by Transformer-XL.

Words are the whitespace-separated strings of the text (WikiText ships tokenized, with its rare words
already ``<unk>``); every line (a blank one too) ends with ``<eos>``. The vocabulary is trained on the
train split: the special tokens, then the words in order of count, most frequent first, ties by first
occurrence in the text (`collections.Counter.most_common`'s order, hence Transformer-XL's ``Vocab``'s), keeping
words seen at least ``min_count`` times, ``vocab_size`` tokens at most (None: no cap). It depends on the
text only. Words outside it become ``<unk>``.

The tokenizer is `tokenizers`' WordLevel model (whitespace split; lower-cased with ``lowercase``) in an HF
`PreTrainedTokenizerFast`, whose post-processor ends an encoded text with ``<eos>`` (``tokenizer(line)`` gives
Transformer-XL's symbols of the line); packing appends it to every document (`line_end_id`). Ids and
perplexities are then per word (``<eos>`` counts as one, as in the published WikiText tables).
"""

from __future__ import annotations

from collections import Counter

UNK, EOS = "<unk>", "<eos>"
# [PAD], [CLS], [SEP] and [MASK] as in every bertode vocabulary (padding, packed rows, masked LM)
SPECIAL_TOKENS = ["[PAD]", UNK, "[CLS]", "[SEP]", "[MASK]", EOS]


def _splitter(lowercase: bool):
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.Lowercase() if lowercase else None
    pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return normalizer, pre_tokenizer


def word_counts(lines, lowercase: bool = False) -> Counter:
    """Each word's count, in order of first occurrence; split as the tokenizer splits."""
    normalizer, pre_tokenizer = _splitter(lowercase)
    counts: Counter = Counter()
    for line in lines:
        text = normalizer.normalize_str(line) if normalizer is not None else line
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(text))
    return counts


def train_vocabulary(lines, vocab_size: int | None, min_count: int = 1, lowercase: bool = False) -> list[str]:
    """The vocabulary, in id order (module docstring)."""
    vocab = list(SPECIAL_TOKENS)
    known = set(vocab)
    for word, count in word_counts(lines, lowercase).most_common():
        if count < min_count or (vocab_size is not None and len(vocab) >= vocab_size):
            break
        if word not in known:  # WikiText's own <unk> is the unknown word
            vocab.append(word)
            known.add(word)
    return vocab


def train_tokenizer(lines, vocab_size: int | None, min_count: int = 1, lowercase: bool = False):
    """An HF tokenizer over a word vocabulary trained on ``lines``."""
    from tokenizers import Tokenizer, models, processors  # no decoder: `decode` joins words by spaces
    from transformers import PreTrainedTokenizerFast

    ids = {token: index for index, token in enumerate(train_vocabulary(lines, vocab_size, min_count, lowercase))}
    tokenizer = Tokenizer(models.WordLevel(ids, unk_token=UNK))
    normalizer, tokenizer.pre_tokenizer = _splitter(lowercase)
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                            special_tokens=[(EOS, ids[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=UNK, eos_token=EOS, pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def line_end_id(tokenizer) -> int | None:
    """The id packing appends after every document: ``<eos>`` of a word-level tokenizer, else None."""
    from tokenizers.models import WordLevel

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.model, WordLevel):
        return None
    return tokenizer.get_vocab().get(EOS)


def perplexity_unit(tokenizer) -> str:
    """What one target is: a ``word`` (word-level vocabulary) or a ``token``."""
    return "word" if line_end_id(tokenizer) is not None else "token"


def read_by(cfg, tokenizer):
    """The data config ``cfg`` as ``tokenizer`` reads text: a word-level tokenizer's documents keep their blank
    lines (`documents.keeps_blank`) whatever ``data.vocabulary`` says (a checkpoint's or ``data.tokenizer``'s)."""
    from omegaconf import OmegaConf, open_dict

    kind = "word" if line_end_id(tokenizer) is not None else "wordpiece"
    if cfg.get("vocabulary", "wordpiece") == kind or not OmegaConf.is_config(cfg):
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.vocabulary = kind
    return cfg
