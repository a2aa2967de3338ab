"""RULER-style retrieval tasks, generated offline and deterministically.

The tasks of NVIDIA's RULER (Hsieh et al., arXiv 2404.06654; its generators in
``scripts/data/synthetic/``), written again here for llama.cpp token ids: a
haystack (the Paul Graham essays, Austen, or RULER's repeated "noise"
sentences) of a target length in tokens, facts ("needles") placed at given
depths, and one or more questions whose answer prefix the model completes.
Scoring is RULER's ``string_match_all``: the share of expected values that
appear in the output (a sample is *found* when all of them do).

Tasks (``TASKS``):

* ``niah_number`` / ``niah_word`` / ``niah_uuid``: one needle "One of the
  special magic numbers for {key} is: {value}." (RULER's niah_single);
* ``niah_multikey``: the needle plus three distractor needles with other keys;
* ``niah_multivalue``: four values for the same key, all asked for;
* ``niah_multiquery``: four keys, all asked for in one question;
* ``vt``: variable tracking, a chain ``VAR A = 12345``, ``VAR B = VAR A`` ...
  in noise; every name of the chain is asked for;
* ``cwe``: common words extraction from a numbered word list;
* ``multiturn``: three needles, asked one per turn, each turn after the
  previous answer (a chat reusing one compressed cache; KVzip, SCBench).

Every sample is a function of (task, length, index, seed) and the tokenizer
only, so two engines (llama.cpp, kvpress) see the same token ids
(:func:`sample_tokens`).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["Question", "Sample", "TASKS", "NEEDLE_TASKS", "make_sample", "score_output", "NOISE",
           "sample_tokens"]

#: RULER's filler when no text is given: the same five sentences over and over
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_ADJECTIVES = (
    "amber", "ancient", "bitter", "bold", "brave", "bright", "broad", "calm", "clever", "cold",
    "crimson", "curious", "dark", "deep", "dusty", "eager", "early", "faint", "fancy", "fierce",
    "gentle", "giant", "golden", "grand", "green", "hidden", "hollow", "humble", "icy", "jolly",
    "keen", "late", "lazy", "little", "lively", "lonely", "loud", "lucky", "misty", "modern",
    "narrow", "noble", "odd", "pale", "plain", "polite", "proud", "quiet", "rapid", "rare",
    "rough", "royal", "rusty", "sandy", "shiny", "silent", "silver", "simple", "sleepy", "smooth",
    "solid", "steady", "stormy", "sunny", "swift", "tall", "tender", "tiny", "velvet", "vivid",
    "warm", "wild", "windy", "wise", "young", "zesty",
)
_NOUNS = (
    "anchor", "apple", "arrow", "badger", "basket", "beacon", "bridge", "candle", "canyon", "castle",
    "cedar", "comet", "copper", "cottage", "crystal", "desert", "dragon", "eagle", "ember", "falcon",
    "feather", "forest", "fountain", "garden", "glacier", "harbor", "helmet", "island", "jacket",
    "kettle", "lantern", "ledger", "lemon", "marble", "meadow", "mirror", "needle", "orchard", "otter",
    "panda", "parrot", "pebble", "pepper", "pillow", "planet", "puzzle", "quarry", "rabbit", "ribbon",
    "river", "rocket", "saddle", "salmon", "shadow", "spider", "spoon", "statue", "summit", "teapot",
    "thistle", "thunder", "tiger", "timber", "tower", "trumpet", "tunnel", "valley", "violin", "walnut",
    "wagon", "window", "wizard", "yogurt", "zebra",
)
_COMMON_WORDS = _NOUNS + _ADJECTIVES


@dataclass(frozen=True)
class Question:
    """One question: its text (ending with the answer prefix) and what the output must contain."""

    text: str
    answers: Tuple[str, ...]
    max_new_tokens: int
    #: generation stops at a newline; with ``one_sentence`` also at the end of the
    #: first sentence (". "), as every answer here is one sentence but a word list
    one_sentence: bool = True


@dataclass(frozen=True)
class Sample:
    """A context and its questions (several for ``multiturn``, asked in turn)."""

    task: str
    length: int  # target prompt length in tokens (context + first question)
    index: int
    context: str
    questions: Tuple[Question, ...]
    #: relative position in the context (0..1) of the needle each question asks about
    #: (several per question for multi-value/multi-query; empty for cwe)
    depths: Tuple[Tuple[float, ...], ...] = field(default_factory=tuple)


# -- building blocks ----------------------------------------------------------

def _key(rng: random.Random, taken: set) -> str:
    while True:
        k = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if k not in taken:
            taken.add(k)
            return k


def _value(rng: random.Random, kind: str, taken: set) -> str:
    while True:
        if kind == "number":
            v = str(rng.randint(1_000_000, 9_999_999))
        elif kind == "word":
            v = rng.choice(_NOUNS)
        else:  # uuid-like: 8-4-4-4-12 hex digits (RULER's uuids, from a seeded RNG)
            h = "".join(rng.choice("0123456789abcdef") for _ in range(32))
            v = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        if v not in taken:
            taken.add(v)
            return v


def _insert(hay: str, pieces: Sequence[Tuple[float, str]]) -> str:
    """``hay`` with each (depth, text) inserted at the sentence boundary at or after
    that share of its characters."""
    out, last = [], 0
    for depth, piece in sorted(pieces, key=lambda p: p[0]):
        at = int(depth * len(hay))
        dot = hay.find(". ", at)
        cut = max(last, dot + 1 if 0 <= dot < at + max(50, len(hay) // 50) else at)
        out += [hay[last:cut], piece]
        last = cut
    return "".join(out) + hay[last:]


def _depth_in(context: str, piece: str) -> float:
    """Where ``piece`` starts in ``context``, as a share of its characters."""
    return context.index(piece) / max(1, len(context))


def _needle(key: str, value: str, kind: str) -> str:
    return f" One of the special magic {kind}s for {key} is: {value}."


@dataclass
class _Builder:
    """What a task generator needs: the tokenizer pair and the filler."""

    tokenize: Callable[[str], List[int]]
    detokenize: Callable[[List[int]], str]
    filler: List[int]  # filler tokens (essays or noise), no BOS

    def n_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def hay(self, rng: random.Random, n: int) -> str:
        """About ``n`` tokens of filler from a random offset."""
        n = max(0, n)
        off = rng.randint(0, max(0, len(self.filler) - n - 1))
        return self.detokenize(self.filler[off:off + n])


def _depths(rng: random.Random, n: int, index: int) -> List[float]:
    """Needle depths: the first spread over 0.05..0.95 by the sample index (so a run of
    samples covers every depth evenly), any others at random."""
    grid = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)
    return [grid[index % len(grid)]] + [rng.uniform(0.05, 0.95) for _ in range(n - 1)]


# -- the tasks ----------------------------------------------------------------

def _niah(b: _Builder, rng, length, index, *, kind="number", n_keys=1, n_values=1, n_queries=1,
          turns=False) -> Tuple[str, Tuple[Question, ...], Tuple[Tuple[float, ...], ...]]:
    keys_taken, vals_taken = set(), set()
    keys = [_key(rng, keys_taken) for _ in range(max(n_keys, n_queries))]
    values = {k: [_value(rng, kind, vals_taken) for _ in range(n_values if i == 0 else 1)]
              for i, k in enumerate(keys)}
    asked = keys[:n_queries]
    # the asked needles first: the first takes the sample's grid depth (_depths)
    needles = [(k, v) for k in keys for v in values[k]]
    noun = f"{kind}s" if kind != "uuid" else "uuids"
    pre = (f"Some special magic {noun} are hidden within the following text. Make sure to memorize it. "
           f"I will quiz you about the {noun} afterwards.\n")
    per_value = {"number": 12, "word": 8, "uuid": 36}[kind]

    def question(ks: Sequence[str]) -> Question:
        many = len(ks) > 1 or n_values > 1
        who = ", ".join(ks[:-1]) + f" and {ks[-1]}" if len(ks) > 1 else ks[0]
        if many:
            q = (f"\nWhat are all the special magic {noun} for {who} mentioned in the provided text? "
                 f"The special magic {noun} for {who} mentioned in the provided text are")
        else:
            q = (f"\nWhat is the special magic {kind} for {who} mentioned in the provided text? "
                 f"The special magic {kind} for {who} mentioned in the provided text is")
        ans = tuple(v for k in ks for v in values[k])
        return Question(q, ans, per_value * len(ans) + 8)

    questions = tuple(question([k]) for k in asked) if turns else (question(asked),)
    overhead = b.n_tokens(pre) + sum(b.n_tokens(_needle(k, v, kind)) for k, v in needles) \
        + b.n_tokens(questions[0].text) + 1
    hay = b.hay(rng, length - overhead)
    depth = _depths(rng, len(needles), index)
    if turns:  # one needle per turn, spread over the context
        depth = [((index // 10) % 3 * 0.1 + 0.1 + 0.3 * i) % 1.0 for i in range(len(needles))]
    context = pre + _insert(hay, [(d, _needle(k, v, kind)) for d, (k, v) in zip(depth, needles)])
    where = {(k, v): _depth_in(context, _needle(k, v, kind)) for k, v in needles}
    if turns:
        per_q = tuple((where[(k, values[k][0])],) for k in asked)
    else:
        per_q = (tuple(where[(k, v)] for k in asked for v in values[k]),)
    return context, questions, per_q


def _vt(b: _Builder, rng, length, index, n_hops=4):
    names_taken: set = set()
    names = []
    while len(names) < n_hops + 1:
        n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if n not in names_taken:
            names_taken.add(n)
            names.append(n)
    value = str(rng.randint(10000, 99999))
    chain = [f" VAR {names[0]} = {value}."] + [f" VAR {names[i + 1]} = VAR {names[i]}." for i in range(n_hops)]
    pre = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
    q = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
         f"Answer: According to the chain(s) of variables assignment in the text above, {n_hops + 1} "
         f"variables are assigned the value {value}, they are:")
    overhead = b.n_tokens(pre) + sum(b.n_tokens(c) for c in chain) + b.n_tokens(q) + 1
    hay = b.hay(rng, length - overhead)
    start = _depths(rng, 1, index)[0] * 0.5
    depth = [start + i * (0.95 - start) / max(1, n_hops) for i in range(n_hops + 1)]
    context = pre + _insert(hay, list(zip(depth, chain)))
    return context, (Question(q, tuple(names), 8 * (n_hops + 1) + 8),), (tuple(_depth_in(context, c) for c in chain),)


def _cwe(b: _Builder, rng, length, index, n_common=10):
    """A numbered word list: ten words each ten times as frequent as any other word."""
    words = list(_COMMON_WORDS)
    rng.shuffle(words)
    common, rare = words[:n_common], words[n_common:]
    pre = ("Below is a numbered list of words. In these words, some appear more often than others. "
           "Memorize the ones that appear most often.\n")
    q = ("\nQuestion: What are the 10 most common words in the above list? "
         "Answer: The top 10 words that appear most often in the list are:")

    def listing(items):
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))

    budget = length - b.n_tokens(pre) - b.n_tokens(q) - 1
    per_item = b.n_tokens(listing(words[:50])) / 50
    n_items = max(2 * n_common, int(budget / per_item))
    r = n_items / (10 * n_common + len(rare))  # each rare word's count (common: 10 r)
    if r < 1:  # too short for every word once: fewer rare words, each once
        rare = rare[:max(0, n_items - 10 * n_common)]
    n_rare, n_com = max(1, int(r)), max(2, round(10 * max(1.0, r)))
    bag = [w for w in common for _ in range(n_com)] + [w for w in rare for _ in range(n_rare)]
    rng.shuffle(bag)
    for _ in range(64):  # trim to the budget: rare items first, then a round of every common word
        if b.n_tokens(listing(bag)) <= budget:
            break
        rare_at = [i for i, w in enumerate(bag) if w not in common]
        if rare_at:
            drop = rare_at[-max(1, len(rare_at) // 10):]
        else:
            drop = [max(i for i, x in enumerate(bag) if x == w) for w in common] if n_com > 2 else []
            n_com -= 1
        for i in sorted(drop, reverse=True):
            bag.pop(i)
    return pre + listing(bag), (Question(q, tuple(common), 8 * n_common + 8, one_sentence=False),), ((),)


#: task name -> generator(builder, rng, length, index) -> (context, questions, depths)
TASKS: Dict[str, Callable] = {
    "niah_number": lambda b, r, n, i: _niah(b, r, n, i, kind="number"),
    "niah_word": lambda b, r, n, i: _niah(b, r, n, i, kind="word"),
    "niah_uuid": lambda b, r, n, i: _niah(b, r, n, i, kind="uuid"),
    "niah_multikey": lambda b, r, n, i: _niah(b, r, n, i, kind="number", n_keys=4),
    "niah_multivalue": lambda b, r, n, i: _niah(b, r, n, i, kind="number", n_values=4),
    "niah_multiquery": lambda b, r, n, i: _niah(b, r, n, i, kind="number", n_keys=4, n_queries=4),
    "vt": _vt,
    "cwe": _cwe,
    "multiturn": lambda b, r, n, i: _niah(b, r, n, i, kind="number", n_keys=3, n_queries=3, turns=True),
}
#: the tasks whose answer is a needle somewhere in the context (the headline's)
NEEDLE_TASKS = ("niah_number", "niah_word", "niah_uuid", "niah_multikey", "niah_multivalue", "niah_multiquery")
#: tasks that want RULER's noise sentences, not a text, around their facts
_NOISE_TASKS = ("vt",)


def make_sample(task: str, length: int, index: int, tokenize: Callable[[str], List[int]],
                detokenize: Callable[[List[int]], str], filler: List[int], noise: List[int],
                seed: int = 0) -> Sample:
    """Sample ``index`` of ``task`` at ``length`` tokens (deterministic in its arguments).

    ``tokenize(text)`` must return ids without BOS; ``filler`` / ``noise`` are the
    token ids of the haystack text and of :data:`NOISE` repeated.
    """
    if task not in TASKS:
        raise ValueError(f"unknown retrieval task {task!r}; expected one of {sorted(TASKS)}")
    if length < 128:
        raise ValueError(f"length must be at least 128 tokens, got {length}")
    rng = random.Random(f"{seed}-{task}-{length}-{index}")
    b = _Builder(tokenize, detokenize, noise if task in _NOISE_TASKS else filler)
    context, questions, depths = TASKS[task](b, rng, length, index)
    return Sample(task, length, index, context, questions, depths)


def sample_tokens(sample: Sample, tokenize: Callable[[str, bool], List[int]]) -> Tuple[List[int], List[List[int]]]:
    """(context ids with BOS, [question ids without BOS]): the parts are tokenized apart,
    so every mode and engine feeds exactly these ids."""
    return tokenize(sample.context, True), [tokenize(q.text, False) for q in sample.questions]


def _contains(output: str, value: str) -> bool:
    """``value`` in ``output``, case-insensitive; a number or hex string must not be part
    of a longer run of digits / hex characters (1234567 is not in 91234567)."""
    out, val = output.lower(), value.lower()
    if re.fullmatch(r"[0-9a-f-]+", val):
        return re.search(rf"(?<![0-9a-f]){re.escape(val)}(?![0-9a-f])", out) is not None
    return re.search(rf"\b{re.escape(val)}\b", out) is not None


def score_output(output: str, answers: Sequence[str]) -> float:
    """RULER's string_match_all: the share of ``answers`` that appear in ``output``."""
    if not answers:
        raise ValueError("a question needs at least one answer")
    return sum(_contains(output, a) for a in answers) / len(answers)


def noise_tokens(tokenize: Callable[[str], List[int]], n: int) -> List[int]:
    """At least ``n`` tokens of :data:`NOISE` repeated."""
    one = tokenize(" " + NOISE)
    return one * (n // max(1, len(one)) + 2)


__all__.append("noise_tokens")


def depth_of(sample: Sample, question: int = 0) -> Optional[float]:
    """The earliest depth of what question ``question`` asks about (None: no needle)."""
    d = sample.depths[question] if question < len(sample.depths) else ()
    return min(d) if d else None


__all__.append("depth_of")
