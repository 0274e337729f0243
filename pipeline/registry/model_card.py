"""The model card of a registered version, as markdown (Mitchell et al. 2019, trimmed to what applies)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.modeling.evaluation import Evaluation
from pipeline.modeling.metrics import interval
from pipeline.serving.classifier import ModelInfo

PUBLISHED = "Kermany et al. 2018 (transfer learning, official test split): accuracy 92.8%, sensitivity 93.2%, specificity 90.1%, ROC AUC 0.968"  # noqa: E501
SHOWN = ("roc_auc", "sensitivity", "specificity", "accuracy", "precision", "f1", "pr_auc", "brier")


@dataclass
class CardFacts:
    info: ModelInfo
    evaluation: Evaluation
    split_sizes: dict[str, int]
    data_source: str
    git_commit: str
    decision: str
    decision_reason: str
    examples: list[tuple[str, str]] = field(default_factory=list)  # (relative PNG path, caption)
    stress: dict[str, Any] = field(default_factory=dict)  # reports/stress.json of the stress stage
    ood: dict[str, Any] = field(default_factory=dict)  # packaging.ood_validation
    preprocessing: list[str] = field(default_factory=list)  # models.preprocessing_of: the model's own first layers


RELIABILITY_FIGURE = "model_card/reliability.png"
CARD_TAG = "model_card"  # the version tag register writes: runs:/<run>/model_card/<name>/v<version>/model_card.md


def artifact_dir(model_name: str, version: str) -> str:
    """Where a version's card lives in its training run: one folder per registered model and version, since two
    evaluations of one training (another threshold, calibration or test-time views) are two versions with two
    cards, and one training registered under two model names can hold the same version number in both. The
    card's pictures sit in ``model_card/`` beside it, where its relative links point. MLflow refuses a model name
    holding '/' or ':', so the name is one path segment."""
    return f"model_card/{model_name}/v{version}"


EXTERNAL_HEADING = "## External validation: "  # `pneumo external-validation` appends these sections to a card


def external_sections(card: str) -> str:
    """The external-validation sections appended to a card's text (from the first one to the end), or ''."""
    start = card.find(f"\n{EXTERNAL_HEADING}")
    return card[start:] if start >= 0 else ""


def with_external_section(card: str, name: str, section: str) -> str:
    """`card` with `section` (starting ``\\n## External validation: <name>``) as the section of `name`: one
    already there under that name (a validation run again, or a retried write) is replaced, not repeated."""
    marker = f"\n{EXTERNAL_HEADING}"
    head, *sections = card.split(marker)
    kept = [part for part in sections if part.split("\n", 1)[0].strip() != name]
    return head + "".join(marker + part for part in kept) + section


def _performance_intro(ev: Evaluation) -> str:
    if not ev.ci95:
        return f"At the chosen threshold **{ev.threshold:.4f}**, without confidence intervals ({ev.ci_method}):"
    grouped = ", so several images of one child count once" if "patients" in ev.ci_method else ""
    return f"At the chosen threshold **{ev.threshold:.4f}**, with 95% confidence intervals ({ev.ci_method}{grouped}):"


def _calibration(ev: Evaluation) -> list[str]:
    if not ev.calibration:
        return [
            "## Calibration",
            "",
            "Not calibrated (`evaluate.calibrate: false`): probabilities are the raw outputs.",
            "",
        ]
    c = ev.calibration
    if ev.multiclass:
        how = (
            f"P = softmax(log p / T) with T = {ev.temperature:.3f} (T > 1 softens over-confident outputs). Each "
            "image keeps its class order, but the pneumonia score (1 - P(NORMAL)) can change order between images, "
            "so the threshold was chosen on the calibrated validation scores"
        )
    else:
        how = (
            f"P = sigmoid(logit / T + b) with T = {ev.temperature:.3f} (T > 1 softens over-confident outputs) and "
            f"b = {ev.calibration_bias:+.3f} (shifts outputs that are too low or too high overall). Ranking is "
            "unchanged"
        )
    return [
        "## Calibration",
        "",
        f"Probabilities are calibrated on the validation split ({c['method']}): {how}; every interface applies "
        "the same calibration.",
        *(["", f"**Note:** {warning}."] if (warning := ev.calibration_warning()) else []),
        "",
        "| | raw | calibrated |",
        "|---|---|---|",
        f"| Brier score, test | {c['test_brier']['raw']:.4f} | {c['test_brier']['calibrated']:.4f} |",
        f"| expected calibration error, test | {c['test_ece']['raw']:.4f} | {c['test_ece']['calibrated']:.4f} |",
        f"| log loss, val, smoothed targets (fitted here) | {c['val_log_loss']['raw']:.4f} | "
        f"{c['val_log_loss']['calibrated']:.4f} |",
        "",
        f"![Reliability diagram]({RELIABILITY_FIGURE})",
        "",
    ]


