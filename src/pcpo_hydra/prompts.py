"""Prompt sets: the text conditions a run draws its rollout prompts from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    """One prompt per non-empty line of a text file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"prompts.path={path!r}: no such file (one prompt per line expected)")
    lines = (line.strip() for line in file.read_text(encoding="utf-8").splitlines())
    return PromptSet(file.stem, tuple(line for line in lines if line))
