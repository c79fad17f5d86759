"""Turn MovieLens latest-small into a LaMP-3-style per-user rating task with a temporal split.

Owns reading the CSVs, choosing users, the history/test split and its leakage checks; knows
nothing about the server, models or storage.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

StrPath = str | os.PathLike[str]
NO_GENRES = "(no genres listed)"


@dataclass(frozen=True)
class Movie:
    movie_id: int
    title: str
    genres: tuple[str, ...]


@dataclass(frozen=True)
class Rating:
    movie_id: int
    rating: float
    timestamp: int


@dataclass(frozen=True)
class Tag:
    movie_id: int
    tag: str
    timestamp: int


@dataclass
class MovieLens:
    """The raw dataset; ratings per user are sorted by (timestamp, movieId), tags by timestamp."""

    movies: dict[int, Movie]
    ratings: dict[int, list[Rating]]
    tags: dict[int, list[Tag]]


@dataclass(frozen=True)
class ItemContext:
    """What an operator knows about the movie at the moment of this rating: how many OTHER users rated it
    strictly before `as_of` (the rating's own timestamp), and their mean."""

    count: int
    mean: float | None
    as_of: int


@dataclass(frozen=True)
class RatingItem:
    item_id: str
    movie_id: int
    title: str
    genres: tuple[str, ...]
    rating: float
    timestamp: int
    tags: tuple[str, ...] = ()
    context: ItemContext | None = None  # only with item context on (with_item_context)


@dataclass
class UserSplit:
    user_id: str
    history: list[RatingItem]
    test: list[RatingItem]


@dataclass
class RatingTask:
    users: list[UserSplit]
    config: dict[str, Any] = field(default_factory=dict)


def _rows(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = tuple(reader.fieldnames or ())
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {list(header)}")
        # Line numbers count the header as line 1, so the first data row is line 2.
        return [(i + 2, row) for i, row in enumerate(reader)]


def _int(row: dict[str, str], key: str, where: str) -> int:
    try:
        return int(row[key])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: column {key!r} is not an integer: {row[key]!r}") from exc


def _read_movies(path: Path) -> dict[int, Movie]:
    movies: dict[int, Movie] = {}
    for line, row in _rows(path, ("movieId", "title", "genres")):
        movie_id = _int(row, "movieId", f"{path}:{line}")
        genres = () if row["genres"] in ("", NO_GENRES) else tuple(row["genres"].split("|"))
        movies[movie_id] = Movie(movie_id, row["title"].strip(), genres)
    return movies


def _read_ratings(path: Path) -> dict[int, list[Rating]]:
    latest: dict[int, dict[int, Rating]] = {}
    for line, row in _rows(path, ("userId", "movieId", "rating", "timestamp")):
        where = f"{path}:{line}"
        try:
            value = float(row["rating"])
        except ValueError as exc:
            raise ValueError(f"{where}: column 'rating' is not a number: {row['rating']!r}") from exc
        rating = Rating(_int(row, "movieId", where), value, _int(row, "timestamp", where))
        per_user = latest.setdefault(_int(row, "userId", where), {})
        old = per_user.get(rating.movie_id)
        # A re-rating replaces the earlier one, so each movie is one item per user.
        if old is None or rating.timestamp >= old.timestamp:
            per_user[rating.movie_id] = rating
    return {
        user: sorted(by_movie.values(), key=lambda r: (r.timestamp, r.movie_id)) for user, by_movie in latest.items()
    }


def _read_tags(path: Path) -> dict[int, list[Tag]]:
    tags: dict[int, list[Tag]] = {}
    if not path.exists():
        return tags
    for line, row in _rows(path, ("userId", "movieId", "tag", "timestamp")):
        where = f"{path}:{line}"
        tag = Tag(_int(row, "movieId", where), row["tag"].strip(), _int(row, "timestamp", where))
        tags.setdefault(_int(row, "userId", where), []).append(tag)
    return {u: sorted(ts, key=lambda t: (t.timestamp, t.movie_id, t.tag)) for u, ts in tags.items()}


def load_movielens(data_dir: StrPath) -> MovieLens:
    """Read movies.csv, ratings.csv and (optional) tags.csv from a MovieLens directory."""
    root = Path(data_dir)
    return MovieLens(
        movies=_read_movies(root / "movies.csv"),
        ratings=_read_ratings(root / "ratings.csv"),
        tags=_read_tags(root / "tags.csv"),
    )


def _item(ml: MovieLens, user: int, rating: Rating, tag_cutoff: int | None) -> RatingItem:
    movie = ml.movies.get(rating.movie_id) or Movie(rating.movie_id, f"Movie {rating.movie_id}", ())
    tags: list[str] = []
    if tag_cutoff is not None:
        for t in ml.tags.get(user, []):
            if t.movie_id == rating.movie_id and t.timestamp <= tag_cutoff and t.tag not in tags:
                tags.append(t.tag)
    return RatingItem(
        item_id=f"m{rating.movie_id}",
        movie_id=rating.movie_id,
        title=movie.title,
        genres=movie.genres,
        rating=rating.rating,
        timestamp=rating.timestamp,
        tags=tuple(tags),
    )


def split_user(ml: MovieLens, user: int, *, history_items: int, test_items: int, holdout: int = 0) -> UserSplit:
    """Temporal split: test is the user's last `test_items` ratings, history the ones just before.

    History items keep only tags given no later than the first test rating; test items carry no
    tags, since a tag on a test movie could reveal the answer. `holdout` drops the user's last ratings
    unread first: with holdout = test_items the "test" items are a dev set just before the real test
    items, for choosing settings without ever looking at the test items.
    """
    if holdout < 0:
        raise ValueError("holdout must be >= 0")
    ratings = ml.ratings[user][: len(ml.ratings[user]) - holdout]
    if len(ratings) <= test_items:
        raise ValueError(f"user {user} has {len(ratings)} ratings, needs more than {test_items}")
    test_raw = ratings[len(ratings) - test_items :]
    before = ratings[: len(ratings) - test_items]
    history_raw = before[len(before) - history_items :] if history_items > 0 else []
    cutoff = test_raw[0].timestamp
    split = UserSplit(
        user_id=f"ml_{user}",
        history=[_item(ml, user, r, cutoff) for r in history_raw],
        test=[_item(ml, user, r, None) for r in test_raw],
    )
    check_split(split)
    return split


def build_rating_task(
    ml: MovieLens,
    *,
    n_users: int,
    history_items: int,
    test_items: int,
    min_ratings: int,
    seed: int,
    holdout: int = 0,
) -> RatingTask:
    """Choose `n_users` users (seeded, among those with >= min_ratings + holdout) and split each in time."""
    if n_users < 1 or test_items < 1 or history_items < 0 or holdout < 0:
        raise ValueError("n_users and test_items must be >= 1, history_items and holdout >= 0")
    need = max(min_ratings, test_items + 1) + holdout
    eligible = sorted(u for u, rs in ml.ratings.items() if len(rs) >= need)
    if len(eligible) < n_users:
        raise ValueError(f"only {len(eligible)} users have >= {need} ratings; asked for {n_users}")
    chosen = sorted(random.Random(seed).sample(eligible, n_users))
    users = [split_user(ml, u, history_items=history_items, test_items=test_items, holdout=holdout) for u in chosen]
    config: dict[str, Any] = {
        "source": "movielens-latest-small",
        "split": "temporal",
        "n_users": n_users,
        "history_items": history_items,
        "test_items": test_items,
        "min_ratings": min_ratings,
        "holdout": holdout,
        "seed": seed,
    }
    task = RatingTask(users=users, config=config)
    check_no_leakage(task)
    return task


def check_split(split: UserSplit) -> None:
    """Raise AssertionError if a test item is in the history or history runs past the first test."""
    history_ids = {h.item_id for h in split.history}
    overlap = sorted(history_ids & {t.item_id for t in split.test})
    if overlap:
        raise AssertionError(f"{split.user_id}: test items in history: {overlap}")
    if split.history and split.test:
        first_test = min(t.timestamp for t in split.test)
        late = [h.item_id for h in split.history if h.timestamp > first_test]
        if late:
            raise AssertionError(f"{split.user_id}: history items after first test rating: {late}")


def check_no_leakage(task: RatingTask) -> None:
    for split in task.users:
        check_split(split)


def iso_utc(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat().replace("+00:00", "Z")


def format_rating(rating: float) -> str:
    return f"{rating:.1f}"


def _genres_text(item: RatingItem) -> str:
    return ", ".join(item.genres) if item.genres else "unknown"


def context_text(context: ItemContext) -> str:
    if context.count == 0 or context.mean is None:
        return "no ratings by others yet"
    return f"rated by {context.count} others, mean {context.mean:.1f}"


def item_input(item: RatingItem) -> str:
    """The movie as text; identical in history inputs and test queries so retrieval can match. With item
    context, what others thought of it before this rating is part of the text."""
    text = f"{item.title} | genres: {_genres_text(item)}"
    return text if item.context is None else f"{text} | {context_text(item.context)}"


def _by_movie(data: MovieLens) -> dict[int, list[tuple[int, int, float]]]:
    out: dict[int, list[tuple[int, int, float]]] = {}
    for user, ratings in data.ratings.items():
        for r in ratings:
            out.setdefault(r.movie_id, []).append((r.timestamp, user, r.rating))
    for rows in out.values():
        rows.sort()
    return out


def _context_of(rows: list[tuple[int, int, float]], owner: int, as_of: int) -> ItemContext:
    values = [r for t, u, r in rows if t < as_of and u != owner]  # strictly before, others only
    return ItemContext(len(values), sum(values) / len(values) if values else None, as_of)


def user_number(user_id: str) -> int:
    return int(user_id.removeprefix("ml_"))


def with_item_context(task: RatingTask, data: MovieLens) -> RatingTask:
    """The same task, every history and scored item carrying its context as of its own timestamp."""
    by_movie = _by_movie(data)

    def ctx(owner: int, item: RatingItem) -> RatingItem:
        return replace(item, context=_context_of(by_movie.get(item.movie_id, []), owner, item.timestamp))

    users = []
    for split in task.users:
        owner = user_number(split.user_id)
        users.append(
            UserSplit(split.user_id, [ctx(owner, h) for h in split.history], [ctx(owner, t) for t in split.test])
        )
    out = RatingTask(users=users, config={**task.config, "item_context": True})
    check_context_leakage(out, data)
    return out


def check_context_leakage(task: RatingTask, data: MovieLens) -> int:
    """Raise AssertionError unless every item's context is exactly what other users' ratings strictly
    before the item's own timestamp give: a rating at or after that moment, or one of the user's own,
    changes the count or the mean and is caught. Returns how many items carry a context."""
    checked = 0
    rated: dict[int, list[tuple[int, Rating]]] = {}
    for u, rs in data.ratings.items():
        for r in rs:
            rated.setdefault(r.movie_id, []).append((u, r))
    for split in task.users:
        owner = user_number(split.user_id)
        for item in [*split.history, *split.test]:
            if item.context is None:
                continue
            c = item.context
            if c.as_of != item.timestamp:
                raise AssertionError(f"{split.user_id}/{item.item_id}: context as of {c.as_of}, not its own time")
            values = [r.rating for u, r in rated.get(item.movie_id, []) if u != owner and r.timestamp < item.timestamp]
            mean = sum(values) / len(values) if values else None
            same_mean = (mean is None and c.mean is None) or (
                mean is not None and c.mean is not None and abs(mean - c.mean) < 1e-9
            )
            if c.count != len(values) or not same_mean:
                raise AssertionError(
                    f"{split.user_id}/{item.item_id}: context {c.count} ratings, mean {c.mean} but other users' "
                    f"ratings strictly before {item.timestamp} are {len(values)}, mean {mean} (a leak or a bug)"
                )
            checked += 1
    return checked


def history_item(item: RatingItem) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": item.item_id,
        "input": item_input(item),
        "output": format_rating(item.rating),
        "kind": "rating",
        "timestamp": iso_utc(item.timestamp),
    }
    if item.tags:
        out["metadata"] = {"tags": list(item.tags)}
    return out


def rating_question(item: RatingItem) -> str:
    return (
        f'What score from 0.5 to 5.0 (in steps of 0.5) would this user give the movie "{item.title}" '
        f"(genres: {_genres_text(item)})? Answer with only the number."
    )


def global_mean(task: RatingTask) -> float:
    """Mean of every HISTORY rating across users (test ratings are never read)."""
    values = [h.rating for split in task.users for h in split.history]
    if not values:
        raise ValueError("no history ratings to average")
    return sum(values) / len(values)


def user_mean(split: UserSplit, *, fallback: float | None = None) -> float:
    """Mean of this user's HISTORY ratings; `fallback` (if given) when the history is empty."""
    if not split.history:
        if fallback is None:
            raise ValueError(f"{split.user_id}: empty history and no fallback")
        return fallback
    return sum(h.rating for h in split.history) / len(split.history)
