"""Raw calibration data: photos (Pillow) and text (tokenizers)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from onnx_vbp.data import DataError, InputSpec, RawOptions, iter_batches

Image = pytest.importorskip("PIL.Image")
tokenizers = pytest.importorskip("tokenizers")

NCHW = InputSpec("input_image", np.dtype(np.float32), ("batch", 3, 10, 10))
TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "minilm-tokenizer" / "tokenizer.json"
TEXT_SPECS = [
    InputSpec("input_ids", np.dtype(np.int64), ("batch", "seq")),
    InputSpec("attention_mask", np.dtype(np.int64), ("batch", "seq")),
]


TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", ".", "un", "##believ", "##able"]


@pytest.fixture
def tiny_tokenizer(tmp_path: Path) -> Path:
    """A BERT-style WordPiece tokenizer.json over TINY_VOCAB ("unbelievable" is three tokens)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(TINY_VOCAB)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    path = tmp_path / "tiny_tokenizer.json"
    tokenizer.save(str(path))
    return path


def _halves(path: Path, size: tuple[int, int] = (40, 20)) -> None:
    """Left half red, right half blue."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] // 2, 0] = 255
    pixels[:, size[0] // 2 :, 2] = 255
    Image.fromarray(pixels).save(path)


def test_photo_is_resized_center_cropped_normalized_nchw(tmp_path: Path) -> None:
    _halves(tmp_path / "a.PNG")  # suffixes in any case
    (batch,) = iter_batches(tmp_path, [NCHW], raw=RawOptions(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    image = batch["input_image"]
    assert image.shape == (1, 3, 10, 10) and image.dtype == np.float32
    # 40x20 -> shorter side 10 -> 20x10 -> center crop keeps 5 red and 5 blue columns (bilinear
    # blends the two at the boundary)
    np.testing.assert_allclose(image[0, 0, :, :4], 1.0)
    np.testing.assert_allclose(image[0, 2, :, 6:], 1.0)
    np.testing.assert_allclose(image[0, 0, :, 6:], -1.0)
    np.testing.assert_allclose(image[0, 1], -1.0)


def test_grey_channels_last_and_batching(tmp_path: Path) -> None:
    for i in range(5):
        _halves(tmp_path / f"{i}.jpg", size=(12, 12))
    spec = InputSpec("pixels", np.dtype(np.float32), ("batch", 12, 12, 1))
    batches = list(iter_batches(tmp_path, [spec], batch_size=2, raw=RawOptions(mean=(0.0,), std=(1.0,))))
    assert [b["pixels"].shape for b in batches] == [(2, 12, 12, 1), (2, 12, 12, 1), (1, 12, 12, 1)]
    assert 0.0 < batches[0]["pixels"].mean() < 1.0
    assert sum(len(b["pixels"]) for b in iter_batches(tmp_path, [spec], max_samples=3)) == 3


def test_symbolic_image_size_needs_image_size(tmp_path: Path) -> None:
    _halves(tmp_path / "a.png")
    spec = InputSpec("img", np.dtype(np.float32), ("batch", 3, "h", "w"))
    with pytest.raises(DataError, match="`image_size`"):
        list(iter_batches(tmp_path, [spec]))
    (batch,) = iter_batches(tmp_path, [spec], raw=RawOptions(image_size=(8, 16)))
    assert batch["img"].shape == (1, 3, 8, 16)


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    _halves(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError, match=r"broken.jpg: not a readable image"):
        list(iter_batches(tmp_path, [NCHW]))


def test_images_for_a_model_without_image_input(tmp_path: Path) -> None:
    _halves(tmp_path / "a.png")
    with pytest.raises(DataError, match="single 4-D float input"):
        list(iter_batches(tmp_path, TEXT_SPECS))


def test_mixed_formats_are_refused(tmp_path: Path) -> None:
    _halves(tmp_path / "a.png")
    np.savez(tmp_path / "b.npz", input_image=np.zeros((1, 3, 10, 10), np.float32))
    with pytest.raises(DataError, match="mixes data formats"):
        list(iter_batches(tmp_path, [NCHW]))


needs_tokenizer = pytest.mark.skipif(not TOKENIZER.exists(), reason="shared tokenizer absent")


@needs_tokenizer
def test_text_lines_are_tokenized_and_padded_per_batch(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world\n\na much longer sentence than the first\nshort\n")
    batches = list(iter_batches(tmp_path, TEXT_SPECS, batch_size=2, raw=RawOptions(tokenizer=TOKENIZER)))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]  # the blank line is not a sample
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    assert ids.dtype == np.int64 and ids.shape == mask.shape
    assert ids[0, 0] == 101 and mask[0].sum() == 4 and mask[1].all()  # [CLS] hello world [SEP] + padding
    assert batches[1]["input_ids"].shape == (1, 3)  # padded to its own batch's longest


@needs_tokenizer
def test_jsonl_text_field_truncation_and_token_type_ids(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "word " * 50, "label": 1}), json.dumps({"text": "tiny"})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    specs = [*TEXT_SPECS, InputSpec("token_type_ids", np.dtype(np.int64), ("batch", "seq"))]
    raw = RawOptions(tokenizer=TOKENIZER, max_length=16, long_text="truncate")
    (batch,) = iter_batches(tmp_path, specs, raw=raw)
    assert batch["input_ids"].shape == (2, 16) and not batch["token_type_ids"].any()
    (tmp_path / "a.jsonl").write_text('{"txt": "no text field"}\n')
    with pytest.raises(DataError, match=r"a.jsonl:1: expected a JSON object with a 'text' field"):
        list(iter_batches(tmp_path, TEXT_SPECS, raw=RawOptions(tokenizer=TOKENIZER)))


@needs_tokenizer
def test_empty_text_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one sample\n")
    (tmp_path / "b.txt").write_text("\n  \n")
    with pytest.raises(DataError, match=r"b.txt: empty text file"):
        list(iter_batches(tmp_path, TEXT_SPECS, raw=RawOptions(tokenizer=TOKENIZER)))


def test_missing_or_broken_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one sample\n")
    with pytest.raises(DataError, match="needs a tokenizer: give `tokenizer`"):
        list(iter_batches(tmp_path, TEXT_SPECS))
    with pytest.raises(DataError, match="cannot load tokenizer"):
        list(iter_batches(tmp_path, TEXT_SPECS, raw=RawOptions(tokenizer=tmp_path / "nope.json")))


def test_text_for_a_model_with_other_inputs(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one sample\n")
    with pytest.raises(DataError, match="also takes input_image"):
        list(iter_batches(tmp_path, [NCHW], raw=RawOptions(tokenizer=TOKENIZER)))


def test_images_over_the_pixel_limit_or_pillows_bomb_limit_are_one_error(tmp_path: Path, monkeypatch) -> None:
    import onnx_vbp.data as data

    _halves(tmp_path / "a.png", size=(40, 30))
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"a.png: 40 x 30 pixels is over the limit"):
        list(iter_batches(tmp_path, [NCHW]))
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow refuses past twice its limit
    with pytest.raises(DataError, match=r"a.png: not a readable image \(Image size"):
        list(iter_batches(tmp_path, [NCHW]))


@needs_tokenizer
def test_text_is_cut_before_tokenizing_to_what_max_length_can_use(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a.txt").write_text("word " * 200_000 + "\n")
    seen: list[int] = []
    real = tokenizers.Tokenizer.encode_batch

    class Spy:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def encode_batch(self, texts):
            seen.extend(len(t) for t in texts)
            return real(self.tokenizer, texts)

    import onnx_vbp.data as data

    original_init = data.TextEncoder.__init__

    def spied_init(self, specs, options):
        original_init(self, specs, options)
        self.tokenizer = Spy(self.tokenizer)

    monkeypatch.setattr(data.TextEncoder, "__init__", spied_init)
    raw = RawOptions(tokenizer=TOKENIZER, max_length=16, long_text="truncate")
    (batch,) = iter_batches(tmp_path, TEXT_SPECS, raw=raw)
    assert batch["input_ids"].shape == (1, 16)  # truncated by the tokenizer as before
    assert seen == [16 * data.CHARS_PER_TOKEN]  # and the line cut before it reached it


@needs_tokenizer
@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": 7}', "'text' is int, not a string"),
        ('{"text": null}', "'text' is NoneType, not a string"),
        ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "expected a JSON object with a 'text' field"),
    ],
)
def test_jsonl_text_that_is_not_a_string(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "a.jsonl").write_text(line + "\n")
    with pytest.raises(DataError, match=message):
        list(iter_batches(tmp_path, TEXT_SPECS, raw=RawOptions(tokenizer=TOKENIZER)))


@needs_tokenizer
def test_a_tokenizer_that_fails_on_the_text_is_one_error(tmp_path: Path) -> None:
    config = json.loads(TOKENIZER.read_text())
    config["model"]["unk_token"] = "[NOT IN THE VOCABULARY]"
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("snowman \u2603 unknown\n")
    with pytest.raises(DataError, match="fails on the text: WordPiece error"):
        list(iter_batches(tmp_path / "data", TEXT_SPECS, raw=RawOptions(tokenizer=tmp_path / "tokenizer.json")))


def test_normalization_defaults_follow_the_channels_and_given_values_are_checked() -> None:
    mean, std = RawOptions().normalization(3)
    np.testing.assert_allclose(mean, [0.485, 0.456, 0.406], rtol=1e-6)
    np.testing.assert_allclose(std, [0.229, 0.224, 0.225], rtol=1e-6)
    assert [v.tolist() for v in RawOptions().normalization(1)] == [[0.0], [1.0]]  # no ImageNet skew for grey
    assert [v.tolist() for v in RawOptions(mean=(0.5,), std=(0.25,)).normalization(3)] == [[0.5] * 3, [0.25] * 3]
    with pytest.raises(DataError, match="`mean` has 2 values; the image input has 3 channels"):
        RawOptions(mean=(0.5, 0.5)).normalization(3)
    with pytest.raises(DataError, match="`std` must be positive"):
        RawOptions(std=(0.0,)).normalization(1)


def test_photos_and_text_lines_are_counted_for_a_progress_total(tmp_path: Path, tiny_tokenizer: Path) -> None:
    from onnx_vbp.data import count_samples

    for i in range(3):
        _halves(tmp_path / f"{i}.png")
    assert count_samples(tmp_path, [NCHW]) == 3
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("one\n\n  \ntwo\nthree\n")
    (tmp_path / "text" / "b.jsonl").write_text('{"text": "x"}\n')
    raw = RawOptions(tokenizer=tiny_tokenizer)
    assert count_samples(tmp_path / "text" / "a.txt", TEXT_SPECS, raw) == 3  # blank lines are not samples
    truncate = RawOptions(tokenizer=tiny_tokenizer, max_length=4, long_text="truncate")
    (tmp_path / "text" / "a.txt").write_text("the cat sat on the mat\nthe\n")
    assert count_samples(tmp_path / "text" / "a.txt", TEXT_SPECS, truncate) == 2
    split = RawOptions(tokenizer=tiny_tokenizer, max_length=4)  # two words per window
    assert count_samples(tmp_path / "text" / "a.txt", TEXT_SPECS, split) == 4
    assert count_samples(tmp_path / "text" / "a.txt", TEXT_SPECS, split, limit=3) == 3


def _rows(batches: list[dict[str, np.ndarray]]) -> list[list[int]]:
    """Each sample's token ids without [CLS], [SEP] and padding."""
    rows = []
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            rows.append(ids[mask == 1][1:-1].tolist())
    return rows