def _stress(report: dict[str, Any]) -> list[str]:
    if not report.get("sets"):
        return []
    rows = [
        f"| {name} | {v['images']} | {v['roc_auc']:.3f} | {v['sensitivity']:.3f} | {v['specificity']:.3f} | "
        f"{v['missed']} | {v['false_alarms']} |"
        for name, v in report["sets"].items()
    ]
    return [
        "## Robustness to acquisition shift",
        "",
        "Test images changed the way other hospitals' images differ (exposure, contrast, gamma, resolution, a "
        "black border, a tighter crop; `fullres`: original files as distributed), scored as served:",
        "",
        "| set | images | ROC AUC | sensitivity | specificity | missed | false alarms |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _ood(check: dict[str, Any]) -> list[str]:
    if not check:
        return []
    limit, warn = check["threshold"], check.get("warning")
    rule = f"above **{limit:.2f}** serving gives no label" if limit is not None else "serving never refuses"
    if warn is not None:
        rule += f", above **{warn:.2f}** the label comes with a warning to check the image"
    probes = ", ".join(f"{name} {score:.1f}" for name, score in check["probes"].items())
    return [
        "## Out-of-distribution check",
        "",
        "Every prediction carries a score of how far the image's features lie from the training images' "
        f"(1.0 = as unusual as the 1% most unusual training images); {rule}, with the reason.",
        "",
        f"- Test split, read as served: {check['test_images']} images, highest score {check['test_max']:.2f}, "
        f"99th percentile {check['test_p99']:.2f}; **{check['test_refused']} refused**, "
        f"{check.get('test_flagged', 0)} with a warning.",
        f"- Synthetic images that are not chest X-rays (scores): {probes}; **{check['probes_refused']} of "
        f"{len(check['probes'])} refused**, {check.get('probes_flagged', 0)} above the warning level.",
        "- Not validated on other body parts or adult chest X-rays: none are in the data set.",
        "",
    ]


KERMANY = (
    "Kermany et al. 2018, *Chest X-Ray Images (Pneumonia)*, CC BY 4.0: retrospective pediatric images from one "
    "hospital (Guangzhou Women and Children's Medical Center), labelled by two physicians, the test split checked "
    "by a third."
)


def _data_source(source: str) -> str:
    if source == "synthetic":
        return (
            "The pipeline's synthetic demo images (`data.source: synthetic`, `pipeline/data/synthetic.py`): seeded "
            "drawings in the Kaggle layout and file naming of the real data set, not X-rays."
        )
    if source == "local":
        return f"A local folder in the Kaggle layout (`data.local_path`), the layout of {KERMANY}"
    return KERMANY


def render(facts: CardFacts) -> str:
    info, ev = facts.info, facts.evaluation
    name = f"{info.name} version {info.version}" if info.version else info.name or "model"
    synthetic = facts.data_source == "synthetic"
    lines = [f"# Model card: {name}", ""]
    if synthetic:
        lines += [
            "> **Trained on the pipeline's synthetic demo data.** It shows the pipeline works; it knows "
            "nothing about real X-rays. Never use it on patients.",
            "",
        ]
    lines += [
        "| | |",
        "|---|---|",
        f"| Model | {info.architecture}, task `{info.task}`, input {info.image_size}x{info.image_size} grayscale |",
        f"| Preprocessing (layers of the model) | {', '.join(facts.preprocessing) or 'none'} |",
        f"| Classes | {', '.join(info.class_names)} |",
        f"| Registry decision | {facts.decision}: {facts.decision_reason} |",
        f"| MLflow run | `{info.run_id}` |",
        f"| Data version (DVC) | `{info.data_version}` (source: {facts.data_source}) |",
        f"| Code | git `{facts.git_commit}` |",
        "",
        "## Intended use",
        "",
        "- Decision support for detecting pneumonia on **pediatric anterior-posterior chest X-rays** "
        "(children aged one to five, as in the training data).",
        "- A clinician reads every image; the model flags, it does not diagnose or rule out.",
        "- Out of scope: adults, lateral views, CT, follow-up of known cases, telling bacterial from viral "
        "pneumonia for treatment, any use without a radiologist or clinician in the loop.",
        "",
        "## Data",
        "",
        _data_source(facts.data_source) + " Splits are grouped by patient (no patient in two splits).",
        "",
        "| split | images |",
        "|---|---|",
        *(f"| {s} | {n} |" for s, n in facts.split_sizes.items()),
        "",
        f"Test set fingerprint: `{ev.test_set}`.",
        "",
        "## Performance on the test split",
        "",
        _performance_intro(ev),
        "",
        "| metric | value | 95% CI | at threshold 0.5 |",
        "|---|---|---|---|",
    ]
    for key in SHOWN:
        lines.append(
            f"| {key} | {getattr(ev.test, key):.3f} | {interval(ev.ci95, key).strip()} "
            f"| {getattr(ev.test_at_half, key):.3f} |"
        )
    (tn, fp), (fn, tp) = ev.test.confusion
    lines += [
        "",
        f"Confusion at the threshold: {tp} pneumonia found, **{fn} missed**, {tn} normal cleared, {fp} false alarms.",
        "",
        f"For context only (different split, different model): {PUBLISHED}.",
        "",
        "## Threshold",
        "",
        f"{ev.threshold:.4f}: chosen on the validation split to reach sensitivity {ev.target_sensitivity:.2f} "
        "at the best specificity that allows (the middle of the thresholds that do both), because a missed "
        "pneumonia costs more than a false alarm. Validation "
        f"sensitivity {ev.val.sensitivity:.3f}, specificity {ev.val.specificity:.3f} on {ev.n.get('val', '?')} "
        "images; a small validation split makes the threshold itself uncertain. The threshold travels "
        "with the model: batch prediction, the REST service and the MLflow pyfunc all apply it.",
        "",
        *(
            [
                f"Test-time augmentation: every image is scored as {ev.views.describe()} and the outputs "
                "averaged; the figures, threshold and calibration here are of those averages, and every "
                "interface averages the same views (Grad-CAM explains the image as given).",
                "",
            ]
            if ev.views.enabled
            else []
        ),
        *_calibration(ev),
        *_stress(facts.stress),
        *_ood(facts.ood),
        "## Known limitations",
        "",
        "- One hospital, one population, one acquisition protocol: expect lower figures elsewhere; "
        "check `pneumo drift` on local images and re-validate before use.",
        "- Ages one to five only. Older children and adults were not in the data.",
        "- The data set's official train and test splits differ in class balance and image "
        "characteristics (a known shift): figures on a split carved from the train folder, like this one "
        "when built from the Kaggle train folder, are optimistic about the official test split.",
        "- Images are stretched to a square, as in the published data set; aspect ratio is lost. Pneumonia "
        "originals are wider than normal ones, so a model can learn the stretch as a sign of pneumonia: the "
        "`aspect_*` rows of the robustness table show how far its score moves when a frame's shape changes.",
        "- Bacterial/viral labels come from file names; viral pneumonia is the hardest class.",
        "- Grad-CAM shows where the model's evidence is, coarsely; it is not a lesion segmentation, and "
        "attention outside the lungs (markers, text, devices) is a sign of shortcut learning.",
        "",
    ]
    if facts.examples:
        lines += ["## Grad-CAM examples", ""]
        for path, caption in facts.examples:
            lines += [f"**{caption}**", "", f"![{caption}]({path})", ""]
    lines += [
        "## How to use",
        "",
        "```bash",
        f"pneumo predict --model models:/{info.name}/{info.version} xrays/ -o predictions.csv --explain heatmaps/",
        "pneumo serve --port 8080        # follows @champion",
        f"mlflow models serve -m models:/{info.name}/{info.version} --env-manager local -p 5001",
        "```",
        "",
    ]
    return "\n".join(lines)
