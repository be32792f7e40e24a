"""RULER's synthetic tasks that need no download, made with a model's tokenizer and chat template
at an exact prompt length, and RULER's scoring (Hsieh et al., 2024, github.com/NVIDIA/RULER).

Tasks (RULER's templates, needles and answer prefixes):

* ``niah_single``: one needle "One of the special magic numbers for {key} is: {value}." (key an
  adjective-noun pair, value a 7-digit number) in the noise haystack ("The grass is green. The sky
  is blue. ..."), RULER's niah_single_1;
* ``niah_multikey``: four needles of different keys, one asked (RULER's niah_multikey_1 uses the
  essay haystack: here the noise haystack, so nothing is downloaded);
* ``niah_multivalue``: four values of one key, all asked; ``niah_multiquery``: four keys, all asked;
* ``vt`` (variable tracking): one chain ``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``, ... of
  4 hops in the noise haystack; the answer is the chain's 5 variables;
* ``cwe`` (common words extraction): a numbered word list, 10 common words ``freq_cw`` times each
  (RULER: 30; here at most 30 and at most a quarter of the list, so the task fits short contexts),
  the others 3 times; the answer is the 10 common words;
* ``fwe`` (frequent words extraction): coded 6-letter words drawn from a Zipf law (alpha 2); the
  answer is the 3 most frequent.

Unlike RULER, no in-context example precedes the vt/cwe/fwe prompts (it would take a third of a
1K prompt). Every prompt is exactly ``context`` tokens: the chat template's text before and after
the task's context part, the answer prefix appended after the assistant turn's start (as RULER
does), and the haystack (or list) filled to the remaining budget and cut at the token level at
its end (never inside a needle). Needles sit between haystack sentences at depths drawn, as in
RULER, from 40 evenly spaced depths in [0, 100]% (``depths``: cycle through a given list instead).
Every sample is a function of (task, context, seed, index) and the tokenizer.

Scoring (RULER's ``string_match_all``): the fraction of the reference strings found (case
insensitive) in the generated text.
"""

from __future__ import annotations

import random
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hpcattn.config import EVAL_TASKS as TASKS
from hpcattn.errors import ConfigError

# RULER's tokens_to_generate per task
MAX_NEW = {"niah_single": 128, "niah_multikey": 128, "niah_multivalue": 128, "niah_multiquery": 128,
           "vt": 30, "cwe": 120, "fwe": 50}
NOISE = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
DEPTHS = [round(100 * i / 39) for i in range(40)]          # RULER: np.linspace(0, 100, 40), rounded

NIAH_ONE = ("A special magic number is hidden within the following text. Make sure to memorize it. I will quiz "
            "you about the number afterwards.\n{context}\nWhat is the special magic number for {query} mentioned "
            "in the provided text?")
NIAH_ONE_PREFIX = " The special magic number for {query} mentioned in the provided text is"
NIAH_MANY = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. I will "
             "quiz you about the numbers afterwards.\n{context}\nWhat are all the special magic numbers for {query} "
             "mentioned in the provided text?")
NIAH_MANY_PREFIX = " The special magic numbers for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic numbers for {key} is: {value}."
VT = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
      "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num} variables are "
             "assgined the value {query}, they are: ")
CWE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
       "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
       "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the "
       "dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


@dataclass
class Sample:
    """One prompt and its references.

    Attributes:
        ids: the prompt's token ids, exactly ``context`` of them.
        answers: the reference strings (``score`` counts those found in the output).
        depth: the (first) asked needle's depth in the context part, percent; NaN for cwe/fwe.
        question_len: tokens after the context part (question, template, answer prefix).
    """
    task: str
    context: int
    index: int
    ids: list[int]
    answers: list[str]
    depth: float = float("nan")
    question_len: int = 0
    meta: dict = field(default_factory=dict)


def score(text: str, answers: list[str]) -> float:
    """RULER's string_match_all: the fraction of ``answers`` found in ``text`` (case insensitive)."""
    low = text.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def words() -> tuple[list[str], list[str]]:
    """(nouns, adjectives) of ruler_words.txt, sorted, without repeats."""
    nouns, adjs, into = set(), set(), None
    for line in (Path(__file__).with_name("ruler_words.txt")).read_text().splitlines():
        if line.startswith("# adjectives"):
            into = adjs
        elif line.startswith("# nouns"):
            into = nouns
        elif not line.startswith("#"):
            (into if into is not None else nouns).update(line.split())
    return sorted(nouns), sorted(adjs - nouns)


