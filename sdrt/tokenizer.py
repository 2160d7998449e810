"""CLIP BPE tokenizers with no download.

Real diffusers folders bring their own `tokenizer/` (vocab.json + merges.txt) and we load it. A single-file
checkpoint usually comes alone: `clip_tokenizer` is CLIP's own (49408 ids, the vocabulary SD 1.x, 2.x and both SDXL
encoders were trained with), built from CLIP's merge table shipped beside this file (clip_bpe_16e6.txt.gz, MIT:
clip_bpe_16e6.LICENSE) exactly as OpenAI's SimpleTokenizer builds its vocabulary. The random-weight presets use
`builtin_tokenizer`: sdrt *builds* a small CLIP-format vocabulary: CLIP's 256 byte symbols (plain and with the
end-of-word marker `</w>`), merges learned by byte-pair encoding over a fixed corpus of prompt words, and CLIP's two
special tokens. It is deterministic (same corpus, same merges, same ids), is loaded by transformers' stock
CLIPTokenizer, so tokenization follows CLIP exactly (lower-casing, the regex pre-tokenizer, BPE, 77-token padding
with <|endoftext|>); only the merge table is ours and smaller (under 1024 ids instead of 49408).
"""

from __future__ import annotations

import collections
import functools
import gzip
from pathlib import Path

VOCAB_SIZE = 1024
CLIP_VOCAB_SIZE = 49408
MAX_LENGTH = 77
CLIP_BPE = Path(__file__).with_name("clip_bpe_16e6.txt.gz")

# Words of the kind prompts are made of; BPE merges are learned from these, so common prompt words become one token.
_CORPUS = """a photo of an astronaut riding a horse on the moon highly detailed portrait of a cat wearing sunglasses
oil painting landscape mountains lake at sunset digital art trending on artstation by greg rutkowski cinematic
lighting 4k 8k ultra realistic photograph studio ghibli anime style beautiful woman man child dog city street night
rain neon cyberpunk fantasy castle dragon forest river ocean beach sky clouds stars space planet robot car house
flower garden red green blue yellow black white golden colorful watercolor sketch pencil drawing concept illustration
masterpiece best quality sharp focus intricate elegant dramatic soft light shadow smiling standing sitting walking
in the with and of to on at by for from under over through behind front close up wide angle shot view bokeh depth
field blurry low worst bad ugly deformed extra fingers hands text watermark signature jpeg artifacts cropped"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map: BPE works on these 256 symbols."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def builtin_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) in CLIP's format: 512 byte symbols, learned merges, then the two special tokens."""
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    n_merges = VOCAB_SIZE - len(vocab_list) - 2
    b2u = bytes_to_unicode()
    # Each word as a tuple of byte symbols with the end-of-word marker on the last one, as CLIP's BPE does.
    counts = collections.Counter(_CORPUS.lower().split())
    words = {}
    for w, c in counts.items():
        syms = [b2u[b] for b in w.encode("utf-8")]
        syms[-1] += "</w>"
        words[tuple(syms)] = c
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for syms, c in words.items():
            for p in zip(syms, syms[1:]):
                pairs[p] += c
        if not pairs:
            break
        # Most frequent pair; ties broken lexicographically so the table is deterministic.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for syms, c in words.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            merged[tuple(out)] = c
        words = merged
        vocab_list.append(best[0] + best[1])
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(vocab_list))}
    return vocab, merges


def builtin_tokenizer(pad_token: str = "<|endoftext|>"):
    """A transformers CLIPTokenizer over the builtin vocabulary (SDXL's second encoder pads with '!')."""
    from transformers import CLIPTokenizer

    vocab, merges = builtin_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=MAX_LENGTH)


@functools.lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of CLIP's tokenizer: 512 byte symbols, the first 48894 merges of the table, the two special
    tokens (OpenAI's SimpleTokenizer: merges[1:49152-256-2+1]; line 0 is the table's version header)."""
    lines = gzip.decompress(CLIP_BPE.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:CLIP_VOCAB_SIZE - 512 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab = {s: i for i, s in enumerate(vocab_list + ["<|startoftext|>", "<|endoftext|>"])}
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)  # a damaged table, not a user error
    return vocab, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """CLIP's tokenizer as transformers' CLIPTokenizer (SD 2.x's and SDXL's second encoder pad with '!')."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=MAX_LENGTH)

