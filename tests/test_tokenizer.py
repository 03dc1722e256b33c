"""Parity of denseclip.tokenizer with OpenAI CLIP's tokenizer (the clip-anytorch package), id for id.

The strings cover what DenseCLIP feeds the tokenizer (ADE20K and COCO class names, CLIP prompt templates) and the
places where a rewrite could drift: text cleaning (ftfy, HTML escapes, whitespace), the pre-tokenising regex
(contractions, digits, punctuation, non-Latin scripts, emoji), special tokens typed as text, and the too-long /
truncate paths at the context lengths DenseCLIP uses (77 for prompts, 5 for class names, 13 for the text encoder).
"""

import os
import subprocess
import sys

import clip
import pytest
import torch

from denseclip.data.classes import ADE20K_CLASSES  # mmseg's 150 names, verbatim ('bed ' with its trailing space)
from denseclip.tokenizer import SimpleTokenizer, tokenize


# The 80 COCO detection categories, in category-id order.
COCO_CLASSES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
    'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
    'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis',
    'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard',
    'tennis racket', 'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich',
    'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant', 'bed',
    'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone', 'microwave', 'oven',
    'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush',
)

# A sample of CLIP's ImageNet prompt templates.
TEMPLATES = (
    'a photo of a {}.', 'a bad photo of the {}.', 'a photo of many {}.', 'a sculpture of a {}.',
    'a rendering of a {}.', 'graffiti of the {}.', 'a cropped photo of the {}.', 'a tattoo of a {}.', 'itap of a {}.',
    'a bright photo of a {}.', 'art of the {}.', 'a pixelated photo of the {}.', 'there is a {} in the scene.',
    'A PHOTO OF THE {}!', "it's a {}, isn't it?",
)

TRICKY = (
    # empty and whitespace only
    '', ' ', '\n\t', '\u3000',
    # accented Latin, and forms ftfy normalises (combining accent, ligature, full-width)
    'café', 'naïve', 'Zürich', 'crème brûlée', 'façade', 'São Paulo', 'Ångström', 'e\u0301te\u0301', 'ﬁsh',
    'ＡＢＣ１２３',
    # other scripts
    '猫の写真', '一张猫的照片', '고양이 사진', 'صورة قطة', 'חתול', 'बिल्ली की तस्वीर', 'фото кошки', 'ΣΊΣΥΦΟΣ γάτα',
    'ภาพแมว', 'İstanbul', 'Straße STRASSE',
    # emoji, skin tones, ZWJ sequences, flags, variation selectors
    '😀', 'a cat 🐱 on a mat', '👍🏽', '👨\u200d👩\u200d👧\u200d👦', '🇫🇷🇯🇵', '❤️', '🙂🙃😉', 'fire🔥fire',
    # HTML entities, single and double escaped; ftfy unescapes entities itself unless the text contains "<",
    # so the tagged strings are the ones that test the tokenizer's own double html.unescape
    '<p>tom &amp;amp; jerry</p>', '<i>&amp;lt;3</i>', '<b>&#39;</b>',
    '&amp;', 'tom &amp; jerry', '&lt;b&gt;bold&lt;/b&gt;', 'rock &#39;n&#39; roll', '&amp;amp;', '&quot;hi&quot;',
    'a&nbsp;b', '&#x1F600;', '&notanentity;',
    # mojibake that ftfy repairs
    'cafÃ©', 'â€œquotedâ€\x9d', 'FranÃ§ais', 'Ã¼ber', 'doesnâ€™t', 'â€”dashâ€”',
    # whitespace runs, tabs, newlines, unusual spaces and invisible characters
    '  a\tphoto\n\nof   a\r\ncat  ', '\u00a0nbsp\u00a0', 'line\u2028separator', 'zero\u200bwidth', 'a\x1fb', 'x\x00y',
    # upper case and digits
    'A PHOTO OF A CAT', 'CamelCaseWord', 'iPhone 15 Pro', '2024', '3.14159', '1,000,000', '٣٤٥', '½ ² ⅷ', '0x1F',
    # punctuation runs and symbols
    '!!!???...', '--==**', '(a)[b]{c}', '...', '"quoted"', '#hashtag @user', 'http://example.com/a?b=c&d=e',
    'e-mail', 'C++', '$5.99', '100%', '~`^|\\', '«guillemets»', '— – ‐',
    # contractions, in and out of place, and literal special tokens
    "it's", "don't", "they're", "we've", "I'm", "you'll", "he'd", "IT'S", "WE'VE", "rock 'n' roll", "'s", "''",
    "the cats' toys", "o'clock", 'it’s', "it'ſ", "'''s", "'dd", "y'all'd've",
    '<|startoftext|>', 'hello <|endoftext|> world', '<|ENDOFTEXT|>', '<|endoftext', '<|startoftext|><|endoftext|>',
)

