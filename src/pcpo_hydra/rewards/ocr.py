"""Text rendering (Flow-GRPO's OCR task): how well the image shows the text the prompt quotes.

The score is `1 - min(d, n) / n`, in [0, 1], where n is the length of the target (the prompt's
quoted text) and d the Levenshtein distance between the OCR reading and the target, both
compared Flow-GRPO's way: case-insensitive, with all whitespace removed. As in Flow-GRPO, a
reading that contains the target scores 1 (stray marks read elsewhere in a scene cost nothing),
and more than n edits count as n (a long garbage reading scores 0, not below).

Engine: Tesseract 5 through pytesseract. Flow-GRPO uses PaddleOCR, which downloads its detection
and recognition models at first use; Tesseract ships with its trained data in Debian/Ubuntu
(`tesseract-ocr tesseract-ocr-eng`), conda-forge and Homebrew, runs on the CPU and needs no
download, so the reward works offline and in CI. Its scores are not numerically those of
PaddleOCR: compare runs scored by the same engine only.

Tesseract is tuned for scanned pages, not scenes. Three settings make it read text in generated
images (chosen on words drawn over gradients and textures): Sauvola's local thresholding
(`reward.thresholding`; the global Otsu default loses text on busy backgrounds), one block of
text (`reward.psm=6`), and enlarging small images to a short side of `reward.min_side` px
(small glyphs are below what Tesseract reads; enlarging more than about 8x blurs them again).
Each image is one tesseract process, so a batch is read by `reward.workers` threads;
Tesseract's FAQ advises OMP_THREAD_LIMIT=1 in the environment when several run at once.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import torch
from PIL import Image
from torch import Tensor

from pcpo_hydra.images import to_pil
from pcpo_hydra.rewards.base import BaseReward
from pcpo_hydra.weights import ModelLoadError

LOG = logging.getLogger(__name__)

# Text between straight double quotes or curly double quotes. Single quotes are not read: they
# double as apostrophes ("a cat's sign"), so a span between them is ambiguous.
QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')
# Page segmentation modes that read text (0 only detects orientation, 2 is not implemented).
PSM_TEXT_MODES = (1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)
# Tesseract 5's `thresholding_method` values.
THRESHOLDING = {"otsu": 0, "leptonica_otsu": 1, "sauvola": 2}
INSTALL = (
    "install Tesseract with its {lang} data (Debian/Ubuntu: apt-get install tesseract-ocr {packages}; "
    "conda: conda install -c conda-forge tesseract; macOS: brew install tesseract tesseract-lang)"
)


def quoted_text(prompt: str) -> str:
    """The text a prompt asks to render: its double-quoted spans, joined by a space.

    Raises ValueError for a prompt without a non-empty quoted span: such a prompt gives the
    reward no target, and scoring it against the whole prompt would reward drawing the prompt.
    """
    spans = [straight or curly for straight, curly in QUOTED.findall(prompt)]
    text = " ".join(span.strip() for span in spans if span.strip())
    if not text:
        raise ValueError(
            f"reward 'ocr' needs the text to render in double quotes in every prompt, "
            f'e.g. \'a shop sign that says "OPEN"\'; got {prompt!r}'
        )
    return text


def normalise(text: str) -> str:
    """Case-folded, whitespace-free text; NFKC first, so OCR ligatures such as 'ﬁ' compare as 'fi'."""
    return "".join(unicodedata.normalize("NFKC", text).casefold().split())


def levenshtein(a: str, b: str) -> int:
    """The least number of single-character insertions, deletions and substitutions turning a into b."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def text_similarity(read: str, target: str) -> float:
    """1 - min(distance, n) / n for the normalised texts, n = len(target); 1 when the reading contains the target."""
    read, target = normalise(read), normalise(target)
    if not target:
        raise ValueError("the target text is empty after removing whitespace")
    if target in read:
        return 1.0
    return 1.0 - min(levenshtein(read, target), len(target)) / len(target)


def upscale(image: Image.Image, min_side: int) -> Image.Image:
    """The image enlarged (Lanczos, aspect kept) until its short side is at least min_side; never shrunk."""
    short = min(image.size)
    if short >= min_side:
        return image
    factor = min_side / short
    return image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.LANCZOS)


def import_pytesseract() -> ModuleType:
    """pytesseract, or an ImportError saying which extra provides it."""
    try:
        import pytesseract
    except ImportError as error:
        raise ImportError(
            "reward 'ocr' needs the Python package pytesseract: pip install 'pcpo-hydra[ocr]'"
        ) from error
    return pytesseract


