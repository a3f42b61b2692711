"""A WordPiece vocabulary trained deterministically: the same text gives byte-identical
tokenizer files in any process on any machine.

`tokenizers`' WordPiece trainer breaks ties between equally frequent pairs by the order
of Rust hash maps, which is seeded per process: two fresh runs of the same config
trained different vocabularies (even with one thread). This trainer runs the same
algorithm (BERT normalisation and pre-tokenisation from `tokenizers`, then byte-pair
merges over words with the ``##`` continuation prefix, keeping merges seen at least
``min_frequency`` times, over an alphabet of the ``limit_alphabet`` most frequent
characters) and breaks ties between equally frequent pairs by the pair's text (the left
symbol, then the right, in string order: ``(p, ##s)`` before ``(pq, ##r)``), so the
result depends on the text only.
The vocabulary is: special tokens, the alphabet (sorted), then merged tokens in merge
order, ``vocab_size`` tokens unless the alphabet alone is larger. The tokenizer built
from it is `tokenizers`' own WordPiece model.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict

PREFIX = "##"


def _words(lines, lowercase: bool) -> Counter:
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=lowercase,
                                            lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for line in lines:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))
    return counts


def _merged(a: str, b: str) -> str:
    return a + (b[len(PREFIX):] if b.startswith(PREFIX) else b)


def train_vocabulary(lines, vocab_size: int, special_tokens: list[str], lowercase: bool = True,
                     min_frequency: int = 2, limit_alphabet: int = 1000) -> list[str]:
    """The vocabulary, in id order (``vocab_size`` tokens unless the alphabet is larger)."""
    counts = _words(lines, lowercase)
    chars: Counter = Counter()
    for word, count in counts.items():
        for char in word:
            chars[char] += count
    # The most frequent characters, ties by the character (as `tokenizers`' limit_alphabet);
    # the others leave the words they stand in (they become [UNK] when tokenising).
    alphabet = set(sorted(chars, key=lambda c: (-chars[c], c))[:limit_alphabet])
    words = sorted(counts)
    freq = [counts[w] for w in words]
    kept = ["".join(c for c in w if c in alphabet) for w in words]
    seqs = [[w[0]] + [PREFIX + c for c in w[1:]] if w else [] for w in kept]
    vocab = list(dict.fromkeys(special_tokens))
    known = set(vocab)
    for symbol in sorted({s for seq in seqs for s in seq}):
        if symbol not in known:
            vocab.append(symbol)
            known.add(symbol)

    pairs: dict = defaultdict(int)
    where: dict = defaultdict(set)  # pair -> indices of the words holding it
    for index, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pairs[pair] += freq[index]
            where[pair].add(index)
    # Max-heap on count, ties broken by the pair's text; stale entries are skipped on pop.
    heap = [(-count, pair) for pair, count in pairs.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -negative:
            continue
        if -negative < min_frequency:
            break
        token = _merged(*pair)
        if token not in known:
            vocab.append(token)
            known.add(token)
        touched: dict = defaultdict(int)
        for index in sorted(where.pop(pair)):
            seq, f = seqs[index], freq[index]
            for old in zip(seq, seq[1:]):
                pairs[old] -= f
                touched[old] -= f
            merged, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
                    merged.append(token)
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            seqs[index] = merged
            for new in zip(merged, merged[1:]):
                pairs[new] += f
                touched[new] += f
                where[new].add(index)
        pairs.pop(pair, None)
        for changed in sorted(touched):
            if changed != pair and pairs.get(changed, 0) > 0:
                heapq.heappush(heap, (-pairs[changed], changed))
    return vocab


def train_tokenizer(lines, vocab_size: int, special_tokens: list[str], lowercase: bool = True):
    """A `transformers.BertTokenizerFast` over a deterministically trained WordPiece vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = train_vocabulary(lines, vocab_size, special_tokens, lowercase)
    ids = {token: index for index, token in enumerate(vocab)}
    tokenizer = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", continuing_subword_prefix=PREFIX))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=lowercase, lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", ids["[SEP]"]), ("[CLS]", ids["[CLS]"]))
    tokenizer.decoder = decoders.WordPiece(prefix=PREFIX)
    return BertTokenizerFast(tokenizer_object=tokenizer, do_lower_case=lowercase, unk_token="[UNK]", sep_token="[SEP]",
                             pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