LONG = (
    ' '.join(ADE20K_CLASSES),
    'a ' * 100,
    'supercalifragilisticexpialidocious' * 5,
    '1234567890' * 10,
    '🙂' * 80,
    'a photo of a ' + 'very ' * 80 + 'big cat.',
    # exactly at and one past each context length used below: n words "a" need n + 2 positions
    'a ' * 3, 'a ' * 4, 'a ' * 11, 'a ' * 12, 'a ' * 75, 'a ' * 76,
)


def _all_strings():
    prompts = [t.format(name) for t in TEMPLATES for name in ADE20K_CLASSES[::10] + COCO_CLASSES[::8]]
    return list(ADE20K_CLASSES) + list(COCO_CLASSES) + prompts + list(TRICKY) + list(LONG)


STRINGS = _all_strings()


def _run(fn, text, context_length, truncate):
    """The tokens, or the string "RuntimeError" if fn refused the text."""
    try:
        return fn(text, context_length=context_length, truncate=truncate)
    except RuntimeError:
        return "RuntimeError"


def test_enough_strings():
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80
    assert len(STRINGS) >= 300


@pytest.mark.parametrize("context_length", [77, 13, 5])
@pytest.mark.parametrize("truncate", [False, True])
def test_tokenize_matches_clip(context_length, truncate):
    mismatches = []
    for text in STRINGS:
        ours = _run(tokenize, text, context_length, truncate)
        theirs = _run(clip.tokenize, text, context_length, truncate)
        if isinstance(ours, str) or isinstance(theirs, str):
            same = isinstance(ours, str) and isinstance(theirs, str)
        else:
            same = ours.dtype == theirs.dtype == torch.long and torch.equal(ours, theirs)
        if not same:
            mismatches.append(text)
    assert not mismatches, f"{len(mismatches)} strings differ from clip.tokenize, e.g. {mismatches[:5]!r}"


def test_both_paths_are_exercised():
    # The parity test above only means something if some strings overflow each context length and some fit.
    for context_length in (77, 13, 5):
        refused = [_run(clip.tokenize, t, context_length, False) == "RuntimeError" for t in STRINGS]
        assert any(refused) and not all(refused)


def test_batch_matches_clip():
    fitting = [t for t in STRINGS if _run(clip.tokenize, t, 77, False) != "RuntimeError"]
    assert len(fitting) >= 300
    assert torch.equal(tokenize(fitting), clip.tokenize(fitting))
    assert torch.equal(tokenize(STRINGS, truncate=True), clip.tokenize(STRINGS, truncate=True))
    assert tokenize([]).shape == clip.tokenize([]).shape == (0, 77)


def test_encode_decode_match_clip():
    ours, theirs = SimpleTokenizer(), clip.clip._tokenizer
    assert (ours.sot_token, ours.eot_token) == (theirs.encoder['<|startoftext|>'], theirs.encoder['<|endoftext|>'])
    assert ours.encoder == theirs.encoder
    for text in STRINGS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids), text


def test_too_long_error_names_text_and_lengths():
    with pytest.raises(RuntimeError, match=r"'a photo of a cat' is too long for context length 5: it needs 7 tokens"):
        tokenize(['a cat', 'a photo of a cat'], context_length=5)


def test_truncate_keeps_the_start_and_ends_with_eot():
    tok = SimpleTokenizer()
    row = tokenize('a photo of a cat', context_length=5, truncate=True)[0]
    assert row.tolist() == [tok.sot_token, *tok.encode('a photo of'), tok.eot_token]


@pytest.mark.parametrize("text", ['a photo of a cat', 'there is a chest of drawers in the scene', 'swivel chair'])
def test_decode_round_trip(text):
    tok = SimpleTokenizer()
    # As in CLIP, each word end decodes to a space, so the text comes back with one trailing space.
    assert tok.decode(tok.encode(text)) == text + ' '


def test_import_reads_no_vocab():
    # A fresh interpreter spies on every file opened while importing the module: the vocabulary must not be among
    # them and the cached tokenizer must not exist yet. The last lines check that the spy does see the read when
    # tokenize() is first called, so the first check cannot pass vacuously.
    code = """
import builtins, gzip
opened = []
def spy(real):
    def wrapper(file, *args, **kwargs):
        opened.append(str(file))
        return real(file, *args, **kwargs)
    return wrapper
builtins.open, gzip.open = spy(builtins.open), spy(gzip.open)
import denseclip.tokenizer as t
assert t._default_tokenizer.cache_info().currsize == 0
assert not any('bpe_simple_vocab' in f for f in opened), opened
t.tokenize('a cat')
assert t._default_tokenizer.cache_info().currsize == 1
assert any('bpe_simple_vocab' in f for f in opened), opened
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
