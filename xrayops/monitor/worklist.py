"""The radiologists' review worklist: flagged images, most certainly mislabelled first, as CSV
and as an HTML page with thumbnails (base64 PNG from the dataset shards, no PHI: pseudonymous
ids and preprocessed pixels only)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import BaseModel

CSV_NAME = "review_worklist.csv"
HTML_NAME = "review_worklist.html"
# What a reviewer fills in; `xrayops.monitor.review` reads exactly these columns back.
DECISION_COLUMNS = ("decision", "corrected_region", "reviewer", "timestamp")
WORKLIST_COLUMNS = ("rank", "image_id", "study_id", "given_region", "suggested_region", "suggested_probability",
                    "label_quality", "image_quality", "manufacturer", "split")


class Worklist(BaseModel):
    n_items: int
    csv_path: Path
    html_path: Path


def rank_for_review(issues: pd.DataFrame, limit: int | None = None) -> pd.DataFrame:
    """Flagged images ordered by how sure the audit is that the tag is wrong: lowest label
    quality first (a study's images share it, so they stay together), then the image that
    contradicts the tag most, then the more confident suggestion."""
    keys = [c for c in ("label_quality", "image_quality", "suggested_probability") if c in issues.columns]
    ordered = issues.sort_values(keys, ascending=[k != "suggested_probability" for k in keys], kind="stable")
    ordered = ordered.head(limit) if limit else ordered
    ordered = ordered.reset_index(drop=True)
    ordered.insert(0, "rank", np.arange(1, len(ordered) + 1))
    return ordered


def thumbnail_png(image: np.ndarray, size: int = 96) -> str:
    """A base64 PNG of one stored image (uint8 or uint16), scaled to `size` pixels wide."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        top = float(array.max()) or 1.0
        array = (array.astype(np.float64) / top * 255).round().astype(np.uint8)
    picture = Image.fromarray(array).resize((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_html(items: pd.DataFrame, thumbnails: list[str]) -> str:
    rows = []
    for (_, item), thumb in zip(items.iterrows(), thumbnails):
        rows.append(
            "<tr>"
            f"<td>{int(item['rank'])}</td>"
            f"<td><img alt='image {html.escape(str(item['image_id']))}' src='data:image/png;base64,{thumb}'></td>"
            f"<td><code>{html.escape(str(item['image_id']))}</code></td>"
            f"<td><code>{html.escape(str(item.get('study_id', '')))}</code></td>"
            f"<td>{html.escape(str(item['given_region']))}</td>"
            f"<td>{html.escape(str(item['suggested_region']))} ({float(item['suggested_probability']):.0%})</td>"
            f"<td>{float(item['label_quality']):.3f}</td>"
            "</tr>"
        )
    header = "".join(f"<th>{h}</th>" for h in ("#", "image", "image id", "study", "PACS tag", "model suggests", "label quality"))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>xrayops label review worklist</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px 8px;border-bottom:1px solid #ddd}"
        "img{image-rendering:pixelated}</style></head><body>"
        f"<h1>Label review worklist</h1><p>{len(items)} images whose PACS region tag the audit doubts, "
        "most certain first. Record decisions in the CSV (decision: keep | relabel | exclude; "
        "corrected_region for relabel; reviewer; timestamp, ISO 8601).</p>"
        f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table></body></html>"
    )


def write_worklist(issues: pd.DataFrame, data_dir: str | Path, out_dir: str | Path, limit: int | None = None,
                   thumb_size: int = 96) -> Worklist:
    """Write review_worklist.csv (with empty decision columns) and review_worklist.html."""
    from xrayops.data.dataset import load_images

    items = rank_for_review(issues, limit)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_frame = items[[c for c in WORKLIST_COLUMNS if c in items.columns]].copy()
    for col in DECISION_COLUMNS:
        csv_frame[col] = ""
    csv_path, html_path = out / CSV_NAME, out / HTML_NAME
    csv_frame.to_csv(csv_path, index=False)
    images = load_images(Path(data_dir), items[["shard", "shard_index"]]) if len(items) else []
    html_path.write_text(render_html(items, [thumbnail_png(im, thumb_size) for im in images]), encoding="utf-8")
    return Worklist(n_items=len(items), csv_path=csv_path, html_path=html_path)


def write_audit_worklist(scores_path: str | Path, data_dir: str | Path, out_dir: str | Path,
                         limit: int | None = None) -> tuple[pd.DataFrame, Worklist]:
    """The worklist of an audit's flagged images (label_scores.parquet, `is_issue`), and every
    image's scores for the caller (e.g. to measure the flags against a truth table)."""
    scores = pd.read_parquet(scores_path)
    return scores, write_worklist(scores[scores["is_issue"]], data_dir, out_dir, limit=limit)