def test_a_long_line_becomes_windows_cut_between_words_and_nothing_is_lost(tmp_path: Path, tiny_tokenizer) -> None:
    words = ["the", "cat", "unbelievable", "sat", "on", "the", "mat", "."] * 5
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text(" ".join(words) + "\nthe mat\n")
    expected = [TINY_VOCAB.index(t) for t in " ".join(["the cat un ##believ ##able sat on the mat ."] * 5).split()]
    split = RawOptions(tokenizer=tiny_tokenizer, max_length=8)  # 6 tokens per window between [CLS] and [SEP]
    batches = list(iter_batches(tmp_path / "data", TEXT_SPECS, batch_size=4, raw=split))
    rows = _rows(batches)
    assert rows[-1] == [4, 8]  # the short line is its own sample, after the long one's windows
    assert list(itertools.chain(*rows[:-1])) == expected  # every token once, in order
    assert all(len(row) <= 6 for row in rows)
    assert all(row[0] not in (11, 12) and row[-1] not in (10, 11) for row in rows)  # no word cut
    for window, following in itertools.pairwise(rows[:-1]):  # each window is as full as whole words allow
        next_word = 1 + next((i for i, t in enumerate(following[1:]) if t not in (11, 12)), len(following) - 1)
        assert len(window) + next_word > 6
    truncate = RawOptions(tokenizer=tiny_tokenizer, max_length=8, long_text="truncate")
    assert _rows(list(iter_batches(tmp_path / "data", TEXT_SPECS, raw=truncate))) == [expected[:6], [4, 8]]


