"""Generate the demonstration sets in this folder (deterministic: fixed seeds).

    python data/make_data.py            # rewrites data/*.jsonl

arith_{train,valid,test}.jsonl  reasoning-gym `chain_sum` (2-3 terms, 1-2 digits): exact
                          answers, scored with the task's own score_answer (see data/README.md).
                          valid is for choosing settings (alpha), test only for reporting.
spell_{train,valid,test}.jsonl  reasoning-gym `spell_backward` (words of 3-5 letters): the
                          second exact-answer task, for composing two value networks trained
                          on different tasks (no word is shared between the splits).
chat_{train,test}.jsonl   short helpful-assistant answers in the fallback chat format, built
                          here from templates and facts written by hand (no model involved).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

ARITH_TASK = "chain_sum"
ARITH_CONFIG = dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2, allow_negation=False)
ARITH_TRAIN_SEED, ARITH_TEST_SEED, ARITH_VALID_SEED = 1234, 5678, 9012
ARITH_TRAIN_SIZE, ARITH_TEST_SIZE, ARITH_VALID_SIZE = 2000, 800, 800


def gym_rows(task: str, config: dict, seed: int, size: int, keep=lambda entry: True) -> list[dict]:
    """One exact-answer row per reasoning-gym entry that `keep` accepts."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(task, seed=seed, size=size, **config)
    return [{"messages": [{"role": "user", "content": entry["question"]},
                          {"role": "assistant", "content": str(entry["answer"])}],
             "question": entry["question"],
             "answer": str(entry["answer"]),
             "metadata": entry["metadata"],
             "task": task,
             "task_config": {**config, "seed": seed, "size": size}}
            for entry in dataset if keep(entry)]


def arithmetic() -> tuple[list[dict], list[dict], list[dict]]:
    def rows(seed: int, size: int) -> list[dict]:
        return gym_rows(ARITH_TASK, ARITH_CONFIG, seed, size)

    train = rows(ARITH_TRAIN_SEED, ARITH_TRAIN_SIZE)
    seen = {r["metadata"]["expression"] for r in train}
    # The test set never repeats a training expression (several hundred items remain).
    test = [r for r in rows(ARITH_TEST_SEED, ARITH_TEST_SIZE) if r["metadata"]["expression"] not in seen]
    # Validation (added later, so train and test are unchanged): repeats neither, and is
    # where settings such as alpha are chosen, so the test split is only ever reported on.
    seen |= {r["metadata"]["expression"] for r in test}
    valid = [r for r in rows(ARITH_VALID_SEED, ARITH_VALID_SIZE) if r["metadata"]["expression"] not in seen]
    return train, valid, test


SPELL_TASK = "spell_backward"
SPELL_CONFIG = dict(min_word_len=3, max_word_len=5)
SPELL_TRAIN_SEED, SPELL_TEST_SEED, SPELL_VALID_SEED = 4321, 8765, 2109
SPELL_TRAIN_SIZE, SPELL_TEST_SIZE, SPELL_VALID_SIZE = 2000, 800, 800


def spelling() -> tuple[list[dict], list[dict], list[dict]]:
    """spell_backward rows; a word appears in one split only, and once in it (the generator
    repeats words: its list of 3-5 letter words is a few thousand long)."""
    seen: set[str] = set()

    def first_time(entry: dict) -> bool:
        word = entry["metadata"]["word"].lower()
        new = word not in seen
        seen.add(word)
        return new

    def rows(seed: int, size: int) -> list[dict]:
        return gym_rows(SPELL_TASK, SPELL_CONFIG, seed, size, keep=first_time)

    train = rows(SPELL_TRAIN_SEED, SPELL_TRAIN_SIZE)
    test = rows(SPELL_TEST_SEED, SPELL_TEST_SIZE)
    valid = rows(SPELL_VALID_SEED, SPELL_VALID_SIZE)
    return train, valid, test


# --------------------------------------------------------------------------------------
# Chat: facts written here, checked by hand; answers are complete sentences.

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa",
    "Australia": "Canberra", "Brazil": "Brasília", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Russia": "Moscow", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Greece": "Athens",
    "Turkey": "Ankara", "Ireland": "Dublin", "Austria": "Vienna", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Switzerland": "Bern", "South Korea": "Seoul", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogotá", "Cuba": "Havana",
    "Hungary": "Budapest", "Czechia": "Prague", "Iceland": "Reykjavík", "New Zealand": "Wellington",
    "the United Kingdom": "London", "the United States": "Washington, D.C.", "Nigeria": "Abuja",
    "Morocco": "Rabat", "Indonesia": "Jakarta", "Philippines": "Manila", "Ukraine": "Kyiv",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "up": "down", "open": "closed",
    "light": "dark", "old": "young", "early": "late", "full": "empty", "strong": "weak",
    "hard": "soft", "high": "low", "rich": "poor", "wet": "dry", "loud": "quiet", "near": "far",
    "long": "short", "thick": "thin", "true": "false", "win": "lose", "begin": "end",
}
ANIMAL_SOUNDS = {"dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "sheep": "bleats",
                 "lion": "roars", "horse": "neighs", "pig": "oinks", "owl": "hoots", "snake": "hisses",
                 "frog": "croaks", "bee": "buzzes"}
COLOURS = {"the sky on a clear day": "blue", "grass": "green", "snow": "white", "a ripe banana": "yellow",
           "a ripe tomato": "red", "coal": "black", "an orange": "orange", "a carrot": "orange",
           "milk": "white", "a lemon": "yellow", "chocolate": "brown", "a strawberry": "red"}
