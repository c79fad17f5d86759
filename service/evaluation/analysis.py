"""The honest reading of one split's per-item predictions: every method's MAE/RMSE and within/between-user
correlations; each LLM method and each baseline at the readout chosen ON DEV; the strongest baseline chosen ON
DEV; and every
comparison with its user-level paired bootstrap CI (the primary one) and the item-level CI beside it.

Works on prediction rows (a run's own, or the rows of a committed report, for re-reading without a rerun);
knows nothing about models, the server or MovieLens files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from service.evaluation import baselines, metrics, stats

SUFFIX = {"greedy": "", "ev": "_ev", "median": "_median"}  # readout -> key suffix in the predictions
# A priori choices used only when no dev numbers are given (labelled as such in the report).
FALLBACK_READOUT = "greedy"
FALLBACK_BASELINE = "user_mean_item_bias"


@dataclass(frozen=True)
class Rows:
    """One split's scored items, in order: whose item, its gold rating, and every method's prediction."""

    users: list[str]
    golds: list[float]
    preds: dict[str, list[float | None]]

    @classmethod
    def from_report(cls, rows: Sequence[Mapping[str, Any]]) -> Rows:
        names = list(rows[0]["pred"]) if rows else []
        return cls(
            users=[str(r["user"]) for r in rows],
            golds=[float(r["gold"]) for r in rows],
            preds={n: [r["pred"].get(n) for r in rows] for n in names},
        )

    def maes(self) -> dict[str, float]:
        return {n: metrics.score_predictions(self.golds, p).mae for n, p in self.preds.items()}


def readout_key(method: str, readout: str) -> str:
    return method + SUFFIX[readout]


def _filled(rows: Rows, name: str, means: Mapping[str, float]) -> list[float]:
    # An unparsed answer carries no information about the item: it is read as the user's history mean.
    return [means[u] if p is None else p for u, p in zip(rows.users, rows.preds[name], strict=True)]


def _history_means(rows: Rows) -> dict[str, float]:
    if "user_mean" not in rows.preds:
        raise ValueError("the rows need the user_mean baseline (each user's history mean)")
    return {u: float(p) for u, p in zip(rows.users, rows.preds["user_mean"], strict=True) if p is not None}


def method_table(rows: Rows) -> dict[str, dict[str, Any]]:
    means = _history_means(rows)
    out: dict[str, dict[str, Any]] = {}
    for name, preds in rows.preds.items():
        filled = _filled(rows, name, means)
        out[name] = {
            **asdict(metrics.score_predictions(rows.golds, preds)),
            "within_user_corr": stats.within_user_corr(rows.users, filled, rows.golds, means),
            "within_user_corr_items_only": stats.within_user_corr_items_only(rows.users, filled, rows.golds),
            "between_user_corr": stats.between_user_corr(rows.users, filled, rows.golds),
        }
    return out


A_PRIORI = "not chosen (no dev numbers): a priori"


def _chosen(
    offered: Mapping[str, str],
    dev_mae: Mapping[str, float] | None,
    source: str,
    rule: Callable[[Mapping[str, float]], str],
    fallback: str,
) -> dict[str, Any]:
    """One method's readout (readout -> prediction key offered): chosen by `rule` on its dev MAEs, else a priori."""
    dev = {r: dev_mae[k] for r, k in offered.items() if dev_mae is not None and k in dev_mae}
    if dev:
        return {"readout": rule(dev), "chosen_on": source, "dev_mae": dev}
    return {"readout": fallback, "chosen_on": A_PRIORI}


def _readouts(
    llm_methods: Sequence[str], rows: Rows, dev_mae: Mapping[str, float] | None, source: str
) -> dict[str, dict[str, Any]]:
    offered = {
        m: {r: readout_key(m, r) for r in stats.READOUTS if readout_key(m, r) in rows.preds} for m in llm_methods
    }
    return {m: _chosen(offered[m], dev_mae, source, stats.choose_readout, FALLBACK_READOUT) for m in llm_methods}


def _baseline_readouts(rows: Rows, dev_mae: Mapping[str, float] | None, source: str) -> dict[str, dict[str, Any]]:
    """Each baseline's readout (continuous, or rounded to the rating grid), chosen on dev as the LLM ones are."""
    keys = {b: {r: baselines.readout_key(b, r) for r in baselines.READOUTS} for b in baselines.NAMES}
    offered = {b: {r: k for r, k in ks.items() if k in rows.preds} for b, ks in keys.items()}
    return {b: _chosen(o, dev_mae, source, baselines.choose_readout, "continuous") for b, o in offered.items() if o}


