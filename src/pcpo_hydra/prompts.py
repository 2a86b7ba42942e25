"""Prompt sets: the text conditions a run draws its rollout prompts from."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from pcpo_hydra.config.registry import register

# Common animal nouns, the DDPO-style `simple_animals` set.
ANIMALS: tuple[str, ...] = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep",
    "deer", "cow", "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf",
    "lizard", "beetle", "ant", "butterfly", "fish", "shark", "whale", "dolphin",
    "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck",
    "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla",
    "hedgehog", "kangaroo",
)


@dataclass(frozen=True)
class PromptSet:
    """An ordered, non-empty list of prompts; the trainer samples from it by index."""

    name: str
    prompts: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError(f"prompt set {self.name!r} is empty")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> str:
        return self.prompts[index]


def simple_animals() -> PromptSet:
    """One prompt per animal noun (45 prompts)."""
    return PromptSet("simple_animals", ANIMALS)


def activities(activities: list[str]) -> PromptSet:
    """Every animal doing every activity: 'a cat riding a bike', ..."""
    prompts = tuple(f"a {animal} {activity}" for animal in ANIMALS for activity in activities)
    return PromptSet("activities", prompts)


def from_list(name: str, prompts: list[str]) -> PromptSet:
    """A prompt set written out in the config itself."""
    return PromptSet(name, tuple(prompts))


def from_file(path: str) -> PromptSet:
    """One prompt per non-empty line of a UTF-8 text file."""
    problem = prompt_file_problem(path)
    if problem:
        raise ValueError(f"prompts.path={path!r}: {problem}")
    file = Path(path).expanduser()
    return PromptSet(file.stem, _lines(file.read_bytes()))



def split_holdout(prompts: PromptSet, count: int) -> tuple[PromptSet, PromptSet]:
    """(training set, held-out set): `count` evenly spaced prompts (indices k * (len // count)) carved off.

    The same prompt set always gives the same split, so training and its evaluation (and a
    resumed run) agree on it. At least one prompt must stay for training.
    """
    if not 1 <= count < len(prompts):
        raise ValueError(f"eval.holdout={count}: must be between 1 and {len(prompts) - 1} "
                         f"for the {len(prompts)} prompts of {prompts.name!r}; lower eval.holdout")
    step = len(prompts) // count
    held = {k * step for k in range(count)}
    return (PromptSet(prompts.name, tuple(p for k, p in enumerate(prompts.prompts) if k not in held)),
            PromptSet(f"{prompts.name}_holdout", tuple(prompts[k] for k in sorted(held))))


PROMPT_FILE_FIX = "give a UTF-8 text file with one prompt per line"


def prompt_file_problem(path: str) -> str | None:
    """What keeps `path` from giving prompts (missing, unreadable, binary, empty), with the fix; None if nothing.

    Checked at validation, so a bad file fails before the model is built; a binary file is
    reported by the offset of its first bad byte, never by dumping its contents.
    """
    try:
        data = Path(path).expanduser().read_bytes()
    except FileNotFoundError:
        return f"no such file; {PROMPT_FILE_FIX}"
    except IsADirectoryError:
        return f"is a directory; {PROMPT_FILE_FIX}"
    except OSError as error:
        return f"cannot be read ({error.strerror}); {PROMPT_FILE_FIX}"
    nul = data.find(b"\0")
    if nul >= 0:
        return f"is binary (a NUL byte at offset {nul}); {PROMPT_FILE_FIX}"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); {PROMPT_FILE_FIX}"
    if not data:
        return f"is empty; {PROMPT_FILE_FIX}"
    if not _lines(data):
        return f"holds only whitespace, no prompt; {PROMPT_FILE_FIX}"
    return None


def _lines(data: bytes) -> tuple[str, ...]:
    """The stripped non-empty lines of UTF-8 text."""
    return tuple(line.strip() for line in data.decode("utf-8").splitlines() if line.strip())


# What each prompts option takes (conf/prompts/*.yaml), checked before any model is built.


@register("prompts")
@dataclass
class SimpleAnimalsSchema:
    _target_: str = "pcpo_hydra.prompts.simple_animals"


@register("prompts")
@dataclass
class ActivitiesSchema:
    _target_: str = "pcpo_hydra.prompts.activities"
    activities: list[str] = MISSING


@register("prompts")
@dataclass
class PromptListSchema:
    _target_: str = "pcpo_hydra.prompts.from_list"
    name: str = MISSING
    prompts: list[str] = MISSING


@register("prompts")
@dataclass
class PromptFileSchema:
    _target_: str = "pcpo_hydra.prompts.from_file"
    path: str = MISSING

    def relations(self, prefix: str) -> Iterator[str]:
        """The file must give prompts: found now, not after the model is built."""
        problem = prompt_file_problem(self.path)
        if problem:
            yield f"{prefix}.path={self.path!r}: {problem}"
