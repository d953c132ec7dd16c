"""The paper's claims on the demo's results, judged with their uncertainty by a bootstrap over
images (issue #13; icd.stats).

The split's images are resampled with replacement RESAMPLES times (seeded: the report is
deterministic, and every claim sees the same resamples), each resample recomputes the metric the
way the evaluation does (mIoU from the summed per-image confusion matrices, pixel mAP from the
pooled pixels) for both sides, and the LEVEL percentile interval of the differences decides:
PASS if it lies above 0, FAIL if below 0 (the opposite holds), UNCLEAR if it contains 0. Pixel
AP is resampled from per-image histograms over AP_BINS score bins per class (quantiles of the
positives' scores; exact up to AP_BINS positives), so each resample costs a matrix product
instead of a sort.

The claims hold for the one trained model of the run: the bootstrap resamples images, not
trainings (icd.stats.compare_runs and `icd-run --repeat N` resample the training seeds too).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy.stats import rankdata

from ..metrics import percent
from ..seeds import EPS
from ..stats import BOOTSTRAP_SEED, LEVEL, RESAMPLES, compare, map_statistic, miou_statistic, \
    resample_weights
from .tables import METHODS, md_table


def _signed(value: Optional[float]) -> str:
    return percent(value) if value is None or value < 0 else "+" + percent(value)


def difference_text(test: Mapping) -> str:
    """"+8.0 [+6.1, +9.8]": the difference and its interval in %."""
    if test["difference"] is None:
        return "n/a"
    return f"{_signed(test['difference'])} [{_signed(test['low'])}, {_signed(test['high'])}]"


def claim(text: str, tests: Sequence[Mapping], numbers: str) -> Dict[str, object]:
    """A claim holding if every test passes; FAIL if one fails or there is none."""
    verdicts = [t["verdict"] for t in tests]
    verdict = ("FAIL" if not tests or "FAIL" in verdicts
               else "PASS" if set(verdicts) == {"PASS"} else "UNCLEAR")
    return dict(claim=text, verdict=verdict, passed=verdict == "PASS",
                numbers=numbers or "n/a", tests=list(tests))


def check_claims(samples: Mapping, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = LEVEL) -> List[Dict[str, object]]:
    """The paper's claims on one split's per-image statistics, each with its bootstrap interval.

    samples: {"num_images": N, "classes": [label values the mIoU averages over],
              "ap": {"cam_baseline"|"cam_head"|"icd": [class_histograms(...) per class]},
              "thresholds": {T: {"cam_baseline"|"cam_head"|"icd": (N, 21, 21) confusions}},
              "table3": [(row name, (N, 21, 21)) in the order bottom-up, +refine, +top-down,
                         +CRF],
              "final": {"icd"|"cam_baseline": (N, 21, 21) of the seeds + CRF}}; a missing part
    makes its claims FAIL.
    Returns [{"claim", "verdict", "passed", "numbers" (text, %), "tests": [compare(...)]}].
    """
    weights = resample_weights(samples["num_images"], resamples, seed)
    classes = samples.get("classes", [])
    claims = []
    ap = samples.get("ap", {})
    for cam, label in (("cam_baseline", "the CAM-only baseline"),
                       ("cam_head", "the CAM head of the ICD model")):
        tests = ([compare(map_statistic(ap["icd"]), map_statistic(ap[cam]), weights, level)]
                 if "icd" in ap and cam in ap else [])
        claims.append(claim(
            f"Table 1: ICD scores rank foreground pixels better than {label} "
            f"(higher pixel-level mAP)", tests,
            "; ".join(f"mAP ICD {percent(t['value'])} vs CAM {percent(t['reference'])}: "
                      f"{difference_text(t)}" for t in tests)))
    study = samples.get("thresholds", {})
    for cam, label in (("cam_baseline", "CAM-baseline seeds"),
                       ("cam_head", "seeds of the ICD model's CAM head")):
        rows = [(t, compare(miou_statistic(v["icd"], classes), miou_statistic(v[cam], classes),
                            weights, level)) for t, v in study.items()]
        claims.append(claim(
            f"Table 2: ICD seeds have a higher mIoU than {label} at every threshold",
            [test for _, test in rows],
            "; ".join(f"T={float(t):.1f}: ICD {percent(test['value'])} vs CAM "
                      f"{percent(test['reference'])}: {difference_text(test)}"
                      for t, test in rows)))
    table3 = list(samples.get("table3", []))
    for (before, low), (after, high) in zip(table3, table3[1:]):
        test = compare(miou_statistic(high, classes), miou_statistic(low, classes), weights,
                       level)
        claims.append(claim(f"Table 3: {after.lstrip('+ ')} adds to {before}", [test],
                             f"mIoU {percent(test['reference'])} -> {percent(test['value'])}: "
                             f"{difference_text(test)}"))
    final = samples.get("final", {})
    tests = ([compare(miou_statistic(final["icd"], classes),
                      miou_statistic(final["cam_baseline"], classes), weights, level)]
             if "icd" in final and "cam_baseline" in final else [])
    claims.append(claim(
        "Seeds + CRF (what DeepLab trains on): ICD seeds have a higher mIoU than CAM-baseline "
        "seeds", tests, "; ".join(f"mIoU ICD {percent(t['value'])} vs CAM "
                                   f"{percent(t['reference'])}: {difference_text(t)}"
                                   for t in tests)))
    return claims


def positive_share(pixels: Mapping[int, Sequence[Tuple[int, np.ndarray, np.ndarray]]]
                   ) -> Dict[str, float]:
    """Where a score map is positive, which is where the release's seed rule puts foreground.

    pixels: {class: [(image index, the class's object pixels' scores, the other valid pixels'
    scores)]} over the images holding the class (`image_statistics`). Returns the mean over
    classes of the share of object pixels with score > 0 ("object") and of the other pixels
    with score > 0 ("rest"), and the mean per-image ranking AUC of object vs rest ("auc").
    """
    shares = {"object": [], "rest": [], "auc": []}
    for images in pixels.values():
        positive = np.concatenate([p for _, p, _ in images])
        negative = np.concatenate([n for _, _, n in images])
        if positive.size == 0 or negative.size == 0:
            continue
        shares["object"].append(float((positive > 0).mean()))
        shares["rest"].append(float((negative > 0).mean()))
        shares["auc"].append(float(np.mean([_auc(p, n) for _, p, n in images
                                            if p.size and n.size])))
    return {k: float(np.mean(v)) if v else float("nan") for k, v in shares.items()}


def _auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive's score > a negative's), ties counted half (Mann-Whitney U / (P Q))."""
    ranks = rankdata(np.concatenate([positive, negative]))
    u = ranks[:positive.size].sum() - positive.size * (positive.size + 1) / 2
    return float(u / (positive.size * negative.size))