class OcrReward(BaseReward):
    """Flow-GRPO's text-rendering score of what Tesseract reads against the prompt's quoted text."""

    name = "ocr"

    def __init__(
        self,
        batch_size: int = 32,
        lang: str = "eng",
        psm: int = 6,
        thresholding: str = "sauvola",
        min_side: int = 256,
        workers: int = 4,
        tesseract_cmd: str | None = None,
    ) -> None:
        super().__init__(batch_size)
        if psm not in PSM_TEXT_MODES:
            raise ValueError(f"reward.psm={psm!r}: must be one of {', '.join(map(str, PSM_TEXT_MODES))}")
        if thresholding not in THRESHOLDING:
            raise ValueError(f"reward.thresholding={thresholding!r}: must be one of {', '.join(THRESHOLDING)}")
        if workers < 1:
            raise ValueError(f"reward.workers must be positive, got {workers}")
        self.tesseract = import_pytesseract()
        self._use_engine(tesseract_cmd, lang, thresholding)
        self.lang = lang
        self.config = f"--psm {psm} -c thresholding_method={THRESHOLDING[thresholding]}"
        self.min_side = min_side
        self.workers = workers

    def _use_engine(self, tesseract_cmd: str | None, lang: str, thresholding: str) -> None:
        """Point pytesseract at the binary (a process-wide setting) once it is known to run and to know `lang`."""
        module = self.tesseract.pytesseract
        previous = module.tesseract_cmd
        module.tesseract_cmd = tesseract_cmd or previous
        try:
            check_engine(self.tesseract, lang, thresholding)
        except Exception:
            module.tesseract_cmd = previous
            raise

    def read(self, images: Tensor) -> list[str | None]:
        """What Tesseract reads in each image (None where it failed), as 8-bit RGB enlarged to min_side."""
        pages = [upscale(image, self.min_side) for image in to_pil(images)]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(pages))) as pool:
            return list(pool.map(self._read_one, pages))

    def _read_one(self, page: Image.Image) -> str | None:
        try:
            return self.tesseract.image_to_string(page, lang=self.lang, config=self.config)
        except self.tesseract.TesseractError as error:
            # One odd image must not end a long run: NaN leaves the sample out of the update.
            LOG.warning("reward 'ocr': tesseract failed on an image (%s); its reward is NaN", error)
            return None

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        targets = [quoted_text(prompt) for prompt in prompts]  # a bad prompt fails before any OCR work
        readings = self.read(images)
        scores = [float("nan") if read is None else text_similarity(read, target)
                  for read, target in zip(readings, targets)]
        return torch.tensor(scores, dtype=torch.float32)


def check_engine(tesseract: ModuleType, lang: str, thresholding: str) -> None:
    """Raise ModelLoadError unless pytesseract's binary runs and has the data for every language in `lang`."""
    cmd = tesseract.pytesseract.tesseract_cmd
    packages = " ".join(f"tesseract-ocr-{code}" for code in lang.split("+"))
    install = INSTALL.format(lang=lang, packages=packages)
    if shutil.which(cmd) is None:
        raise ModelLoadError(
            f"reward 'ocr' needs the tesseract binary; {cmd!r} is neither an executable file nor a command on PATH. "
            f"Fix: {install}, or set reward.tesseract_cmd=<path to the tesseract executable>."
        )
    try:
        version = tesseract.get_tesseract_version()
        installed = tesseract.get_languages()
    # pytesseract calls sys.exit when --version prints no version number: the binary is not tesseract.
    except (OSError, subprocess.CalledProcessError, SystemExit) as error:
        first_line = next(iter(str(error).splitlines()), "")
        raise ModelLoadError(
            f"reward 'ocr': {cmd!r} does not run as tesseract ({type(error).__name__}: {first_line}). "
            f"Fix: set reward.tesseract_cmd=<path to the tesseract executable>, or {install}."
        ) from None
    missing = [code for code in lang.split("+") if code not in installed]
    if missing:
        raise ModelLoadError(
            f"reward 'ocr': tesseract {version} at {cmd!r} has no trained data for {', '.join(missing)} "
            f"(it has: {', '.join(installed) or 'none'}). Fix: {install}, or put <lang>.traineddata into the "
            f"folder TESSDATA_PREFIX names, or set reward.lang to one it has."
        )
    if thresholding != "otsu" and version.major < 5:
        raise ValueError(
            f"reward.thresholding={thresholding!r} needs tesseract >= 5, found {version} at {cmd!r} "
            f"(older versions ignore it): set reward.thresholding=otsu or upgrade tesseract."
        )
