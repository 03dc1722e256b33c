"""CLIP's byte-level BPE tokenizer and `tokenize`, which turns text into the (N, L) id tensors the text encoder reads.

DenseCLIP (Sec. 3.3) never sees raw text: every class name goes through this tokenizer once, and the text encoder
then embeds the ids. The official code tokenizes each class name alone into L = 5 positions and fills the remaining
13 - 5 = 8 positions with learned contexts; plain CLIP prompts ("a photo of a {}.") use L = 77.

Mirrors OpenAI CLIP's `clip/simple_tokenizer.py` and `clip.tokenize` (and open_clip's copy of them), rewritten here
to be read top to bottom. The ids are identical token for token: tests/test_tokenizer.py compares several hundred
strings against `clip.tokenize`. What differs:
  * importing this file does no work; the 1.3 MB vocabulary is read on first use (`import clip` builds its
    tokenizer at import time);
  * the too-long error names the text and both lengths; it is still a RuntimeError, so callers written against
    OpenAI's function keep working;
  * the merge loop is written as "find the best-ranked pair, merge it everywhere, repeat" over a list.

The pipeline, in the order `SimpleTokenizer.encode` runs it:
  1. clean:        repair mojibake (ftfy), undo HTML escapes, squeeze whitespace, lower-case;
  2. pre-tokenise: a regex cuts the text into words, contractions, single digits and punctuation runs;
  3. bytes:        each piece becomes its UTF-8 bytes, each byte a printable stand-in character;
  4. BPE:          adjacent symbols are merged in the order the merges were learned, until none applies;
  5. ids:          each final symbol is looked up in the 49,408-entry vocabulary.
"""

import gzip
import html
import os
from functools import lru_cache

import ftfy
import regex
import torch

# CLIP's text transformer has 77 learned position embeddings, so that is the longest input it can read.
CONTEXT_LENGTH = 77

# The two special tokens. They are the last two vocabulary entries (49406 and 49407); the text encoder uses the
# position of the end token (its largest id) as the sentence summary.
SOT = "<|startoftext|>"
EOT = "<|endoftext|>"

# The merge list shipped with CLIP holds 262,145 merges, but CLIP kept only the first 49152 - 256 - 2 = 48,894 of
# them, so that 256 bytes + 256 end-of-word bytes + 48,894 merges + 2 specials = 49,408 = CLIP's vocab_size.
_NUM_MERGES = 49152 - 256 - 2

# Marks the last symbol of a word. "ing</w>" (a word ending) and "ing" (inside a word) are different tokens, and the
# marker is how decoding knows where to put spaces back.
_END_OF_WORD = "</w>"

# Step 2, pre-tokenisation. BPE never merges across the pieces this regex cuts, so it decides what can become one
# token. Alternatives are tried left to right at each position:
#   * the special tokens, so "<|endoftext|>" typed in the text becomes the special id, as in CLIP;
#   * English contractions, split off so "it's" gives "it" + "'s" rather than learning "it's", "he's", ...;
#   * a run of letters in any script (\p{L}): a word;
#   * ONE digit (\p{N}): numbers are spelled digit by digit, so "2024" is four tokens;
#   * a run of anything else that is not whitespace: punctuation and symbols, e.g. "?!" or an emoji.
# Whitespace matches nothing and is dropped; the end-of-word marker records it instead. IGNORECASE looks redundant
# after lower-casing but is kept because CLIP has it: a few characters that stay after .lower() still case-fold onto
# the contractions (the long s "ſ" folds to "s", so "it'ſ" splits like "it's").
_PIECES = regex.compile(
    r"""<\|startoftext\|> | <\|endoftext\|>
      | 's | 't | 're | 've | 'm | 'll | 'd
      | \p{L}+
      | \p{N}
      | [^\s\p{L}\p{N}]+""",
    regex.IGNORECASE | regex.VERBOSE,
)
_WHITESPACE = regex.compile(r"\s+")


def default_bpe_path():
    """The merge list shipped inside this package (see LICENSE-CLIP-BPE)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")


def bytes_to_unicode():
    """Step 3: a reversible map from each of the 256 byte values to one printable unicode character.

    BPE runs on strings, and working on bytes rather than characters means any text (Chinese, emoji, ...) can be
    spelled with just 256 base symbols: there is never an unknown token. But raw bytes are a poor alphabet for a
    merge file of whitespace-separated pairs: byte 0x20 is the space that separates the pair, 0x0A ends the line,
    and many bytes are unprintable control codes. So every byte gets a printable stand-in:
      * the 188 bytes that already are visible Latin-1 characters ("!".."~", "¡".."¬", "®".."ÿ") stand for
        themselves, so "a" is still "a" in the merge file;
      * the other 68 (control codes, space, DEL, NBSP, soft hyphen) are mapped, in byte order, to the characters
        256, 257, ... ("Ā", "ā", ...), which no byte uses. Space (0x20) becomes "Ġ", the 33rd of them.
    The order of the result also fixes the ids of the first 256 vocabulary entries.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in visible}
    spare = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(spare)
            spare += 1
    return table


