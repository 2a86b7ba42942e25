"""OCR reward: the text helpers by hand, and the real Tesseract reading words drawn with PIL."""

from __future__ import annotations

import logging
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from pcpo_hydra.config import ConfigError, validate
from pcpo_hydra.rewards.ocr import levenshtein, normalise, quoted_text, text_similarity, upscale
from pcpo_hydra.weights import ModelLoadError

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
needs_tesseract = pytest.mark.skipif(
    shutil.which("tesseract") is None, reason="no tesseract binary: apt-get install tesseract-ocr tesseract-ocr-eng"
)


def font(size: int) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(DEJAVU, size)
    except OSError:  # no DejaVu (apt package fonts-dejavu-core): PIL's bundled font
        return ImageFont.load_default(size)


def render(word: str, size: tuple[int, int] = (160, 48), font_size: int = 24) -> torch.Tensor:
    """Black text centred on white, as a [3, H, W] float image in [0, 1]."""
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((size[0] // 2, size[1] // 2), word, fill="black", font=font(font_size), anchor="mm")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def words() -> torch.Tensor:
    return torch.stack([render(word) for word in ("hello", "world", "Tesseract")])


@pytest.fixture
def ocr_reward():
    """OcrReward with pytesseract importable (the `ocr` extra) and the binary on PATH."""
    pytest.importorskip("pytesseract", reason="pip install 'pcpo-hydra[ocr]'")
    from pcpo_hydra.rewards.ocr import OcrReward

    return OcrReward


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("", "", 0), ("abc", "", 3), ("", "ab", 2), ("abc", "abc", 0), ("a", "b", 1),
     ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("hello", "world", 4), ("hello", "helo", 1),
     ("intention", "execution", 5)],
)
def test_levenshtein_matches_hand_counts_both_ways(a: str, b: str, distance: int) -> None:
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


@pytest.mark.parametrize(
    ("read", "target", "score"),
    [
        ("Hello World\n", "hello world", 1.0),      # case and whitespace do not count
        ("HELLOWORLD", "Hello  World", 1.0),
        ("~ a sign: hello!\n", "hello", 1.0),       # the reading contains the target
        ("\ufb01sh", "fish", 1.0),                  # NFKC: the 'fi' ligature reads as 'fi'
        ("hallo", "hello", 0.8),                    # 1 substitution of 5 characters
        ("helo", "hello", 0.8),                     # 1 deletion
        ("hellp world", "hello world", 0.9),        # 1 of 10 once the space is gone
        ("world", "hello", 0.2),                    # 4 of 5
        ("", "hello", 0.0),                         # nothing read
        ("zzzzzzzzzzzz", "ab", 0.0),                # 12 edits for 2 characters: clipped at 0
    ],
)
def test_text_similarity_by_hand(read: str, target: str, score: float) -> None:
    assert text_similarity(read, target) == pytest.approx(score, abs=1e-12)


def test_normalise_and_an_empty_target() -> None:
    assert normalise(" Hello\tWORLD \n") == "helloworld"
    with pytest.raises(ValueError, match="empty"):
        text_similarity("abc", " \n")


@pytest.mark.parametrize(
    ("prompt", "target"),
    [
        ('a shop sign that says "OPEN"', "OPEN"),
        ('a neon sign reading "Hello World" at night', "Hello World"),
        ("a poster saying \u201cSave the Bees\u201d", "Save the Bees"),       # curly quotes
        ('a "red" door and a "blue" one', "red blue"),                      # every span, in order
        ("a cat's bowl with \"meow\" on it", "meow"),                       # an apostrophe is no quote
        ('a mug with "  coffee " on it', "coffee"),
    ],
)
def test_quoted_text_is_every_double_quoted_span(prompt: str, target: str) -> None:
    assert quoted_text(prompt) == target


@pytest.mark.parametrize(
    "prompt", ["a red car", "a sign saying 'hi'", 'an unclosed "quote', 'an empty "" span', 'blank "  "']
)
def test_a_prompt_without_quoted_text_is_an_error_naming_it(prompt: str) -> None:
    with pytest.raises(ValueError, match=r"double quotes in every prompt.*" + repr(prompt)[1:-1]):
        quoted_text(prompt)


def test_upscale_enlarges_the_short_side_only_when_below_min_side() -> None:
    grey = Image.new("RGB", (64, 32), (90, 120, 200))
    enlarged = upscale(grey, 256)
    assert enlarged.size == (512, 256)
    assert np.array_equal(np.asarray(enlarged), np.full((256, 512, 3), (90, 120, 200), dtype=np.uint8))
    assert upscale(grey, 32) is grey and upscale(grey, 0) is grey  # already large enough: untouched
    assert upscale(Image.new("RGB", (30, 20)), 64).size == (96, 64)  # aspect kept: 30 * 3.2 = 96


@needs_tesseract
def test_a_quoted_word_that_is_drawn_scores_one_and_other_words_less(ocr_reward, words) -> None:
    reward = ocr_reward(workers=2)
    assert [read.strip() for read in reward.read(words)] == ["hello", "world", "Tesseract"]
    matching = reward(words, ['a sign that says "hello"', 'the word "WORLD"', "\u201ctesseract\u201d"])
    assert torch.equal(matching, torch.ones(3))
    # hello vs world: 4 edits of 5; world vs hello: the same; tesseract vs "pizza": 9 > 5 edits, clipped.
    swapped = reward(words, ['"world"', '"hello"', '"pizza"'])
    assert torch.equal(swapped, torch.tensor([0.2, 0.2, 0.0]))
    assert swapped.dtype == torch.float32 and swapped.shape == (3,)