class PromptBuilder:
    """Builds :class:`Sample` s with one tokenizer (:class:`hpcattn.model.tokenizer.TextTokenizer`)."""

    MARK = "\x00CONTEXT\x00"

    def __init__(self, tokenizer, chat: bool = True):
        self.tok, self.chat = tokenizer, chat
        self.nouns, self.adjs = words()
        self.noise = tokenizer.encode_many([" " + n for n in NOISE])      # the haystack's sentences

    def frame(self, template: str, prefix: str, **fields) -> tuple[list[int], list[int]]:
        """(ids before the context part, ids after it: question + template tail + answer prefix)."""
        user = template.format(context=self.MARK, **fields)
        text = self.tok.chat(user) if self.chat else user
        if text.count(self.MARK) != 1:
            raise ConfigError("eval: the chat template dropped or repeated the task text")
        head, tail = text.split(self.MARK)
        return (self.tok.encode(head, special=not self.chat),
                self.tok.encode(tail + prefix.format(**fields), special=False))

    def sample(self, task: str, context: int, seed: int, index: int, depths: list[float] | None = None) -> Sample:
        """Sample ``index`` of ``task`` at ``context`` tokens (a function of its arguments)."""
        if task not in TASKS:
            raise ConfigError(f"eval.tasks: unknown task {task!r} (choose from {', '.join(TASKS)})")
        rng = random.Random(f"{seed}/{task}/{context}/{index}")
        depth = depths[index % len(depths)] if depths else None
        return getattr(self, "_" + task.split("_")[0])(task, context, index, rng, depth)

    # -- haystack tasks ------------------------------------------------------------------------
    def _key(self, rng, taken: set) -> str:
        while True:
            k = f"{rng.choice(self.adjs)}-{rng.choice(self.nouns)}"
            if k not in taken:
                taken.add(k)
                return k

    def _niah(self, task, context, index, rng, depth):
        taken: set = set()
        n_keys = 4 if task in ("niah_multikey", "niah_multiquery") else 1
        n_values = 4 if task == "niah_multivalue" else 1
        keys = [self._key(rng, taken) for _ in range(n_keys)]
        values = {k: [str(rng.randint(10 ** 6, 10 ** 7 - 1)) for _ in range(n_values)] for k in keys}
        needles = [(k, NEEDLE.format(key=k, value=v)) for k in keys for v in values[k]]
        asked = keys if task == "niah_multiquery" else keys[:1]
        query = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
        one = task in ("niah_single", "niah_multikey")
        head, tail = self.frame(NIAH_ONE if one else NIAH_MANY, NIAH_ONE_PREFIX if one else NIAH_MANY_PREFIX,
                                query=query)
        rng.shuffle(needles)
        ids, at = self._haystack(context, head, tail, [n for _, n in needles], rng, depth, task)
        shallowest = min(at[i] for i, (k, _) in enumerate(needles) if k in asked)
        return Sample(task, context, index, ids, [v for k in asked for v in values[k]], shallowest, len(tail),
                      {"keys": keys, "asked": asked})

    def _vt(self, task, context, index, rng, depth):
        names: set = set()
        while len(names) < 5:
            names.add("".join(rng.choice(string.ascii_uppercase) for _ in range(5)))
        chain = rng.sample(sorted(names), 5)
        value = str(rng.randint(10000, 99999))
        lines = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        head, tail = self.frame(VT, VT_PREFIX, query=value, num=len(chain))
        ids, at = self._haystack(context, head, tail, lines, rng, depth, task, in_order=True)
        return Sample(task, context, index, ids, chain, at[0], len(tail), {"value": value})

    def _haystack(self, context, head, tail, needles, rng, depth, task, in_order=False):
        """Prompt ids with ``needles`` (in this order) between noise sentences; and each needle's
        depth (percent of the context part)."""
        budget = context - len(head) - len(tail)
        pieces = [self.tok.encode(" " + n, special=False) for n in needles]
        fill = budget - sum(map(len, pieces))
        if fill < 1:
            raise ConfigError(f"eval: context {context} is too short for task {task} "
                              f"(template and needles take {context - fill} tokens)")
        sentences, n = [], 0
        while n < fill:
            s = list(self.noise[len(sentences) % len(NOISE)])
            sentences.append(s)
            n += len(s)
        over = n - fill                                   # cut the last sentence to fit exactly
        sentences[-1] = sentences[-1][:len(sentences[-1]) - over]
        if not sentences[-1]:
            sentences.pop()
        if depth is not None:
            spots = [int(len(sentences) * depth / 100)] * len(needles)
        else:
            chosen = rng.sample(DEPTHS, len(needles)) if len(needles) <= len(DEPTHS) else \
                [rng.choice(DEPTHS) for _ in needles]
            spots = [int(len(sentences) * d / 100) for d in chosen]
        if in_order or depth is not None:
            spots = sorted(spots)
        by_spot = sorted(range(len(needles)), key=lambda i: (spots[i], i))
        body, at, k = [], [0.0] * len(needles), 0
        for s_i in range(len(sentences) + 1):
            while k < len(by_spot) and spots[by_spot[k]] <= s_i:
                i = by_spot[k]
                at[i] = 100.0 * len(body) / budget
                body += pieces[i]
                k += 1
            if s_i < len(sentences):
                body += sentences[s_i]
        assert len(body) == budget
        return head + body + tail, at

    # -- aggregation tasks ---------------------------------------------------------------------
    def _cwe(self, task, context, index, rng, depth):
        head, tail = self.frame(CWE, CWE_PREFIX)
        budget = context - len(head) - len(tail)
        pool = self.nouns + self.adjs
        rng.shuffle(pool)
        common, rest = pool[:10], pool[10:]
        per = len(self.tok.encode("\n10. " + common[0], special=False))          # tokens of one entry
        freq_cw = max(4, min(30, budget // (2 * 10 * per)))     # commons: at most half the list
        order_seed = rng.random()

        def listed(n_ucw: int, freq_ucw: int) -> tuple[list[str], list[list[int]]]:
            entries = [w for w in common for _ in range(freq_cw)] + [w for w in rest[:n_ucw] for _ in range(freq_ucw)]
            random.Random(order_seed).shuffle(entries)
            return entries, self._numbered(entries)

        # the fewest uncommon words (3 times each; more often when the word list runs out) whose list
        # fills the budget: a list's token count does not depend on its order, so it grows with n_ucw
        for freq_ucw in range(3, freq_cw):
            entries, lines = listed(len(rest), freq_ucw)
            if sum(map(len, lines)) >= budget:
                break
        else:
            raise ConfigError(f"eval: cwe at context {context}: the {len(pool)} words of ruler_words.txt do not "
                              f"fill the list with the common words the most frequent")
        lo, hi = 0, len(rest)                 # hi fills the budget; find the smallest that does
        while lo < hi:
            mid = (lo + hi) // 2
            if sum(map(len, listed(mid, freq_ucw)[1])) >= budget:
                hi = mid
            else:
                lo = mid + 1
        entries, lines = listed(hi, freq_ucw)
        # the list is cut to the budget: no common word's entry may fall behind the cut (swapped
        # with an uncommon entry before it, keeping the numbering)
        swap = random.Random(order_seed + 1)
        for _ in range(8):
            k = self._whole_lines(lines, budget)
            late = [i for i in range(k, len(entries)) if entries[i] in common]
            if not late:
                break
            early = swap.sample([i for i in range(k) if entries[i] not in common], len(late))
            for i, j in zip(late, early):
                entries[i], entries[j] = entries[j], entries[i]
            lines = self._numbered(entries)
        k = self._whole_lines(lines, budget)
        body = [t for ln in lines[:k] for t in ln]
        body += lines[k][:budget - len(body)] if k < len(lines) else []
        counts = Counter(entries[:k])
        ids = head + body + tail
        return Sample(task, context, index, ids, common, question_len=len(tail),
                      meta={"freq_cw": freq_cw, "freq_ucw": freq_ucw,
                            "min_common": min(counts[w] for w in common),
                            "max_uncommon": max([c for w, c in counts.items() if w not in common] or [0])})

    def _numbered(self, entries: list[str]) -> list[list[int]]:
        """Token ids of each line ``{i}. {word}`` of the numbered list (a newline before all but the first)."""
        return self.tok.encode_many([("\n" if i else "") + f"{i + 1}. {w}" for i, w in enumerate(entries)])

    @staticmethod
    def _whole_lines(lines: list[list[int]], budget: int) -> int:
        """How many leading lines fit whole in ``budget`` tokens."""
        used = 0
        for k, ln in enumerate(lines):
            if used + len(ln) > budget:
                return k
            used += len(ln)
        return len(lines)

    def _fwe(self, task, context, index, rng, depth):
        head, tail = self.frame(FWE, FWE_PREFIX)
        budget = context - len(head) - len(tail)
        vocab = ["".join(rng.choice(string.ascii_lowercase) for _ in range(6)) for _ in range(max(budget // 50, 10))]
        # Zipf (alpha 2) over the coded vocabulary, as RULER's np.random.zipf, truncated to it
        weights = [1 / (r + 1) ** 2 for r in range(len(vocab))]
        drawn: list[str] = []
        body: list[int] = []
        while len(body) < budget:
            chunk = rng.choices(vocab, weights, k=64)
            drawn += chunk
            text = " " + " ".join(drawn[i] + (" ...." if i % 10 == 9 else "") for i in range(len(drawn)))
            body = self.tok.encode(text, special=False)
        body = body[:budget]
        seen = Counter(self.tok.decode(body).replace("....", " ").split())
        top = [w for w, _ in seen.most_common(3)]
        return Sample(task, context, index, head + body + tail, top, question_len=len(tail))