def choose(
    llm_methods: Sequence[str], rows: Rows, dev_mae: Mapping[str, float] | None, *, dev_is_this_split: bool = False
) -> dict[str, Any]:
    """The readout of each LLM method and of each baseline, and the strongest baseline (at its readout),
    chosen on dev numbers only."""
    source = "this split (dev)" if dev_is_this_split else "dev split"
    base = _baseline_readouts(rows, dev_mae, source)
    at = {b: baselines.readout_key(b, c["readout"]) for b, c in base.items()}
    dev_b = {k: dev_mae[k] for k in at.values() if dev_mae is not None and k in dev_mae}
    if dev_b:
        strongest = {"name": baselines.strongest(dev_b), "chosen_on": source, "dev_mae": dev_b}
    else:
        name = FALLBACK_BASELINE if FALLBACK_BASELINE in rows.preds else list(at.values())[-1]
        strongest = {"name": name, "chosen_on": A_PRIORI}
    return {
        "readouts": _readouts(llm_methods, rows, dev_mae, source),
        "baseline_readouts": base,
        "strongest_baseline": strongest,
    }


def compare(
    rows: Rows,
    pairs: Sequence[tuple[str, str]],
    *,
    resamples: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Each pair (a, b) of prediction keys: mean(|err a| - |err b|) with the user-level CI (primary) and the
    item-level CI (beside it); negative = a better."""
    errors = {k: metrics.absolute_errors(rows.golds, rows.preds[k]) for pair in pairs for k in pair}
    out = []
    for a, b in pairs:
        ci = {
            level: stats.paired_ci(rows.users, errors[a], errors[b], level=level, n_resamples=resamples, seed=seed)
            for level in ("user", "item")
        }
        out.append(
            {
                "a": a,
                "b": b,
                "mean_diff": ci["user"].mean_diff,
                "user_ci": [ci["user"].low, ci["user"].high],
                "item_ci": [ci["item"].low, ci["item"].high],
                "excludes_zero_user_level": ci["user"].excludes_zero,
                "n_users": ci["user"].n_users,
                "n_items": ci["user"].n_items,
            }
        )
    return out


def analyse(
    rows: Rows,
    llm_methods: Sequence[str],
    *,
    reference: str,
    dev_mae: Mapping[str, float] | None,
    dev_is_this_split: bool = False,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The report section: methods table, the dev choices, and the comparisons: every LLM method (at its
    chosen readout) vs the strongest baseline; the reference vs every other LLM method and every baseline."""
    chosen = choose(llm_methods, rows, dev_mae, dev_is_this_split=dev_is_this_split)
    at = {m: readout_key(m, chosen["readouts"][m]["readout"]) for m in llm_methods}
    base_at = [baselines.readout_key(b, c["readout"]) for b, c in chosen["baseline_readouts"].items()]
    target = chosen["strongest_baseline"]["name"]
    pairs = [(at[m], target) for m in llm_methods]
    if reference in at:
        pairs += [(at[reference], at[m]) for m in llm_methods if m != reference]
        pairs += [(at[reference], b) for b in base_at if b != target]
    table = method_table(rows)
    comparisons = compare(rows, list(dict.fromkeys(pairs)), resamples=resamples, seed=seed)
    return {
        "methods": table,
        **chosen,
        "comparisons": comparisons,
        "markdown": markdown(table, comparisons, [*at.values(), *base_at], target),
    }


def _corr(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def markdown(
    table: Mapping[str, Mapping[str, Any]],
    comparisons: Sequence[Mapping[str, Any]],
    chosen: Sequence[str],
    target: str,
) -> str:
    lines = [
        "| method | n | MAE | RMSE | parse failures | within-user r (history mean removed) | "
        "within-user r (items only) | between-user r |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    marks = set(chosen) | {target}  # bold: each method's and baseline's chosen readout
    for name, r in table.items():
        label = f"**{name}**" if name in marks else name
        lines.append(
            f"| {label} | {r['n']} | {r['mae']:.3f} | {r['rmse']:.3f} | {r['parse_failure_rate']:.1%} | "
            f"{_corr(r['within_user_corr'])} | {_corr(r['within_user_corr_items_only'])} | "
            f"{_corr(r['between_user_corr'])} |"
        )
    lines += [
        "",
        "| comparison (negative = first better) | mean abs-error diff | 95% CI, users resampled | "
        "95% CI, items resampled (not independent) |",
        "|---|---:|---:|---:|",
    ]
    for c in comparisons:
        u, i = c["user_ci"], c["item_ci"]
        lines.append(
            f"| {c['a']} vs {c['b']} | {c['mean_diff']:+.3f} | [{u[0]:+.3f}, {u[1]:+.3f}] | "
            f"[{i[0]:+.3f}, {i[1]:+.3f}] |"
        )
    return "\n".join(lines)