@needs_tesseract
def test_scores_do_not_depend_on_batch_split_or_workers(ocr_reward, words) -> None:
    prompts = ['"help"', '"word"', '"Tesseract"']
    whole = ocr_reward(batch_size=3, workers=3)(words, prompts)
    split = ocr_reward(batch_size=2, workers=1)(words, prompts)
    assert torch.equal(whole, split)
    # hello -> help: 2 edits of the target's 4 characters; world -> word: 1 of 4.
    assert torch.equal(whole, torch.tensor([0.5, 0.75, 1.0]))


@needs_tesseract
def test_blank_and_noise_images_score_zero(ocr_reward) -> None:
    blank = torch.ones(1, 3, 48, 160)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # small: noise is slow to read
    reward = ocr_reward(workers=2)
    assert reward.read(blank) == [""]
    scores = torch.cat([reward(blank, ['"hello"']), reward(noise, ['"hello"'])])
    assert torch.equal(scores, torch.zeros(2))


@needs_tesseract
def test_small_text_is_read_only_after_enlarging(ocr_reward) -> None:
    tiny = torch.stack([render(word, size=(64, 32), font_size=9) for word in ("hello", "pizza", "STOP")])
    prompts = ['"hello"', '"pizza"', '"STOP"']
    assert torch.equal(ocr_reward(min_side=256)(tiny, prompts), torch.ones(3))
    assert ocr_reward(min_side=0)(tiny, prompts).mean() < 0.9


@needs_tesseract
def test_a_prompt_without_quotes_fails_before_any_ocr(ocr_reward, words, monkeypatch) -> None:
    reward = ocr_reward()
    monkeypatch.setattr(reward, "read", lambda images: pytest.fail("OCR ran for an unusable prompt"))
    with pytest.raises(ValueError, match="'a red car'"):
        reward(words, ['"hello"', "a red car", '"x"'])


@needs_tesseract
def test_a_tesseract_failure_is_a_nan_for_that_image(ocr_reward, words, monkeypatch, caplog) -> None:
    import pytesseract

    reward = ocr_reward(workers=1)
    real = pytesseract.image_to_string
    calls = iter(range(3))

    def second_fails(image, **kwargs):
        if next(calls) == 1:
            raise pytesseract.TesseractError(1, "Error during processing.")
        return real(image, **kwargs)

    monkeypatch.setattr(pytesseract, "image_to_string", second_fails)
    with caplog.at_level(logging.WARNING, logger="pcpo_hydra.rewards.ocr"):
        scores = reward(words, ['"hello"', '"world"', '"Tesseract"'])
    assert scores[0] == 1.0 and scores[1].isnan() and scores[2] == 1.0
    assert "Error during processing" in caplog.text


def test_missing_pytesseract_names_the_extra(monkeypatch) -> None:
    from pcpo_hydra.rewards.ocr import OcrReward

    monkeypatch.setitem(sys.modules, "pytesseract", None)  # `import pytesseract` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'pcpo-hydra\[ocr\]'"):
        OcrReward()


@pytest.mark.parametrize("command", ["/nonexistent/tesseract", "false", "echo"])
def test_a_bad_tesseract_cmd_names_the_key_and_the_package(ocr_reward, command: str) -> None:
    import pytesseract

    before = pytesseract.pytesseract.tesseract_cmd
    with pytest.raises(ModelLoadError, match=r"reward.tesseract_cmd=.*tesseract-ocr tesseract-ocr-eng|"
                                             r"tesseract-ocr tesseract-ocr-eng.*reward.tesseract_cmd="):
        ocr_reward(tesseract_cmd=command)
    assert pytesseract.pytesseract.tesseract_cmd == before  # a failed check leaves pytesseract as it was


@needs_tesseract
def test_missing_language_data_names_its_package(ocr_reward) -> None:
    with pytest.raises(ModelLoadError, match=r"no trained data for xyz .*tesseract-ocr-eng tesseract-ocr-xyz"):
        ocr_reward(lang="eng+xyz")


def test_config_option_composes_and_rejects_bad_values(compose_cfg) -> None:
    cfg = validate(compose_cfg("reward=ocr", "prompts=ocr_words"))
    assert (cfg.reward.psm, cfg.reward.thresholding, cfg.reward.min_side) == (6, "sauvola", 256)
    assert all(quoted_text(prompt) for prompt in cfg.prompts.prompts)
    for override, message in [
        ("reward.psm=0", "reward.psm=0: must be one of 1, 3,"),
        ("reward.thresholding=adaptive", "reward.thresholding='adaptive': must be one of 'otsu'"),
        ("reward.workers=0", "reward.workers=0: must be a number > 0"),
        ("reward.min_side=-1", "reward.min_side=-1: must be a number >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            validate(compose_cfg("reward=ocr", override))


@needs_tesseract
def test_sauvola_needs_tesseract_5(ocr_reward, monkeypatch) -> None:
    import pytesseract
    from packaging.version import Version

    monkeypatch.setattr(pytesseract, "get_tesseract_version", lambda: Version("4.1.1"))
    with pytest.raises(ValueError, match=r"needs tesseract >= 5, found 4.1.1.*reward.thresholding=otsu"):
        ocr_reward()
    assert ocr_reward(thresholding="otsu").config == "--psm 6 -c thresholding_method=0"


@needs_tesseract
def test_the_config_node_builds_the_reward_it_describes(ocr_reward, compose_cfg) -> None:
    from hydra.utils import instantiate

    reward = instantiate(validate(compose_cfg("reward=ocr", "reward.psm=11", "reward.workers=2")).reward)
    assert isinstance(reward, ocr_reward) and reward.name == "ocr"
    assert reward.config == "--psm 11 -c thresholding_method=2"
    assert (reward.lang, reward.min_side, reward.workers) == ("eng", 256, 2)