FACTS = [
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many months are in a year?", "There are 12 months in a year."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("How many seconds are in a minute?", "There are 60 seconds in a minute."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
    ("How many legs does an insect have?", "An insect has 6 legs."),
    ("How many continents are there?", "There are 7 continents."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("What do bees make?", "Bees make honey."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
    ("What gas do we need to breathe?", "We need oxygen to breathe."),
    ("At what temperature does water freeze in Celsius?", "Water freezes at 0 degrees Celsius."),
    ("At what temperature does water boil at sea level in Celsius?", "Water boils at 100 degrees Celsius at sea level."),
    ("What is H2O?", "H2O is the chemical formula of water."),
    ("How many sides does a triangle have?", "A triangle has 3 sides."),
    ("How many sides does a square have?", "A square has 4 sides."),
    ("How many sides does a hexagon have?", "A hexagon has 6 sides."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 degrees Fahrenheit."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain in the world."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("What language is spoken in Brazil?", "Portuguese is the main language spoken in Brazil."),
    ("What is the main language of Mexico?", "Spanish is the main language of Mexico."),
    ("How many players are on a soccer team on the field?", "A soccer team has 11 players on the field."),
    ("What is the opposite of north?", "The opposite of north is south."),
    ("What is the opposite of east?", "The opposite of east is west."),
    ("How many cents are in a dollar?", "There are 100 cents in a dollar."),
    ("How many centimeters are in a meter?", "There are 100 centimeters in a meter."),
    ("How many grams are in a kilogram?", "There are 1000 grams in a kilogram."),
    ("How many meters are in a kilometer?", "There are 1000 meters in a kilometer."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("What organ pumps blood through the body?", "The heart pumps blood through the body."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths."),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth."),
    ("What is the natural satellite of Earth called?", "Earth's natural satellite is the Moon."),
    ("How many strings does a standard guitar have?", "A standard guitar has 6 strings."),
]
GREETINGS = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! What can I do for you?"),
    ("Good morning!", "Good morning! How can I help you?"),
    ("Thank you!", "You're welcome! Let me know if you need anything else."),
    ("Thanks for your help.", "You're welcome! I'm glad I could help."),
    ("Who are you?", "I am a helpful assistant. I answer questions as clearly as I can."),
    ("What can you do?", "I can answer questions, explain ideas and help with simple tasks."),
    ("Goodbye!", "Goodbye! Have a great day."),
    ("How are you?", "I'm doing well, thank you. How can I help you today?"),
    ("Can you help me?", "Of course. What do you need help with?"),
]
WORDS = ["apple", "river", "garden", "window", "planet", "music", "yellow", "pencil", "summer", "rabbit",
         "castle", "bridge", "orange", "forest", "candle", "mirror", "dragon", "button", "silver", "market"]


def _number_word(n: int) -> str:
    return ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"][n]


def chat_pairs() -> list[tuple[str, str, str]]:
    """(group, question, answer); group keeps a fact's variants on one side of the split."""
    pairs = []
    for country, city in CAPITALS.items():
        g = f"capital:{country}"
        pairs.append((g, f"What is the capital of {country}?", f"The capital of {country} is {city}."))
        pairs.append((g, f"Which city is the capital of {country}?", f"{city} is the capital of {country}."))
    for word, opposite in OPPOSITES.items():
        g = f"opposite:{word}"
        pairs.append((g, f"What is the opposite of \"{word}\"?", f"The opposite of \"{word}\" is \"{opposite}\"."))
        pairs.append((g, f"Give me a word that means the opposite of {word}.", f"A word that means the opposite of {word} is {opposite}."))
    for animal, sound in ANIMAL_SOUNDS.items():
        g = f"sound:{animal}"
        pairs.append((g, f"What sound does a {animal} make?", f"A {animal} {sound}."))
    for thing, colour in COLOURS.items():
        g = f"colour:{thing}"
        pairs.append((g, f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}."))
    for q, a in FACTS + GREETINGS:
        pairs.append((f"fact:{q}", q, a))
    for word in WORDS:
        g = f"word:{word}"
        pairs.append((g, f"How many letters are in the word \"{word}\"?",
                      f"The word \"{word}\" has {len(word)} letters."))
        pairs.append((g, f"Spell \"{word}\" backwards.", f"\"{word}\" spelled backwards is \"{word[::-1]}\"."))
        pairs.append((g, f"What is the first letter of \"{word}\"?", f"The first letter of \"{word}\" is \"{word[0]}\"."))
    rng = random.Random(7)
    for _ in range(60):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        pairs.append((f"add:{a}+{b}", f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    for _ in range(40):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        pairs.append((f"mul:{a}*{b}", f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
    for n in range(1, 10):
        pairs.append((f"word:{n}", f"How do you write the number {n} in words?",
                      f"The number {n} is written \"{_number_word(n)}\"."))
    return pairs


def chat() -> tuple[list[dict], list[dict]]:
    pairs = chat_pairs()
    groups = sorted({g for g, _, _ in pairs})
    random.Random(42).shuffle(groups)
    test_groups = set(groups[: len(groups) // 10])     # ~10 % of facts held out entirely
    train, test = [], []
    for g, q, a in pairs:
        row = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
               "group": g, "source": "data/make_data.py templates + hand-written facts"}
        (test if g in test_groups else train).append(row)
    random.Random(43).shuffle(train)
    return train, test


def write(name: str, rows: list[dict]) -> None:
    with open(HERE / name, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{name}: {len(rows)} rows")


def main() -> None:
    train, valid, test = arithmetic()
    write("arith_train.jsonl", train)
    write("arith_valid.jsonl", valid)
    write("arith_test.jsonl", test)
    train, valid, test = spelling()
    write("spell_train.jsonl", train)
    write("spell_valid.jsonl", valid)
    write("spell_test.jsonl", test)
    train, test = chat()
    write("chat_train.jsonl", train)
    write("chat_test.jsonl", test)


if __name__ == "__main__":
    main()
