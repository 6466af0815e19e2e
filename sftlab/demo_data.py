"""The embedded demo data set: short instruction tasks with exact-match checkable answers, written by this
project (no external data), generated deterministically from a seed.

Every family draws its inputs from a seeded `random.Random` (one per family, so adding a family does not
change the others), phrases the instruction with one of several templates (instruction tuning, not one
prompt) and computes the answer. An example is a messages record:

    {"task": "add", "messages": [{"role": "user", ...}, {"role": "assistant", "content": "68"}],
     "reference": "68"}

Splits: `train` (the training families), `heldout_instances` (unseen inputs of the training families)
and `heldout_tasks` (whole families never seen in training). Inputs are never repeated within a family,
so no held-out instance is a rephrased training example. Answers are scored with
`sftlab.evaluate.metrics.exact_match` (lowercase, punctuation and extra whitespace ignored).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .evaluate.metrics import exact_match

# ---- word lists ----------------------------------------------------------------------------------------------
NOUNS = ("apple", "river", "chair", "tiger", "lemon", "cloud", "piano", "stone", "garden", "candle", "rocket",
         "window", "pencil", "forest", "bottle", "island", "mirror", "basket", "jacket", "turtle", "violin",
         "onion", "camera", "ladder", "button", "castle", "dragon", "feather", "hammer", "kitten", "monkey",
         "orange", "pillow", "rabbit", "saddle", "tomato", "wallet", "anchor", "banana", "cherry", "dolphin",
         "engine", "falcon", "guitar", "helmet", "igloo", "jungle", "kettle", "lizard", "magnet", "needle",
         "octopus", "parrot", "quilt", "ribbon", "spider", "tunnel", "umbrella", "valley", "wizard", "zebra",
         "bread", "crown", "desk", "eagle", "flute", "grape", "horse", "jelly", "koala", "mango", "nest")
ADJECTIVES = ("red", "small", "quiet", "happy", "old", "bright", "soft", "heavy", "brave", "green", "tiny",
              "lazy", "warm", "shiny", "wild", "calm", "blue", "round", "sharp", "funny")
VERBS = ("sees", "likes", "finds", "moves", "holds", "paints", "wants", "opens", "follows", "carries",
         "draws", "cleans", "watches", "buys", "hides")
FIRST_NAMES = ("Anna", "Ben", "Clara", "David", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas", "Kara",
               "Liam", "Maya", "Noah", "Olga", "Pablo", "Rosa", "Sam", "Tara", "Victor", "Wendy", "Yusuf",
               "Zoe", "Omar", "Lena", "Marco", "Nina", "Oscar", "Priya", "Quinn")
LAST_NAMES = ("Smith", "Garcia", "Novak", "Okafor", "Larsen", "Tanaka", "Weber", "Rossi", "Silva", "Moreau",
              "Kowalski", "Haddad", "Berg", "Fischer", "Jensen", "Costa", "Dubois", "Meyer", "Nakamura",
              "Petrov", "Quispe", "Ramos", "Schmidt", "Turner", "Vargas", "Walsh", "Young", "Zimmer", "Ito",
              "Lopez")
ANTONYMS = (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
            ("up", "down"), ("early", "late"), ("open", "closed"), ("full", "empty"), ("hard", "soft"),
            ("high", "low"), ("young", "old"), ("rich", "poor"), ("strong", "weak"), ("wet", "dry"),
            ("loud", "quiet"), ("long", "short"), ("thick", "thin"), ("clean", "dirty"), ("win", "lose"),
            ("push", "pull"), ("buy", "sell"), ("first", "last"), ("inside", "outside"), ("day", "night"),
            ("true", "false"), ("near", "far"), ("cheap", "expensive"), ("safe", "dangerous"),
            ("begin", "end"), ("give", "take"), ("left", "right"), ("above", "below"), ("love", "hate"),
            ("sweet", "sour"), ("wide", "narrow"), ("arrive", "leave"), ("remember", "forget"), ("accept", "refuse"),
            ("more", "less"), ("always", "never"), ("north", "south"), ("east", "west"), ("before", "after"),
            ("friend", "enemy"), ("increase", "decrease"), ("rough", "smooth"), ("deep", "shallow"),
            ("awake", "asleep"))
POSITIVE = ("great", "wonderful", "excellent", "lovely", "fantastic", "delightful", "superb", "amazing")
NEGATIVE = ("terrible", "awful", "horrible", "disappointing", "dreadful", "poor", "boring", "useless")
REVIEW_ITEMS = ("the hotel room", "this phone", "the pasta", "the concert", "this book", "the service",
                "the new sofa", "this movie", "the coffee", "the bike tour", "this game", "the headphones")
REVIEW_TAILS_POS = ("I would happily come back.", "I recommend it to everyone.", "Worth every penny.",
                    "It made my day.", "I will buy it again.")
REVIEW_TAILS_NEG = ("I want my money back.", "I will never order it again.", "Do not waste your time.",
                    "It ruined my evening.", "I regret buying it.")
FRUITS = ("apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "pear", "peach", "plum", "kiwi",
          "melon", "apricot", "lime", "papaya", "fig", "raspberry", "strawberry", "blueberry", "coconut",
          "pineapple", "guava", "lychee", "nectarine", "tangerine", "grapefruit", "pomegranate", "avocado",
          "quince", "persimmon", "blackberry")
ANIMALS = ("tiger", "horse", "rabbit", "zebra", "eagle", "koala", "monkey", "turtle", "lizard", "parrot",
           "falcon", "dolphin", "otter", "camel", "wolf", "goat", "giraffe", "elephant", "penguin", "badger",
           "beaver", "hamster", "leopard", "moose", "panda", "squirrel", "hedgehog", "llama", "ostrich",
           "raccoon", "walrus")
DOMAINS = ("example.com", "mail.org", "lab.net", "school.edu", "shop.io", "city.gov", "news.co", "farm.org")


@dataclass(frozen=True)
class Family:
    """One task family: `make(rng) -> (key, user_prompt, answer)`; key identifies the input (dedup)."""

    name: str
    make: Callable[[random.Random], tuple[tuple, str, str]]
    description: str


ADVERBS = ("today", "again", "slowly", "quickly", "often", "outside", "now", "twice")


def _sentence(rng: random.Random, n_words: int, name_subject: bool = False) -> str:
    """A simple sentence of exactly `n_words` words (2..8; 2..6 with a name as subject): subject, verb,
    optional object and adverb."""
    for _ in range(10_000):
        adj = [rng.choice(ADJECTIVES)] if rng.random() < 0.5 else []
        subject = [rng.choice(FIRST_NAMES)] if name_subject else ["the", *adj, rng.choice(NOUNS)]
        obj = ["the", *([rng.choice(ADJECTIVES)] if rng.random() < 0.5 else []),
               rng.choice(NOUNS)] if rng.random() < 0.8 else []
        adverb = [rng.choice(ADVERBS)] if rng.random() < 0.4 else []
        words = subject + [rng.choice(VERBS)] + obj + adverb
        if len(words) == n_words:
            words[0] = words[0][0].upper() + words[0][1:]
            return " ".join(words)
    raise ValueError(f"no sentence of {n_words} words")


# ---- families ------------------------------------------------------------------------------------------------
def add(rng):
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    t = rng.choice(("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
                    "Calculate the sum of {a} and {b}.", "{a} + {b} = ?", "What do you get when you add {b} to {a}?"))
    return (a, b), t.format(a=a, b=b), str(a + b)


def subtract(rng):
    a = rng.randint(10, 90)
    b = rng.randint(1, a - 1)
    t = rng.choice(("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.",
                    "Calculate the difference {a} - {b}.", "{a} - {b} = ?",
                    "What is left if you take {b} away from {a}?"))
    return (a, b), t.format(a=a, b=b), str(a - b)


def larger(rng):
    a, b = rng.sample(range(1, 1000), 2)
    t = rng.choice(("Which number is larger: {a} or {b}?", "Which is bigger, {a} or {b}?",
                    "Give the larger of {a} and {b}.", "Of the numbers {a} and {b}, which is greater?",
                    "Return the maximum of {a} and {b}."))
    return (a, b), t.format(a=a, b=b), str(max(a, b))


def count_words(rng):
    s = _sentence(rng, rng.randint(3, 8))
    t = rng.choice(('How many words are in this sentence: "{s}"?', 'Count the words in "{s}".',
                    'Sentence: {s}\nHow many words does it have?', 'What is the number of words in "{s}"?'))
    return (s,), t.format(s=s), str(len(s.split()))


def first_word(rng):
    named = rng.random() < 0.5
    s = _sentence(rng, rng.randint(3, 6 if named else 8), name_subject=named)
    t = rng.choice(('What is the first word of "{s}"?', 'Give the first word in this sentence: {s}',
                    'Sentence: {s}\nWhich word comes first?', 'Return the opening word of "{s}".'))
    return (s,), t.format(s=s), s.split()[0]


def last_word(rng):
    s = _sentence(rng, rng.randint(3, 8))
    t = rng.choice(('What is the last word of "{s}"?', 'Give the final word in this sentence: {s}',
                    'Sentence: {s}\nWhich word comes last?', 'Return the closing word of "{s}".'))
    return (s,), t.format(s=s), s.split()[-1]


def sort_words(rng):
    words = rng.sample(NOUNS, 3)
    shown = ", ".join(words)
    t = rng.choice(("Sort these words alphabetically: {w}", "Put in alphabetical order: {w}",
                    "Arrange the words {w} from A to Z.", "Alphabetize: {w}"))
    return tuple(words), t.format(w=shown), ", ".join(sorted(words))


def sentiment(rng):
    positive = rng.random() < 0.5
    item = rng.choice(REVIEW_ITEMS)
    adj = rng.choice(POSITIVE if positive else NEGATIVE)
    tail = rng.choice(REVIEW_TAILS_POS if positive else REVIEW_TAILS_NEG)
    review = f"{item[0].upper()}{item[1:]} was {adj}. {tail}"
    t = rng.choice(('Review: "{r}"\nIs this review positive or negative?',
                    'Classify the sentiment of this review as positive or negative: {r}',
                    '"{r}" Is the sentiment positive or negative?', 'What is the sentiment (positive/negative)? {r}'))
    return (review,), t.format(r=review), "positive" if positive else "negative"


def antonym(rng):
    pair = rng.choice(ANTONYMS)
    w, a = pair if rng.random() < 0.5 else pair[::-1]
    t = rng.choice(('What is the opposite of "{w}"?', 'Give an antonym of "{w}".', 'Opposite of {w}:',
                    'Name the word that means the opposite of "{w}".'))
    return frozenset(pair), t.format(w=w), a  # a held-out pair is new in both directions


def date_format(rng):
    y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    t = rng.choice(("Convert the date {iso} to DD/MM/YYYY format.", "Rewrite {iso} as day/month/year (DD/MM/YYYY).",
                    "Date: {iso}. Write it in DD/MM/YYYY format.", "Express {iso} in the DD/MM/YYYY style."))
    return (y, m, d), t.format(iso=f"{y:04d}-{m:02d}-{d:02d}"), f"{d:02d}/{m:02d}/{y:04d}"


def parity(rng):
    n = rng.randint(1, 999)
    ask_even = rng.random() < 0.5
    t = rng.choice(("Is {n} an {kind} number? Answer yes or no.", "{n}: is it {kind}? Reply yes or no.",
                    "Answer yes or no: is {n} {kind}?", "Tell me whether {n} is {kind} (yes/no)."))
    kind = "even" if ask_even else "odd"
    return (n, kind), t.format(n=n, kind=kind), "yes" if (n % 2 == 0) == ask_even else "no"


def name_format(rng):
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    t = rng.choice(('Write the name "{f} {l}" in the form "Last, First".', 'Reformat {f} {l} as Last, First.',
                    'Name: {f} {l}\nRewrite it as surname, given name.', 'Put "{f} {l}" in "Last, First" order.'))
    return (first, last), t.format(f=first, l=last), f"{last}, {first}"


def repeat_word(rng):
    w, k = rng.choice(NOUNS), rng.randint(2, 4)
    t = rng.choice(('Repeat the word "{w}" {k} times, separated by spaces.', 'Write "{w}" {k} times.',
                    'Say {w} exactly {k} times.', 'Output the word {w} repeated {k} times.'))
    return (w, k), t.format(w=w, k=k), " ".join([w] * k)


def email_domain(rng):
    user = f"{rng.choice(FIRST_NAMES).lower()}.{rng.choice(LAST_NAMES).lower()}"
    domain = rng.choice(DOMAINS)
    t = rng.choice(("What is the domain of the email address {e}?", "Extract the domain from {e}.",
                    "Email: {e}\nWhich domain does it belong to?", "Give the part after the @ in {e}."))
    return (user, domain), t.format(e=f"{user}@{domain}"), domain


def fruit_or_animal(rng):
    is_fruit = rng.random() < 0.5
    w = rng.choice(FRUITS if is_fruit else ANIMALS)
    t = rng.choice(('Is a {w} a fruit or an animal?', 'Classify "{w}" as fruit or animal.',
                    'Fruit or animal: {w}?', 'Which category does "{w}" belong to, fruit or animal?'))
    return (w,), t.format(w=w), "fruit" if is_fruit else "animal"


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("add", add, "sum of two numbers"),
    Family("subtract", subtract, "difference of two numbers"),
    Family("larger", larger, "the larger of two numbers"),
    Family("count_words", count_words, "number of words in a sentence"),
    Family("first_word", first_word, "first word of a sentence"),
    Family("last_word", last_word, "last word of a sentence"),
    Family("sort_words", sort_words, "three words in alphabetical order"),
    Family("sentiment", sentiment, "positive/negative label of a short review"),
    Family("antonym", antonym, "opposite of a word"),
    Family("date_format", date_format, "YYYY-MM-DD to DD/MM/YYYY"),
    Family("parity", parity, "yes/no: is a number even/odd"),
    Family("name_format", name_format, "First Last to Last, First"),
    Family("repeat_word", repeat_word, "a word repeated k times"),
    Family("email_domain", email_domain, "domain of an email address"),
    Family("fruit_or_animal", fruit_or_animal, "fruit/animal label of a word"),
)}
# Held out: families whose content the base model often already gets right inside a long reply (last word,
# fruit/animal label) or that are a near neighbour of a training family (subtract ~ add), so the held-out
# score measures whether "answer briefly and exactly" transfers to unseen tasks.
HELDOUT_TASKS = ("last_word", "subtract", "fruit_or_animal")
TRAIN_TASKS = tuple(n for n in FAMILIES if n not in HELDOUT_TASKS)
SPLITS = ("train", "heldout_instances", "heldout_tasks")


def record(task: str, prompt: str, answer: str) -> dict:
    return {"task": task, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "reference": answer}


def sample_family(name: str, n: int, seed: int = 0, exclude: set | None = None) -> list[dict]:
    """`n` examples of one family with distinct inputs (and none of the input keys in `exclude`)."""
    rng = random.Random(f"sftlab-demo:{seed}:{name}")  # str seeds are hashed with SHA-512: stable everywhere
    seen = set(exclude or ())
    out = []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        key, prompt, answer = FAMILIES[name].make(rng)
        if key in seen:
            continue
        seen.add(key)
        out.append(record(name, prompt, answer))
    raise ValueError(f"demo family {name!r} has fewer than {n} distinct inputs")


def build_demo_data(seed: int = 0, n_train: int = 32, n_heldout: int = 8, n_heldout_task: int = 16,
                    heldout_tasks: tuple[str, ...] = HELDOUT_TASKS) -> dict[str, list[dict]]:
    """The demo splits. Per training family: `n_train` train + `n_heldout` held-out instances (inputs
    never in train); per held-out family: `n_heldout_task` examples. Records are shuffled per split."""
    unknown = set(heldout_tasks) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown demo families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for name in FAMILIES:
        if name in heldout_tasks:
            splits["heldout_tasks"] += sample_family(name, n_heldout_task, seed)
        else:
            both = sample_family(name, n_train + n_heldout, seed)
            splits["train"] += both[:n_train]
            splits["heldout_instances"] += both[n_train:]
    rng = random.Random(f"sftlab-demo:{seed}:shuffle")
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def check(generation: str, rec: dict) -> bool:
    """Whether a generation answers a demo record (normalised exact match with its reference)."""
    return exact_match(generation, rec["reference"])


# ---- general-knowledge probe ----------------------------------------------------------------------------------
# What the demo measures forgetting with: common facts the base model may know, unrelated to the demo's task
# families, each with three wrong options of the same kind. `sftlab eval` ranks the four options by mean NLL
# (`choice_accuracy`), which a change of answer style cannot move alone (docs/eval.md).
GENERAL_FACTS = (
    ("What is the capital of France?", "Paris", ("Berlin", "Madrid", "Rome")),
    ("What is the capital of Japan?", "Tokyo", ("Beijing", "Seoul", "Bangkok")),
    ("How many legs does a spider have?", "eight", ("six", "four", "ten")),
    ("Which planet is closest to the sun?", "Mercury", ("Venus", "Mars", "Jupiter")),
    ("What do bees make?", "honey", ("milk", "silk", "bread")),
    ("What is frozen water called?", "ice", ("steam", "sand", "glass")),
    ("How many days are in a week?", "seven", ("five", "six", "ten")),
    ("Which animal is known as the king of the jungle?", "the lion", ("the tiger", "the elephant", "the wolf")),
    ("What is the largest ocean on Earth?", "the Pacific Ocean", ("the Atlantic Ocean", "the Indian Ocean",
                                                                 "the Arctic Ocean")),
    ("Which gas do plants take in from the air to make food?", "carbon dioxide", ("oxygen", "nitrogen", "helium")),
    ("At how many degrees Celsius does water boil at sea level?", "100", ("50", "0", "212")),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", ("Charles Dickens", "Leo Tolstoy", "Mark Twain")),
    ("What is the capital of Italy?", "Rome", ("Milan", "Paris", "Athens")),
    ("How many continents are there?", "seven", ("five", "six", "nine")),
    ("What is the chemical symbol for gold?", "Au", ("Ag", "Fe", "Pb")),
    ("Which organ pumps blood through the body?", "the heart", ("the lungs", "the liver", "the brain")),
    ("What is the largest planet in the solar system?", "Jupiter", ("Saturn", "Earth", "Neptune")),
    ("What is the capital of Spain?", "Madrid", ("Lisbon", "Barcelona", "Rome")),
    ("How many hours are in a day?", "24", ("12", "20", "48")),
    ("Which metal is liquid at room temperature?", "mercury", ("iron", "copper", "silver")),
    ("What is the capital of Germany?", "Berlin", ("Munich", "Vienna", "Paris")),
    ("What does a caterpillar turn into?", "a butterfly", ("a spider", "a beetle", "a bee")),
    ("What is the hardest natural material?", "diamond", ("gold", "iron", "glass")),
    ("Which country is home to the kangaroo?", "Australia", ("Brazil", "India", "Canada")),
    ("How many sides does a triangle have?", "three", ("four", "five", "two")),
    ("What is the capital of Egypt?", "Cairo", ("Nairobi", "Tunis", "Riyadh")),
    ("Which language is mainly spoken in Brazil?", "Portuguese", ("Spanish", "French", "English")),
    ("What is the main ingredient of guacamole?", "avocado", ("tomato", "potato", "banana")),
    ("What is the tallest animal on land?", "the giraffe", ("the elephant", "the camel", "the horse")),
    ("On which continent is Kenya?", "Africa", ("Asia", "Europe", "South America")),
    ("What is H2O commonly called?", "water", ("salt", "air", "sugar")),
    ("How many minutes are in an hour?", "sixty", ("thirty", "one hundred", "twenty")),
    ("What is the capital of Canada?", "Ottawa", ("Toronto", "Vancouver", "Montreal")),
    ("Which instrument has black and white keys?", "the piano", ("the guitar", "the violin", "the drum")),
    ("Which star is closest to Earth?", "the Sun", ("Sirius", "Polaris", "Vega")),
    ("Which bird is a symbol of peace?", "the dove", ("the crow", "the eagle", "the owl")),
    ("At how many degrees Celsius does water freeze?", "0", ("10", "100", "-10")),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", ("Pablo Picasso", "Vincent van Gogh", "Rembrandt")),
    ("What do cows drink?", "water", ("milk", "juice", "coffee")),
    ("Which season comes after winter?", "spring", ("summer", "autumn", "fall")),
)


ARITHMETIC = 160  # questions of small-number arithmetic added to the facts (`arithmetic_questions`)


def arithmetic_questions(n: int = ARITHMETIC) -> list[tuple[str, str, tuple[str, str, str]]]:
    """`n` distinct small-number questions (addition, subtraction, multiplication; operands 2-12, results >= 0),
    each with three wrong numbers near the right one (±1, ±2, ±10 where >= 0): the same form as the answer, so
    only the arithmetic tells them apart. A fixed, seed-independent list."""
    rng = random.Random("sftlab-demo:arithmetic")
    ops = (("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b))
    out, seen = [], set()
    while len(out) < n:
        (word, f), a, b = rng.choice(ops), rng.randint(2, 12), rng.randint(2, 12)
        if word == "minus" and a < b:
            a, b = b, a
        if (word, a, b) in seen:
            continue
        seen.add((word, a, b))
        right = f(a, b)
        near = [x for x in (right + 1, right - 1, right + 2, right - 2, right + 10) if x >= 0]
        wrong = tuple(str(x) for x in rng.sample(near, 3))
        out.append((f"What is {a} {word} {b}?", str(right), wrong))
    return out


def general_probe(seed: int = 0) -> list[dict]:
    """The general-knowledge probe as QA records {"question", "answer", "choices"} (options in a seeded order):
    `GENERAL_FACTS` and `arithmetic_questions()`, 200 questions."""
    rng = random.Random(f"sftlab-demo:{seed}:general")
    out = []
    for question, answer, wrong in (*GENERAL_FACTS, *arithmetic_questions()):
        choices = [answer, *wrong]
        rng.shuffle(choices)
        out.append({"question": question, "answer": answer, "choices": choices})
    return out


def write_demo_data(out_dir: str | Path, seed: int = 0, **kwargs) -> dict[str, Path]:
    """Write `train.jsonl`, `heldout_instances.jsonl`, `heldout_tasks.jsonl` and the general-knowledge probe
    `general.jsonl` under `out_dir` (atomically)."""
    from .io import atomic_write

    out_dir = Path(out_dir)
    paths = {}
    for split, rows in [*build_demo_data(seed, **kwargs).items(), ("general", general_probe(seed))]:
        paths[split] = out_dir / f"{split}.jsonl"
        with atomic_write(paths[split]) as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return paths