def binning_error(tables: Mapping, samples: Mapping) -> float:
    """Largest |binned − exact| mAP over the methods (fraction): what binning costs."""
    gaps = [abs(map_statistic(samples["ap"][k])(np.ones((1, samples["num_images"])))[0]
                - tables["map"][k]) for k, _ in METHODS if tables["map"][k] is not None]
    return float(max(gaps, default=0.0))


def claims_table(claims: Sequence[Mapping], bold: bool) -> List[str]:
    mark = "**{}**" if bold else "{}"
    return md_table(["Claim", "Result", "Numbers (%): value vs reference: difference "
                      f"[{LEVEL:.0%} interval]"],
                     [[c["claim"], mark.format(c["verdict"]), c["numbers"]] for c in claims])


def positive_share_lines(shares: Mapping[str, Mapping[str, float]]) -> List[str]:
    """The sign of the score maps against the ground truth (`positive_share`), as a table."""
    names = {"scores_icd_bu": "bottom-up S", "scores_icd_bu_sp": "refined S'",
             "scores_icd": "top-down S''"}
    lines = [f"The release's seed rule (threshold {EPS:g}) makes a pixel foreground where its "
             "score is positive, so a seed can be no better than the sign of the scores. Over the "
             "training images of each class (mean over classes):", ""]
    lines += md_table(["score map", "object pixels with score > 0 (%)",
                        "other pixels of the image with score > 0 (%)",
                        "per-image AUC object vs other (%)"],
                       [[names[f], percent(v["object"]), percent(v["rest"]), percent(v["auc"])]
                        for f, v in shares.items()])
    lines += ["An AUC near 100% with many positive other pixels means the map ranks the "
              "object above the rest of its image but its zero lies inside the background: "
              "the seeds then cover the object and much of its surroundings; few positive "
              "object pixels mean its zero lies inside the object: the seeds are too small.", ""]
    return lines + _step_lines(shares, names) + [""]


def _step_lines(shares: Mapping[str, Mapping[str, float]], names: Mapping[str, str]
                ) -> List[str]:
    """What each Table 3 step changes in the sign of the scores, read off `shares`: the
    numbers behind a component that does or does not add."""
    lines = []
    folders = [f for f in names if f in shares]
    for before, after in zip(folders, folders[1:]):
        b, a = shares[before], shares[after]
        ranks = "ranks the object better" if a["auc"] > b["auc"] else "ranks the object worse"
        if a["object"] < b["object"] and a["rest"] < b["rest"]:
            sign = "and is positive on fewer object and fewer other pixels"
        elif a["object"] >= b["object"] and a["rest"] >= b["rest"]:
            sign = "and is positive on more object and more other pixels"
        elif a["object"] >= b["object"]:
            sign = "and covers more of the object and less of the rest"
        else:
            sign = "and covers less of the object and more of the rest"
        lines.append(f"- {names[after]} vs {names[before]}: {ranks} (AUC {percent(a['auc'])} "
                     f"vs {percent(b['auc'])}) {sign} (object {percent(a['object'])} vs "
                     f"{percent(b['object'])}%, other {percent(a['rest'])} vs "
                     f"{percent(b['rest'])}%).")
    return lines
