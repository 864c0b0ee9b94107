"""The training prompt set for self-distillation: templated instructions over many topics and tasks.

Written for this project (no outside data set, so no outside license: the project's own). It is not
Spec-Bench: Spec-Bench measures the heads, so no prompt here is taken from it. Each prompt is one
template filled with one topic (or numbers, for arithmetic); some conversations get a follow-up turn,
so the heads also see second turns. `prompt_set(n, seed)` is deterministic for a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TOPICS = (
    "photosynthesis",
    "the water cycle",
    "black holes",
    "volcanoes",
    "the Roman Empire",
    "the printing press",
    "electric cars",
    "solar panels",
    "vaccines",
    "the human heart",
    "honeybees",
    "coral reefs",
    "glaciers",
    "the stock market",
    "inflation",
    "compound interest",
    "machine learning",
    "the internet",
    "encryption",
    "recycling",
    "climate change",
    "the French Revolution",
    "ancient Egypt",
    "the Moon landing",
    "jazz music",
    "chess",
    "the Olympic Games",
    "coffee",
    "bread baking",
    "gardening",
    "time management",
    "public speaking",
    "job interviews",
    "remote work",
    "sleep",
    "meditation",
    "running a marathon",
    "learning a new language",
    "the immune system",
    "DNA",
    "earthquakes",
    "hurricanes",
    "rainforests",
    "deserts",
    "the ocean tides",
    "gravity",
    "magnets",
    "light and color",
    "sound waves",
    "the periodic table",
    "plastic pollution",
    "renewable energy",
    "nuclear power",
    "airplanes",
    "trains",
    "bicycles",
    "smartphones",
    "video games",
    "social media",
    "friendship",
    "team work",
    "leadership",
    "saving money",
    "budgeting",
    "starting a business",
    "customer service",
    "writing a resume",
    "healthy eating",
    "vitamins",
    "dinosaurs",
    "penguins",
    "elephants",
    "wolves",
    "the solar system",
    "Mars",
    "telescopes",
    "microscopes",
    "bridges",
    "skyscrapers",
    "castles",
    "pyramids",
    "libraries",
    "museums",
    "poetry",
    "novels",
    "movies",
    "photography",
    "painting",
    "origami",
    "mountains",
    "rivers",
    "islands",
    "cities",
    "villages",
    "farming",
    "fishing",
    "weather forecasts",
    "clouds",
    "rainbows",
    "snow",
    "the seasons",
    "birthdays",
    "holidays",
    "travel",
    "camping",
    "hiking",
)

TASKS = (
    "Explain {t} to a ten-year-old.",
    "Write a short paragraph about {t}.",
    "Give me five interesting facts about {t}.",
    "What are the main advantages and disadvantages of {t}?",
    "Write a short poem about {t}.",
    "Summarize the history of {t} in a few sentences.",
    "Write a short story that involves {t}.",
    "List three common misconceptions about {t} and correct them.",
    "How would you teach a beginner about {t}? Give a step-by-step plan.",
    "Write an email to a friend recommending they learn about {t}.",
    "What is {t}?",
    "Why is {t} important?",
    "Describe {t} in simple terms.",
    "Write a blog post introduction about {t}.",
    "Compare {t} and {u}.",
    "What questions should I ask an expert on {t}?",
    "Give me a quiz with three questions about {t}, with answers.",
    "Write a product description for a book about {t}.",
    "Explain how {t} affects everyday life.",
    "Write a dialogue between two people discussing {t}.",
    "Create a short lesson outline on {t}.",
    "What are some tips for someone interested in {t}?",
    "Write a haiku about {t}.",
    "Write a persuasive paragraph arguing that everyone should care about {t}.",
    "Answer briefly: who or what is most associated with {t}?",
    "Write a Python function related to {t}, with a docstring and a short explanation.",
    "Tell me a fun fact about {t} in one sentence.",
    "Rewrite this sentence to be more formal: '{t} is really cool and everybody should know about it.'",
)

MATH = (
    "If a shop sells {a} apples per day, how many apples does it sell in {b} days? Explain your answer.",
    "What is {a} multiplied by {b}? Show your steps.",
    "A train travels {a} kilometers in {b} hours. What is its average speed?",
    "Tom has {a} marbles and gives {b} to his sister. How many does he have left?",
    "Solve for x: {b}x + {a} = {c}.",
    "A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?",
    "What is {c} percent of {a}?",
    "Write a Python function that returns the sum of the first {a} even numbers, and explain it.",
)

FOLLOW_UPS = (
    "Can you make that shorter?",
    "Now explain it in more detail.",
    "Rewrite your answer as a list of bullet points.",
    "Thank you! Can you give me one more example?",
    "What would be a good title for that?",
    "Can you say that in a more formal tone?",
    "Summarize your answer in one sentence.",
    "Now write it for a professional audience.",
)


@dataclass(frozen=True)
class Conversation:
    """A first user turn and, optionally, a follow-up asked after the model's own answer."""

    first: str
    follow_up: str | None = None


def _prompt(rng: random.Random) -> str:
    if rng.random() < 0.15:
        a, b = rng.randint(2, 99), rng.randint(2, 30)
        return rng.choice(MATH).format(a=a, b=b, c=a * b + rng.randint(1, 9))
    t, u = rng.sample(TOPICS, 2)
    return rng.choice(TASKS).format(t=t, u=u)


def prompt_set(n: int, seed: int = 0, follow_up_share: float = 0.3) -> list[Conversation]:
    """`n` conversations, the same for the same seed; about `follow_up_share` of them get a second turn."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        first = _prompt(rng)
        follow = rng.choice(FOLLOW_UPS) if rng.random() < follow_up_share else None
        out.append(Conversation(first, follow))
    return out