def test_a_huge_line_is_tokenized_a_bounded_stretch_at_a_time(tmp_path: Path, tiny_tokenizer, monkeypatch) -> None:
    import onnx_vbp.data as data

    monkeypatch.setattr(data, "CHARS_PER_TOKEN", 3)  # stretches of 24 characters: seams in most words
    seen: list[int] = []
    real = tokenizers.Tokenizer.encode_batch

    def spy(self, texts, *args, **kwargs):
        seen.extend(len(t) for t in texts)
        return real(self, texts, *args, **kwargs)

    monkeypatch.setattr(tokenizers.Tokenizer, "encode_batch", spy)
    line = " ".join(["unbelievable the cat sat on the mat ."] * 300)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text(line + "\n")
    raw = RawOptions(tokenizer=tiny_tokenizer, max_length=8)
    rows = _rows(list(iter_batches(tmp_path / "data", TEXT_SPECS, raw=raw)))
    once = [TINY_VOCAB.index(t) for t in "un ##believ ##able the cat sat on the mat .".split()]
    assert list(itertools.chain(*rows)) == once * 300  # no token lost or changed at the seams
    assert max(seen) <= 24


def test_window_bounds_end_where_words_end() -> None:
    from onnx_vbp.data import _window_bounds

    assert _window_bounds([0, 0, 0, 1, 1, 2], 4) == [(0, 3), (3, 6)]  # (0, 4) would cut word 1
    assert _window_bounds([0, 0, 0, 0, 0], 2) == [(0, 2), (2, 4), (4, 5)]  # a word longer than a window is cut
    assert _window_bounds([0, 1, 2], 5) == [(0, 3)]
    assert _window_bounds([], 3) == []


def test_long_text_must_be_split_or_truncate() -> None:
    with pytest.raises(DataError, match="`long_text` is 'cut'; it must be one of split, truncate"):
        RawOptions(long_text="cut")