def clean(text):
    """Step 1, exactly CLIP's cleaning: the same string must give the same ids as in CLIP's pre-training."""
    text = ftfy.fix_text(text)  # mojibake such as "cafÃ©" back to "café", curly quotes, odd unicode forms
    # Twice, because web text is sometimes escaped twice ("&amp;amp;" -> "&"). ftfy already unescapes entities in
    # text without a "<", so these two calls matter mostly for text that also contains markup.
    text = html.unescape(html.unescape(text))
    text = _WHITESPACE.sub(" ", text.strip()).strip()  # tabs, newlines and runs of spaces become one space
    return text.lower()  # CLIP's vocabulary is lower case only


class SimpleTokenizer:
    """CLIP's byte-level BPE: `encode` text to ids, `decode` ids back to text.

    bpe_path: a gzipped merge list in CLIP's format; None uses the copy shipped with this package.
    """

    def __init__(self, bpe_path=None):
        with gzip.open(bpe_path or default_bpe_path(), "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # Line 0 is a version header; each following line is one merge "a b", most frequent pair first.
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        # A merge learned earlier has a lower rank and is applied first (step 4).
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}

        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        # The vocabulary is built in CLIP's order, which fixes every id: the 256 byte symbols, the same 256 as word
        # endings, one entry per merge (the pair glued together), then the two special tokens.
        byte_symbols = list(self.byte_encoder.values())
        vocab = byte_symbols + [s + _END_OF_WORD for s in byte_symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {symbol: i for i, symbol in enumerate(vocab)}
        self.decoder = {i: symbol for symbol, i in self.encoder.items()}
        self.sot_token = self.encoder[SOT]
        self.eot_token = self.encoder[EOT]

        # Words repeat a lot (every prompt says "a photo of"), so remember each word's merge result. The special
        # tokens are seeded here so the merge loop leaves them whole.
        self._cache = {SOT: [SOT], EOT: [EOT]}

    def bpe(self, piece):
        """Step 4: split one pre-tokenised piece (already in byte stand-ins) into vocabulary symbols.

        Start from single characters, the last one carrying the end-of-word marker, e.g. for "lower":
            l o w e r</w>
        Then repeat: among all adjacent pairs, take the one whose merge was learned first (lowest rank), and glue
        every occurrence of it, scanning left to right so that in "a a a" only the first two are joined. Stop
        when no adjacent pair is in the merge list, or one symbol is left:
            l o w e r</w>  ->  lo w e r</w>  ->  lo w er</w>  ->  low er</w>  ->  lower</w>
        Every symbol at any stage is in the vocabulary, since each merge added its result to it.
        """
        if piece in self._cache:
            return self._cache[piece]
        symbols = [*piece[:-1], piece[-1] + _END_OF_WORD]
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[piece] = symbols
        return symbols

    def encode(self, text):
        """Text -> list of ids, without the start and end tokens (`tokenize` adds those)."""
        ids = []
        for piece in _PIECES.findall(clean(text)):
            stand_ins = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(stand_ins))
        return ids

    def decode(self, ids):
        """Ids -> text: join the symbols, map stand-ins back to bytes, and turn each word end into a space.

        As in CLIP, every word is followed by a space (so "a cat" decodes to "a cat "), the text comes back
        cleaned and lower-cased, and byte sequences cut in the middle of a character decode to U+FFFD.
        """
        stand_ins = "".join(self.decoder[i] for i in ids)
        data = bytes(self.byte_decoder[c] for c in stand_ins)
        return data.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ")


@lru_cache(maxsize=None)
def _default_tokenizer():
    # Built on the first call, not at import: reading the 1.3 MB merge list and building its 49k-entry tables is
    # work (about 0.1 s, and memory) that a program importing this file only to build a model should not pay for.
    return SimpleTokenizer()


def token_count(text: str) -> int:
    """Positions `tokenize` needs for `text`: [SOT] + its BPE ids + [EOT]."""
    return len(_default_tokenizer().encode(text)) + 2


def tokenize(texts, context_length=CONTEXT_LENGTH, truncate=False):
    """Text(s) -> LongTensor (N, context_length): [SOT] + BPE ids + [EOT], then zeros. Same as `clip.tokenize`.

    texts: a string or a list of N strings.
    context_length: positions per row; 77 for CLIP's text encoder, 5 for DenseCLIP's class names.
    truncate: if a text needs more positions, keep the first context_length ids and make the last one [EOT]
        (the encoder reads its features at the [EOT] position, so it must be present). If False, raise.
    Padding is id 0 (the byte "!"): harmless, since the causal mask stops [EOT] from attending past itself.
    """
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = _default_tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)  # (N, L)
    for row, text in enumerate(texts):
        ids = [tokenizer.sot_token, *tokenizer.encode(text), tokenizer.eot_token]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(
                    f"Input {text!r} is too long for context length {context_length}: it needs {len(ids)} tokens "
                    f"including [SOT] and [EOT]. Shorten it or pass truncate=True."
                )
            ids = ids[:context_length]
            ids[-1] = tokenizer.eot_token
        result[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result
